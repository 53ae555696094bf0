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
#   bash benchmarks/gpu/vision.sh plan26  # at most about 8.5 min: compile time and regional compile:
#       DeiT-B keep 0.5 eager (timm, ours), compiled by blocks (cold cache, own process), blocks again
#       in a second process on the first one's cache (warm), reduce-overhead blocks, whole model;
#       DeiT-S random schedule compiled by blocks (11 graphs); Swin-T compiled; then the GPU compile
#       tests (45 s). Rows start until 380 s, rows still running at 430 s stop;
#       the table goes to $OUT/vision_plan26.md when OUT is set, the rows' stderr tails to $OUT/plan26_logs.
# Whole-model compiles took 23-74 s each on one H200; the benchmark stops starting rows after --budget-s.
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

plan26() {
  local cache_root; cache_root="$(mktemp -d "${TMPDIR:-/tmp}/bench_vision_plan26.XXXXXX")"
  local out_args=(); [ -n "${OUT:-}" ] && out_args=(--out "$OUT/vision_plan26.md")
  bench 450 --preset plan26 --isolate --cache-root "$cache_root" --steps 15 --warmup 3 \
    --budget-s 380 --overrun-s 50 ${out_args[@]+"${out_args[@]}"}
  if [ -n "${OUT:-}" ]; then  # the last lines of each compiled row's stderr (errors, inductor warnings)
    mkdir -p "$OUT/plan26_logs"
    for log in "$cache_root"/*.stderr.log; do [ -e "$log" ] && tail -c 6000 "$log" > "$OUT/plan26_logs/$(basename "$log")"; done
  fi
  echo
  echo "## GPU compile tests (time left: 45 s)"
  local start=$(date +%s)
  timeout -k 10 45 python3 -m pytest -m gpu tests/models/test_compile_vision.py -v -x -p no:cacheprovider \
    || echo "GPU tests stopped or FAILED (exit $?)"
  echo "tests: $(( $(date +%s) - start )) s"
}

case "$MODE" in
  smoke) gpu_tests; bench 80 --preset smoke --device cuda --batch 64 --steps 5 --warmup 3 ;;
  full1) bench 470 --preset compiled1 --steps 15 --warmup 3 --budget-s 380 ;;
  full2) gpu_tests; bench 450 --preset compiled2 --steps 15 --warmup 3 --budget-s 200 ;;
  full)  bash "$0" full1; bash "$0" full2 ;;
  plan26) plan26 ;;
  *) echo "usage: $0 smoke|full1|full2|full|plan26" >&2; exit 2 ;;
esac
