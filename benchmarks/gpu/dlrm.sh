#!/usr/bin/env bash
# DLRM on one H200.
#
#   benchmarks/gpu/dlrm.sh plan26  # the end-to-end plan, about 5 minutes (8 at most: every
#                                  # section has its own time limit):
#     1. bench_dlrm.py loops: the bare DMP loop vs the Lightning loop on device batches, 26 x 1M
#        x 64, B = 8192, 200 steps after 20, median of 3 interleaved rounds, ratio, host time
#        per step of each;
#     2. dlrm_phases.py: the whole `python -m lit fit --config configs/dlrm/synthetic_gpu.yaml
#        --trainer.accelerator gpu --trainer.devices 1` timed, phase by phase, its samples/s
#        against the bare loop's (with the imports and the datamodule's construction timed
#        alone first);
#     3. bench_dlrm.py profile: torch.profiler over 20 steps of the Lightning loop (top 15 by
#        self GPU time and by CPU time, Lightning's actions named) and of the bare loop, and
#        cProfile over 20 steps of the Lightning loop (the Python functions on the host);
#     4. bench_dlrm.py readers: .npy at 1/2/4/8/16 workers against the training rate, with the
#        training process's CPU per batch and the previous batch layout beside each row;
#     5. the DLRM GPU tests (tests/models/dlrm/test_dlrm_gpu.py);
#     6. with time left: the fit command again with the config's previous end-of-run settings.
#   benchmarks/gpu/dlrm.sh smoke   # every path of the long benchmark, tiny sizes: ~1.5 minutes
#   benchmarks/gpu/dlrm.sh full    # the long benchmark (every loop, V = 100k and 1M, every
#                                  # reader) and two single-epoch fits: about 5 minutes
#
# Run from the repository root with the repository on PYTHONPATH (torchrec and fbgemm-gpu
# installed). Benchmarks use GPU 0 only; the tests may use two GPUs. When $OUT is set, the log
# goes to $OUT/dlrm.log too, with the run's phase marks and fit log beside it.
set -u
MODE=${1:-smoke}
case "$MODE" in smoke|full|plan26) ;; *) echo "usage: $0 smoke|full|plan26" >&2; exit 2 ;; esac
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/dlrm.log") 2>&1
fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export PYTHONWARNINGS=ignore
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
status=0
T0=$(date +%s)
section() { echo; echo "## $1 ($(date -u +%H:%M:%S), +$(( $(date +%s) - T0 )) s)"; }
quiet() { grep -vE "Warning|warn\(|^\s*$|is_fx_tracing|HeuristicalStorage|TopologyFactory|known issue|LOCAL_RANK|GPU available|TPU available|Tip:|litlogger|deprecat|Initializing distributed|distributed_backend|All distributed|^-+$|stopped: .max_epochs|USDT|STAGE:"; }

python3 -c "import torch, torchrec, fbgemm_gpu, lightning; print('torch', torch.__version__, '| torchrec', torchrec.__version__, '| fbgemm-gpu', fbgemm_gpu.__version__, '| lightning', lightning.__version__, '|', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), '| CPU cores', __import__('os').cpu_count())" 2>&1 | tail -n 1

tests() {  # time limit
  section "GPU tests"
  local rc
  timeout "$1" python3 -m pytest -m gpu tests/models/dlrm/test_dlrm_gpu.py -q -p no:cacheprovider \
    -W ignore >"$WORK/tests.log" 2>&1
  rc=$?
  if [ "$rc" != 0 ]; then status=1; echo "pytest exit status $rc$([ "$rc" = 124 ] && echo ' (time limit)')"; fi
  grep -E "^E |^[a-z_/]+\.py:[0-9]+: " "$WORK/tests.log" | cut -c1-400 | head -n 60  # each failure: message, place
  grep -E "^(FAILED|ERROR) |^[0-9]+ (passed|failed)|passed|skipped" "$WORK/tests.log" | tail -n 12
  if [ -n "${OUT:-}" ]; then cp "$WORK/tests.log" "$OUT/dlrm_tests.log"; fi
}

if [ "$MODE" = plan26 ]; then
  # Ordered by what the run is for (a section cut by its limit leaves the earlier ones whole);
  # the limits add up to 8 minutes.
  export CUDA_VISIBLE_DEVICES=0
  B=(--device cuda --batch-size 8192 --rows 1000000)
  step() {  # name, time limit, lines to show, command...: its output filtered, its status kept
    local name=$1 limit=$2 lines=$3 rc; shift 3
    timeout "$limit" "$@" >"$WORK/$name.out" 2>&1
    rc=$?
    quiet <"$WORK/$name.out" | cut -c1-230 | tail -n "$lines"
    if [ "$rc" != 0 ]; then status=1; echo "$name: exit status $rc$([ "$rc" = 124 ] && echo ' (time limit)')"; fi
    if [ -n "${OUT:-}" ]; then cp "$WORK/$name.out" "$OUT/dlrm_$name.out"; fi
  }
  section "bare loop vs Lightning loop, device batches (bench_dlrm.py loops)"
  step loops 100 30 python3 benchmarks/bench_dlrm.py loops "${B[@]}" --steps 200 --warmup 20 \
    --rounds 3 --rates-json "$WORK/rates.json"
  [ -s "$WORK/rates.json" ] && { cat "$WORK/rates.json"; echo; } || echo "no rates: ratios below are left out"
  section "the whole fit command, phase by phase (dlrm_phases.py)"
  step e2e 150 45 python3 benchmarks/dlrm_phases.py --config configs/dlrm/synthetic_gpu.yaml \
    --work "$WORK/e2e" --bare-rate "$WORK/rates.json" --timeout 120 --startup-breakdown \
    -- --trainer.accelerator gpu --trainer.devices 1
  if [ -n "${OUT:-}" ]; then
    cp "$WORK/e2e/dlrm_phases/phases.json" "$WORK/e2e/dlrm_phases/fit.log" "$OUT/" 2>/dev/null
    cp "$WORK/rates.json" "$OUT/dlrm_rates.json" 2>/dev/null
  fi
  section "torch.profiler, 20 steps (bench_dlrm.py profile)"
  step profile 60 100 python3 benchmarks/bench_dlrm.py profile "${B[@]}" --warmup 20 --profile-steps 20
  section ".npy readers (bench_dlrm.py readers)"
  step readers 60 20 python3 benchmarks/bench_dlrm.py readers --device cuda --batch-size 8192 \
    --reader-samples 1048576 --workers 1 2 4 8 16 --rates-json "$WORK/rates.json"
  unset CUDA_VISIBLE_DEVICES
  tests 110
  # With time left (the limits above are upper bounds): the same command with the end-of-run
  # settings the config had before (Lightning's single-device strategy, so the teardown copies
  # and two gathered checkpoints; the epoch-end validation; held-out batches of 8192), for the
  # phase table's "before" column. The module's own changes stay in.
  elapsed=$(( $(date +%s) - T0 ))
  if [ "$elapsed" -lt 330 ]; then
    export CUDA_VISIBLE_DEVICES=0
    section "the same command with the previous end-of-run settings"
    step e2e_before $(( 470 - elapsed )) 30 python3 benchmarks/dlrm_phases.py \
      --config configs/dlrm/synthetic_gpu.yaml --work "$WORK/before" --bare-rate "$WORK/rates.json" \
      --timeout $(( 460 - elapsed )) -- --trainer.accelerator gpu --trainer.devices 1 \
      --trainer.strategy auto --checkpoint.save_last true --trainer.limit_val_batches 1.0 \
      --data.init_args.eval_batch_size 8192
  else
    echo "(no time left for the run with the previous end-of-run settings: ${elapsed} s used)"
  fi
  section "done, status $status"
  exit $status
fi

tests 300
export CUDA_VISIBLE_DEVICES=0
section "bench_dlrm.py"
if [ "$MODE" = full ]; then
  WORKERS=(1 2 4 8)
  if [ "$(nproc)" -ge 16 ]; then WORKERS+=(16); fi  # 16 reader processes need the cores
  BENCH=(--rows 100000 1000000 --steps 100 --warmup 10 --rounds 2 --dense-steps 10
         --reader-samples 524288 --workers "${WORKERS[@]}")
  LIMIT=240
else
  BENCH=(--rows 10000 --steps 10 --warmup 3 --rounds 1 --dense-steps 3
         --reader-samples 32768 --workers 2)
  LIMIT=90
fi
echo "python3 benchmarks/bench_dlrm.py --device cuda --batch-size 8192 ${BENCH[*]}"
timeout "$LIMIT" python3 benchmarks/bench_dlrm.py --device cuda --batch-size 8192 "${BENCH[@]}" \
  >"$WORK/bench.out" 2>"$WORK/bench.err"
rc=$?
if [ "$rc" != 0 ]; then status=1; echo "bench_dlrm.py exit status $rc"; fi
grep -E "^\||^DLRM|^rounds|failed" "$WORK/bench.out"
grep -iE "error|Traceback" "$WORK/bench.err" | tail -n 8

fit() {  # name, config, train samples, extra args...
  local name=$1 config=$2 samples=$3; shift 3
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout 180 python3 -m lit fit --config "$config" --trainer.accelerator gpu --trainer.devices 1 \
    --trainer.default_root_dir "$WORK/$name" --trainer.logger.init_args.save_dir "$WORK/$name/runs" \
    --trainer.enable_progress_bar false "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local metrics
  metrics=$(grep -E "test/(logloss|auroc|ne) " "$WORK/$name.log" | tr -s ' │|' ' ' | tr '\n' ';')
  local loop  # the training loop's own rate: median of the logged train/samples_per_s
  loop=$(python3 -c "import sys; from benchmarks.bench_dlrm import logged_train_rate; print(logged_train_rate(sys.argv[1]))" \
    "$WORK/$name/runs" 2>/dev/null | tail -n 1)
  python3 -c "import sys; n, s, rc = int(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2]), sys.argv[4]
print(f'| {sys.argv[5]} | {n:,} | {s:.1f} | {n / s:,.0f} | {sys.argv[7]} | {\"ok\" if rc == \"0\" else \"FAILED rc=\" + rc} | {sys.argv[6]} |')" \
    "$samples" "$t0" "$t1" "$rc" "$config $*" "$metrics" "${loop:-n/a}"
  if [ "$rc" != 0 ]; then tail -n 20 "$WORK/$name.log"; status=1; fi
}

section "end-to-end single-epoch fits (wall time of the whole command: start-up, model build, evaluations)"
echo "| config | train samples | seconds | samples/s (whole fit) | samples/s (training loop, logged) | status | test metrics |"
echo "|---|---|---|---|---|---|---|"
if [ "$MODE" = full ]; then
  fit synthetic configs/dlrm/synthetic.yaml 2097152
  fit synthetic_gpu configs/dlrm/synthetic_gpu.yaml 33554432
else
  fit synthetic_gpu configs/dlrm/synthetic_gpu.yaml 262144 --data.init_args.train_samples 262144 \
    --data.init_args.val_samples 16384 --data.init_args.test_samples 16384 \
    "--trainer.callbacks=[{class_path: callbacks.EvalAtSamples, init_args: {at_samples: [131072, 262144]}}]"
fi
section "done, status $status"
exit $status
