#!/usr/bin/env bash
# LLM.int8() on one GPU: the GPU tests of tests/models/test_int8.py (fused Triton path against a
# float64 re-derivation, one CUDA graph / one compiled graph over changing outlier sets, BERT
# through BucketedRunner padded and unpadded), then benchmarks/bench_int8.py (per layer and end
# to end against the best of bf16 eager / CUDA graph / torch.compile; torchao and bitsandbytes
# where they import).
#
#   bash benchmarks/gpu/int8.sh quick   # tests + a ~1 minute benchmark
#   bash benchmarks/gpu/int8.sh full    # tests (~1.5 min with first Triton compiles) + <= 5.5 min
#
# Run from the repository root; PYTHONPATH may add a site directory with torchao/bitsandbytes.
# With $OUT set, the log goes to $OUT/int8.log and the tables to $OUT/int8_<mode>.{json,md}.
set -u
set -o pipefail
MODE="${1:-quick}"
case "$MODE" in
  quick) BENCH=(--quick); LIMIT=150 ;;
  full)  BENCH=(); LIMIT=400 ;;
  *) echo "usage: $0 quick|full" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES%%,*}"  # one GPU
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
LOG=/dev/null
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  LOG="$OUT/int8.log"
  BENCH+=(--out "$OUT/int8_$MODE.json")
fi
# Lines that are noise in this log (library deprecations, per-call casts, compile chatter).
NOISE='FutureWarning|DeprecationWarning|UserWarning: .*(TypedStorage|deprecated|cast)|warnings\.warn\(|^ *warn\(|torch\._dynamo.*(recompil|guard)|TensorFloat32'
filter() { grep --line-buffered -v -E "$NOISE" || true; }
say() { echo "$@" | tee -a "$LOG"; }

: >"$LOG" 2>/dev/null || LOG=/dev/null
status=0
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$LOG"
for pkg in torchao bitsandbytes; do
  "$PY" -c "import $pkg; print('$pkg', $pkg.__version__)" 2>/dev/null | tee -a "$LOG" || say "$pkg: does not import here"
done

say ""
say "## GPU tests: $PY -m pytest -m gpu tests/models/test_int8.py -q -x ($(date -u +%H:%M:%S))"
start=$(date +%s)
timeout 150 "$PY" -m pytest -m gpu tests/models/test_int8.py -q -x -p no:cacheprovider -W ignore::DeprecationWarning \
  2>&1 | filter | tail -n 60 | tee -a "$LOG"
rc=$?
[ "$rc" -eq 0 ] || status=1
say "tests: exit $rc, $(( $(date +%s) - start )) s (the benchmark runs either way)"

say ""
say "## Benchmark: $PY benchmarks/bench_int8.py ${BENCH[*]+${BENCH[*]}} ($(date -u +%H:%M:%S))"
start=$(date +%s)
timeout "$LIMIT" "$PY" benchmarks/bench_int8.py ${BENCH[@]+"${BENCH[@]}"} 2>&1 | filter | tee -a "$LOG"
rc=$?
[ "$rc" -eq 0 ] || status=1
say "benchmark: exit $rc, $(( $(date +%s) - start )) s"
exit "$status"
