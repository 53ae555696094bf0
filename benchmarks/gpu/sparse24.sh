#!/usr/bin/env bash
# 2:4 sparse inference on one GPU: GPU tests, then dense vs 2:4 per layer and end to end,
# eager and CUDA-graphed, for BERT-base and BERT-large shapes (random-init weights, no downloads).
#   bash benchmarks/gpu/sparse24.sh smoke   # < 90 s: tests + 2-layer models at 4096 tokens
#   bash benchmarks/gpu/sparse24.sh full    # expected wall time about 3 minutes (limit 5)
# Run from the repository root with PYTHONPATH containing it.
set -u
MODE="${1:-smoke}"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES%%,*}"   # single-GPU benchmark: the first GPU only
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD:${PYTHONPATH:-}"

case "$MODE" in
  smoke) BENCH_ARGS=(--smoke) ;;
  full)  BENCH_ARGS=() ;;
  *) echo "usage: $0 smoke|full" >&2; exit 2 ;;
esac

echo "## GPU tests (2:4 export, CUDA-graphed inference, Sparse24Eval)"
start=$(date +%s)
python3 -m pytest -m gpu tests/models/test_sparse_inference.py tests/models/test_nm_sparsity.py \
  -q -x -p no:cacheprovider || echo "GPU tests FAILED (exit $?): the benchmark runs anyway"
echo "tests: $(( $(date +%s) - start )) s"

echo
echo "## Benchmark: python3 benchmarks/bench_sparse24.py ${BENCH_ARGS[*]+${BENCH_ARGS[*]}}"
start=$(date +%s)
python3 benchmarks/bench_sparse24.py ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} || echo "benchmark exited with $?"
echo "benchmark: $(( $(date +%s) - start )) s"
