"""Shared test fixtures: tiny Trainer settings and in-process / subprocess CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Keep CPU tests predictable on small machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Lightning 2.6 calls jsonargparse APIs deprecated in 4.49: noise, not ours to fix.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


def cli_args(*args: str, tmp_path: Path | None = None) -> list[str]:
    """Arguments for ``python -m lit`` that keep a test run small and inside ``tmp_path``."""
    out = list(args)
    if tmp_path is not None:
        out += [f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    return out


def run_lit(args: list[str], cwd: Path = ROOT, timeout: int = 240,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m lit ARGS`` in a real subprocess; fail the test with its output on error."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "lit", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    return proc


# What a DDP Trainer in the test process exports (Lightning's launcher and cluster environment,
# seed_everything). Left behind, LOCAL_RANK makes a later `python -m lit` subprocess with several
# devices believe its processes were started externally: rank 0 waits for a rank that never starts.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE",
              "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@pytest.fixture(autouse=True)
def _no_leaked_launch_env():
    """Restore the launch variables after every test (see ``LAUNCH_ENV``)."""
    saved = {key: os.environ.get(key) for key in LAUNCH_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when both sys.argv (pytest's) and ``args`` are given."""
    monkeypatch.setattr(sys, "argv", ["lit"])


needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed: sudo apt-get install dataset-fashion-mnist (make setup)",
)
