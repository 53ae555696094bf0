"""Multi-process (DDP) runs on the CPU with the gloo backend, 2 processes: metric reduction is
exact (a 2-process validation equals the 1-process one), and the BERT family trains under DDP
with N:M masks intact on every rank. The DLRM family's 2-process test (torchrec sharding under
Lightning) is in tests/test_dlrm_ddp.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from models.nm_sparsity import is_nm_sparse
from tests.conftest import CONFIGS, needs_fmnist, run_lit

DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]


def _metric(output: str, name: str) -> float:
    # Lightning's results table: "│  val/acc  │  0.8123...  │"
    match = re.search(rf"{re.escape(name)}\s*│\s*([0-9.]+)", output)
    assert match, f"{name} not printed:\n{output[-2000:]}"
    return float(match.group(1))


@needs_fmnist
@pytest.mark.slow
def test_two_process_validation_equals_one_process(tmp_path: Path) -> None:
    """5,000 validation images split 2,500 per rank (no padding): accuracy and loss reduced over
    both ranks must equal a single process's over all 5,000."""
    quickstart = str(CONFIGS / "quickstart.yaml")
    proc = run_lit(["fit", "--config", quickstart, f"--trainer.logger.init_args.save_dir={tmp_path}",
                    "--trainer.max_steps=20", "--trainer.limit_val_batches=0",
                    "--test_after_fit=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    common = ["validate", "--config", quickstart, f"--ckpt_path={ckpt}", "--trainer.logger=false",
              "--data.init_args.batch_size=100"]
    single = run_lit([*common, f"--trainer.default_root_dir={tmp_path / 'one'}"])
    double = run_lit([*common, *DDP, f"--trainer.default_root_dir={tmp_path / 'two'}"])
    assert single.returncode == 0 and double.returncode == 0, double.stderr[-3000:]
    one_acc, two_acc = _metric(single.stdout, "val/acc"), _metric(double.stdout, "val/acc")
    assert 0.15 < one_acc < 1.0  # trained past chance (0.1) after 20 warm-up steps
    assert two_acc == pytest.approx(one_acc, abs=1e-6)
    # Equal batch sizes on both ranks, so the mean of per-rank mean losses is the global mean.
    assert _metric(double.stdout, "val/loss") == pytest.approx(_metric(single.stdout, "val/loss"),
                                                               abs=1e-5)


def test_bert_two_process_ddp_keeps_masks(tmp_path: Path) -> None:
    proc = run_lit(["fit", "--config", str(CONFIGS / "bert" / "tiny_smoke.yaml"), *DDP,
                    f"--trainer.logger.init_args.save_dir={tmp_path}",
                    "--trainer.max_epochs=2", "--trainer.limit_test_batches=2"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr
    # Each rank runs half the steps of one process: 2 epochs reach the pruning step (3).
    ckpt = tmp_path / "bert_tiny_smoke" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    pruned = [k for k in state if ".encoder." in k and k.endswith(".weight") and state[k].ndim == 2]
    assert pruned and all(is_nm_sparse(state[k], 2, 4) for k in pruned)


@needs_fmnist
@pytest.mark.slow
def test_sigterm_on_rank_zero_stops_both_gloo_ranks_at_one_step(tmp_path: Path) -> None:
    """The CPU twin of tests/test_multi_gpu.py's signal test (gloo: the flag's own group is WORLD).
    Only rank 0 gets SIGTERM; rank 1 must learn of it and stop after the same step."""
    import json

    stopper = json.dumps({"class_path": "tests.test_multi_gpu.SignalRankZero",
                          "init_args": {"out_dir": str(tmp_path), "at_step": 3}})
    proc = run_lit(["fit", "--config", str(CONFIGS / "quickstart.yaml"), *DDP,
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_val_batches=0",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_epochs=1",
                    "--test_after_fit=false", f"--trainer.callbacks+={stopper}"], timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 143, proc.stdout[-2000:] + proc.stderr[-3000:]
    stops = [json.loads((tmp_path / f"stop{r}.json").read_text()) for r in (0, 1)]
    assert stops[0] == stops[1] == {"step": 3, "exception": "StopRequested"}
    ckpt = next(tmp_path.rglob("last.ckpt"))
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 3
    assert "[lit] SIGTERM received" in out  # our handler ran, not Lightning's SIGTERMException
    assert "SIGTERM: checkpoint of step 3" in out
    assert "resume with: python -m lit fit" in out and f"--ckpt_path {ckpt}" in out
