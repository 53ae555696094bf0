#!/usr/bin/env bash
# Multi-GPU checks and measurements on a machine with 2 GPUs, from the repository root.
#   bash benchmarks/gpu/multi_gpu.sh tests   # GPU tests of tests/test_multi_gpu.py (~6 min)
#   bash benchmarks/gpu/multi_gpu.sh full    # benchmarks/bench_multi_gpu.py (~5 min)
# Needs torchrec + CUDA fbgemm-gpu for the DLRM parts. NVLink multicast stays off.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
mode=${1:-tests}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "$mode" in
  tests) python3 -m pytest -m gpu tests/test_multi_gpu.py -q -x -p no:cacheprovider -rA --durations=0 ;;
  smoke) python3 -m pytest -m gpu tests/test_multi_gpu.py -q -p no:cacheprovider -k "quickstart or plain_ddp" --durations=0 ;;
  full) python3 benchmarks/bench_multi_gpu.py ;;
  *) echo "mode: tests | smoke | full"; exit 2 ;;
esac
