#!/usr/bin/env bash
# PatchDropout training on one GPU, eager and torch.compiled: GPU tests (compiled vs eager bf16
# loss trajectories), then benchmarks/bench_vision.py (bf16, batch 256, fused AdamW, random-init
# timm models, synthetic images) with compiled rows beside eager ours and eager timm, compile
# time apart, and the number of graphs Dynamo built (and built while timed: 0 = no recompiles).
#   bash benchmarks/gpu/vision.sh smoke   # about 90-120 s: GPU tests (3 compiles) + 28x28 models (2 compiles)
#   bash benchmarks/gpu/vision.sh full1   # expected about 5-6 min (limit 8): DeiT-S, DeiT-B (6 compiles)
#   bash benchmarks/gpu/vision.sh full2   # expected about 5-6 min (limit 8): GPU tests, Swin-T (2 compiles),
#                                         # DeiT-S random keep-rate schedule (11 graphs)
#   bash benchmarks/gpu/vision.sh full    # full1 then full2 (about 11 min)
# Compiles take 20-50 s each on one H200; the benchmark stops starting rows after --budget-s.
# Run from the repository root with PYTHONPATH containing it.
set -u
MODE="${1:-smoke}"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES%%,*}"   # single-GPU benchmark: the first GPU only
export PYTHONPATH="$PWD:${PYTHONPATH:-}"

gpu_tests() {
  echo "## GPU tests (compiled vs eager, bf16)"
  local start=$(date +%s)
  python3 -m pytest -m gpu tests/models/test_compile_vision.py tests/models/test_patch_dropout.py \
    tests/models/test_swin_patch_dropout.py -q -x -p no:cacheprovider \
    || echo "GPU tests FAILED (exit $?): the benchmark runs anyway"
  echo "tests: $(( $(date +%s) - start )) s"
}

bench() {  # bench LIMIT_S ARGS...
  local limit="$1"; shift
  echo
  echo "## Benchmark: python3 benchmarks/bench_vision.py $*"
  local start=$(date +%s)
  timeout -k 20 "$limit" python3 benchmarks/bench_vision.py "$@" || echo "benchmark exited with $?"
  echo "benchmark: $(( $(date +%s) - start )) s"
}

case "$MODE" in
  smoke) gpu_tests; bench 80 --preset smoke --device cuda --batch 64 --steps 5 --warmup 3 ;;
  full1) bench 470 --preset compiled1 --steps 15 --warmup 3 --budget-s 380 ;;
  full2) gpu_tests; bench 450 --preset compiled2 --steps 15 --warmup 3 --budget-s 200 ;;
  full)  bash "$0" full1; bash "$0" full2 ;;
  *) echo "usage: $0 smoke|full1|full2|full" >&2; exit 2 ;;
esac
