"""Every family on two GPUs with NCCL, from the CLI as a user runs it (``--trainer.devices 2
--trainer.strategy ddp``), and DLRM's tables sharded by torchrec across both GPUs.

NCCL refuses what gloo accepts (a CPU tensor in a collective), so these repeat the CPU (gloo)
tests of tests/test_ddp.py and tests/models/dlrm on real GPUs. They need two CUDA devices and are
marked ``gpu``: ``pytest -m gpu tests/test_multi_gpu.py``. Data: Fashion-MNIST from
``$LIT_FASHION_MNIST`` (default Debian's folder); the BERT test reads its texts and tokenizer from
``$LIT_TEXT_DATA`` / ``$LIT_TOKENIZER`` when set (a machine without the Python packages that
ship them).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from tests.conftest import CONFIGS, run_lit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

FMNIST = os.environ.get("LIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
GPU2 = ["--trainer.accelerator=gpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
GPU1 = ["--trainer.accelerator=gpu", "--trainer.devices=1"]
# NVLink multicast stays off in every process these tests start.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


def lit(args: list[str], timeout: int = 600):
    proc = run_lit(args, timeout=timeout, env=NCCL_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def metric(output: str, name: str) -> float:
    match = re.search(rf"{re.escape(name)}\s*│\s*([0-9.]+)", output)
    assert match, f"{name} not printed:\n{output[-2000:]}"
    return float(match.group(1))


class RankReport(Callback):
    """Per rank, at the end of training: the sample indices it trained on (CTR batches), the
    torchrec sharding plan, and which 2-D encoder weights are exactly 2:4 (BERT)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if hasattr(batch, "indices"):
            self.seen += batch.indices.tolist()

    def on_train_end(self, trainer, pl_module) -> None:
        from models.nm_sparsity import is_nm_sparse

        report: dict = {"seen": self.seen, "device": str(pl_module.device)}
        plan = getattr(getattr(pl_module, "model", None), "plan", None)
        if plan is not None:
            report["plan"] = {table: p.sharding_type for module in plan.plan.values()
                              for table, p in module.items()}
        report["nm"] = {name: bool(is_nm_sparse(p.detach(), 2, 4))
                        for name, p in pl_module.named_parameters()
                        if ".encoder." in name and name.endswith(".weight") and p.ndim == 2}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def last_logged(csv_root: Path, name: str) -> float:
    """The last value of ``name`` in the CSVLogger's metrics.csv under ``csv_root``."""
    import csv

    rows = list(csv.DictReader(next(csv_root.rglob("metrics.csv")).open()))
    values = [float(row[name]) for row in rows if row.get(name)]
    assert values, f"{name} never logged"
    return values[-1]


class SignalRankZero(Callback):
    """Sends SIGTERM to rank 0's own process (the one a scheduler or Ctrl-C reaches) after optimizer
    step ``at_step``; every rank writes the step it stopped at. Rank 1 gets no signal: it must
    learn of it through SignalCheckpoint's per-step agreement."""

    def __init__(self, out_dir: str, at_step: int) -> None:
        self.out_dir, self.at_step = Path(out_dir), at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 0 and trainer.global_step == self.at_step:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer, pl_module, exception) -> None:
        (self.out_dir / f"stop{trainer.global_rank}.json").write_text(json.dumps(
            {"step": trainer.global_step, "exception": type(exception).__name__}))


def reports(out_dir: Path) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


def report_callback(out_dir: Path) -> str:
    return json.dumps({"class_path": "tests.test_multi_gpu.RankReport",
                       "init_args": {"out_dir": str(out_dir)}})


def test_quickstart_two_gpus_validates_like_one(tmp_path: Path) -> None:
    """2 ranks x 2,500 validation images reduce to the 1-GPU numbers over all 5,000."""
    config = str(CONFIGS / "quickstart.yaml")
    data = f"--data.init_args.data_dir={FMNIST}"
    lit(["fit", "--config", config, *GPU2, data, f"--trainer.default_root_dir={tmp_path}",
         f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_epochs=1",
         "--trainer.limit_train_batches=40", "--test_after_fit=false"])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    common = ["validate", "--config", config, data, f"--ckpt_path={ckpt}", "--trainer.logger=false",
              "--data.init_args.batch_size=100"]
    one = lit([*common, *GPU1, f"--trainer.default_root_dir={tmp_path / 'one'}"])
    two = lit([*common, *GPU2, f"--trainer.default_root_dir={tmp_path / 'two'}"])
    assert metric(one.stdout, "val/acc") > 0.3
    assert metric(two.stdout, "val/acc") == pytest.approx(metric(one.stdout, "val/acc"), abs=2e-4)
    assert metric(two.stdout, "val/loss") == pytest.approx(metric(one.stdout, "val/loss"), rel=1e-3)


def test_deit_patchdropout_two_gpus(tmp_path: Path) -> None:
    proc = lit(["fit", "--config", str(CONFIGS / "vision" / "fmnist_deit_tiny_patchdropout.yaml"),
                *GPU2, f"--data.init_args.data_dir={FMNIST}", f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=30", "--trainer.limit_val_batches=10",
                "--trainer.limit_test_batches=5"])
    assert metric(proc.stdout, "test/acc") > 0.1


def test_bert_nm_pruning_two_gpus_masks_exact_on_both_ranks(tmp_path: Path) -> None:
    data = []
    if os.environ.get("LIT_TEXT_DATA"):
        data.append(f"--data.init_args.path={os.environ['LIT_TEXT_DATA']}")
    if os.environ.get("LIT_TOKENIZER"):
        data.append(f"--data.init_args.tokenizer={os.environ['LIT_TOKENIZER']}")
    lit(["fit", "--config", str(CONFIGS / "bert" / "tiny_smoke.yaml"), *GPU2, *data,
         f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
         "--trainer.max_epochs=2", "--trainer.limit_test_batches=2",
         f"--trainer.callbacks+={report_callback(tmp_path)}"])
    for report in reports(tmp_path):
        assert report["device"].startswith("cuda") and report["nm"]
        assert all(report["nm"].values()), report["nm"]


def dlrm_config(tmp_path: Path, sharding: list[str] | None, state_dict_type: str = "sharded") -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "gpu", "devices": 2,
                    "strategy": {"class_path": "models.dlrm.strategy.TorchrecDDPStrategy",
                                 "init_args": {"state_dict_type": state_dict_type}},
                    "enable_progress_bar": False, "num_sanity_val_steps": 0,
                    "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs")}},
                    "callbacks": [json.loads(report_callback(tmp_path))]},
        "model": {"class_path": "models.DLRMModule",
                  "init_args": {"embedding_dim": 16, "num_embeddings": 4096,
                                "dense_arch_layer_sizes": [64, 16], "over_arch_layer_sizes": [64, 1],
                                "sharding_types": sharding}},
        "data": {"class_path": "datamodules.SyntheticCTR",
                 "init_args": {"batch_size": 512, "train_samples": 512 * 20 + 100,
                               "val_samples": 4096, "test_samples": 2048,
                               "cardinalities": [5000, 3000, 100, 20000], "num_dense": 13}},
        "test_after_fit": True,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "dlrm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_dlrm_plain_ddp_flag_runs_sharded_single_epoch_exactly_once(tmp_path: Path) -> None:
    """``--trainer.strategy ddp`` (what a user types) becomes torchrec_ddp; the planner's own
    choice of sharding; validation and test reduce on the GPUs; each sample trains once."""
    config = dlrm_config(tmp_path, None)
    proc = lit(["fit", "--config", str(config), "--trainer.strategy=ddp"])
    assert "runs as torchrec_ddp" in proc.stdout + proc.stderr
    assert 0.0 < metric(proc.stdout, "test/auroc") <= 1.0
    ranks = reports(tmp_path)
    assert all(r["device"].startswith("cuda") for r in ranks)
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 512 * 10
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(512 * 20))


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "column_wise"])
def test_dlrm_forced_sharding_and_sharded_checkpoint_on_one_gpu(tmp_path: Path, sharding: str) -> None:
    """Forced sharding is what torchrec plans; the DCP checkpoint written by 2 GPUs validates to
    the numbers the run itself logged for those weights, on 1 GPU (re-sharded) and on 2."""
    config = dlrm_config(tmp_path, [sharding])
    lit(["fit", "--config", str(config), "--test_after_fit=false"])
    ranks = reports(tmp_path)
    assert set(ranks[0]["plan"].values()) == {sharding}, ranks[0]["plan"]
    ckpt = next(tmp_path.rglob("last.ckpt"))
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2
    logged = last_logged(tmp_path / "runs", "val/logloss")  # the run's own validation
    values = {}
    for devices in (1, 2):
        proc = lit(["validate", "--config", str(config), f"--trainer.devices={devices}",
                    f"--ckpt_path={ckpt}", "--trainer.logger=false",
                    f"--trainer.default_root_dir={tmp_path / str(devices)}"])
        values[devices] = metric(proc.stdout, "val/logloss")
    assert values[1] == pytest.approx(values[2], rel=1e-4)
    assert values[2] == pytest.approx(logged, rel=1e-4)
    # Resume on 2 GPUs for a second epoch from the sharded files.
    lit(["fit", "--config", str(config), "--trainer.max_epochs=2", f"--ckpt_path={ckpt}",
         "--test_after_fit=false", f"--trainer.default_root_dir={tmp_path / 'resumed'}"])


def test_sigterm_on_rank_zero_stops_both_ranks_at_one_step_with_a_checkpoint(tmp_path: Path) -> None:
    stopper = json.dumps({"class_path": "tests.test_multi_gpu.SignalRankZero",
                          "init_args": {"out_dir": str(tmp_path), "at_step": 8}})
    proc = run_lit(["fit", "--config", str(CONFIGS / "quickstart.yaml"), *GPU2,
                    f"--data.init_args.data_dir={FMNIST}", f"--trainer.default_root_dir={tmp_path}",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_epochs=1",
                    "--test_after_fit=false", f"--trainer.callbacks+={stopper}"],
                   timeout=600, env=NCCL_ENV)
    assert proc.returncode == 143, proc.stdout[-2000:] + proc.stderr[-3000:]
    stops = [json.loads((tmp_path / f"stop{r}.json").read_text()) for r in (0, 1)]
    assert stops[0] == stops[1] == {"step": 8, "exception": "StopRequested"}
    ckpt = next(tmp_path.rglob("last.ckpt"))
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 8
    out = proc.stdout + proc.stderr
    assert "SIGTERM: checkpoint of step 8" in out
    assert "resume with: python -m lit fit" in out and f"--ckpt_path {ckpt}" in out
