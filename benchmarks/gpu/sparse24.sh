#!/usr/bin/env bash
# 2:4 sparse inference on one GPU: GPU tests, then dense vs 2:4 per layer and end to end,
# eager and CUDA-graphed, for BERT-base and BERT-large shapes (random-init weights, no downloads).
#   bash benchmarks/gpu/sparse24.sh smoke   # < 90 s: tests + 2-layer models at 4096 tokens
#   bash benchmarks/gpu/sparse24.sh full    # expected wall time about 3-4 minutes (limit 8)
#   bash benchmarks/gpu/sparse24.sh graphs  # about 4 minutes: hook/compile GPU tests, then
#       benchmarks/bench_graphs.py (eager vs hand-captured graphs vs torch.compile
#       reduce-overhead, dense and 2:4; at most 3 minutes), table also in $BENCH_GRAPHS_OUT
# Run from the repository root with PYTHONPATH containing it.
set -u
MODE="${1:-smoke}"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES%%,*}"   # single-GPU benchmark: the first GPU only
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
BENCH_GRAPHS_OUT="${BENCH_GRAPHS_OUT:-benchmarks/results/bench_graphs.md}"

# smoke leaves out the slow GPU tests (the torch.compile one compiles a model twice)
case "$MODE" in
  smoke)  TEST_MARK="gpu and not slow"; TESTS=(tests/models/test_sparse_inference.py tests/models/test_nm_sparsity.py tests/models/test_private_hooks.py)
          BENCH_ARGS=(--smoke); PROFILE_ARGS=(--smoke --profile 32) ;;
  full)   TEST_MARK="gpu"; TESTS=(tests/models/test_sparse_inference.py tests/models/test_nm_sparsity.py tests/models/test_private_hooks.py)
          BENCH_ARGS=(); PROFILE_ARGS=(--profile 128) ;;
  graphs) TEST_MARK="gpu"; TESTS=(tests/models/test_private_hooks.py "tests/models/test_sparse_inference.py::test_compiled_and_hand_graphs_equal_eager_and_say_which_calls_replay") ;;
  *) echo "usage: $0 smoke|full|graphs" >&2; exit 2 ;;
esac

python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

echo "## GPU tests (private hooks, 2:4 export, CUDA-graphed and compiled inference, Sparse24Eval)"
start=$(date +%s)
tests_rc=0
python3 -m pytest -m "$TEST_MARK" "${TESTS[@]}" -q -x -p no:cacheprovider -rA || tests_rc=$?
echo "tests: exit $tests_rc, $(( $(date +%s) - start )) s (the benchmark runs either way)"

if [ "$MODE" = graphs ]; then
  echo
  echo "## Benchmark: python3 benchmarks/bench_graphs.py --out $BENCH_GRAPHS_OUT"
  start=$(date +%s)
  bench_rc=0
  # the script stops starting compiles at 165 s; the timeout only guards against a hung compile
  timeout 240 python3 benchmarks/bench_graphs.py --out "$BENCH_GRAPHS_OUT" || bench_rc=$?
  echo "benchmark: exit $bench_rc, $(( $(date +%s) - start )) s"
  [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
  exit
fi

echo
echo "## Benchmark: python3 benchmarks/bench_sparse24.py ${BENCH_ARGS[*]+${BENCH_ARGS[*]}}"
start=$(date +%s)
bench_rc=0
python3 benchmarks/bench_sparse24.py ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} || bench_rc=$?
echo "benchmark: exit $bench_rc, $(( $(date +%s) - start )) s"

# Diagnostic only (its own process, so a profiler problem cannot cost the tables above): the dense
# model's top kernels, eager vs CUDA graph, at the largest batch. Its exit status is not counted.
echo
echo "## Profile: python3 benchmarks/bench_sparse24.py ${PROFILE_ARGS[*]}"
start=$(date +%s)
timeout 120 python3 benchmarks/bench_sparse24.py "${PROFILE_ARGS[@]}" || echo "profile: exit $? (ignored)"
echo "profile: $(( $(date +%s) - start )) s"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
