#!/usr/bin/env bash
# DLRM on one H200: GPU tests (a two-process NCCL fit as well when two GPUs are visible), the
# throughput table of benchmarks/bench_dlrm.py (raw DMP loop, raw TrainPipelineSparseDist,
# Lightning DLRMModule, dense gradients at V = 100k and 1M rows per table, median of 3 rounds;
# readers at 1/2/4/8 (and 16 with enough cores) workers; SyntheticCTR on the CPU and on the GPU), then end-to-end single-epoch fits of
# configs/dlrm/synthetic.yaml and configs/dlrm/synthetic_gpu.yaml with samples/s of the whole fit.
#
#   benchmarks/gpu/dlrm.sh smoke   # every path, tiny sizes: about 1.5 minutes (the two-GPU test
#                                  # adds ~30 s when two GPUs are visible)
#   benchmarks/gpu/dlrm.sh full    # the numbers: about 5 minutes
#
# Run from the repository root with the repository on PYTHONPATH (torchrec and fbgemm-gpu
# installed). Benchmarks use GPU 0 only; the tests may use two GPUs.
set -u
MODE=${1:-smoke}
case "$MODE" in smoke|full) ;; *) echo "usage: $0 smoke|full" >&2; exit 2 ;; esac
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export PYTHONWARNINGS=ignore
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
status=0
section() { echo; echo "## $1 ($(date -u +%H:%M:%S))"; }

python3 -c "import torch, torchrec, fbgemm_gpu; print('torch', torch.__version__, '| torchrec', torchrec.__version__, '| fbgemm-gpu', fbgemm_gpu.__version__, '|', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), '| CPU cores', __import__('os').cpu_count())" 2>&1 | tail -n 1

section "GPU tests"
python3 -m pytest -m gpu tests/models/dlrm/test_dlrm_gpu.py -q -p no:cacheprovider \
  -W ignore >"$WORK/tests.log" 2>&1 || status=1
grep -E "^E |^[a-z_/]+\.py:[0-9]+: " "$WORK/tests.log" | cut -c1-400 | head -n 60  # each failure: message, place
grep -E "^(FAILED|ERROR) |^[0-9]+ (passed|failed)|passed|skipped" "$WORK/tests.log" | tail -n 12

export CUDA_VISIBLE_DEVICES=0
section "bench_dlrm.py"
if [ "$MODE" = full ]; then
  WORKERS=(1 2 4 8)
  if [ "$(nproc)" -ge 24 ]; then WORKERS+=(16); fi  # 16 reader processes need the cores
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
  >"$WORK/bench.out" 2>"$WORK/bench.err" || { status=1; echo "bench_dlrm.py exit status $?"; }
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
