"""Sharded (torch.distributed.checkpoint) checkpoints of TorchrecDDPStrategy, in real processes.

The reference is the same run checkpointed the other way, ``state_dict_type: full`` (every table
gathered whole into one file, which loads with plain ``torch.load``): a sharded checkpoint
written by 2 ranks and re-sharded into 1 process must validate to the same numbers, and resuming
from it for another epoch (fused optimizer state included) must end where resuming from the
full file ends. The 2-process runs use gloo on the CPU; tests/test_multi_gpu.py repeats this
with NCCL on two GPUs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from lit.checkpoints import META_FILE, check_checkpoint, is_sharded_checkpoint
from models.dlrm.strategy import TorchrecDDPStrategy
from tests.conftest import run_lit


def dlrm_config(tmp_path: Path, state_dict_type: str, devices: int, sharding: str) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": devices,
                    "strategy": {"class_path": "models.dlrm.strategy.TorchrecDDPStrategy",
                                 "init_args": {"state_dict_type": state_dict_type}},
                    "enable_progress_bar": False, "num_sanity_val_steps": 0,
                    "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs")}}},
        "model": {"class_path": "models.DLRMModule",
                  "init_args": {"embedding_dim": 8, "num_embeddings": 64,
                                "dense_arch_layer_sizes": [16], "over_arch_layer_sizes": [16],
                                "sharding_types": [sharding]}},
        "data": {"class_path": "datamodules.SyntheticCTR",
                 "init_args": {"batch_size": 64, "train_samples": 64 * 8,
                               "val_samples": 512, "test_samples": 256,
                               "cardinalities": [100, 50, 7, 300], "num_dense": 3}},
        "test_after_fit": False,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{state_dict_type}_{devices}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def val_logloss(output: str) -> float:
    match = re.search(r"val/logloss\s*│\s*([0-9.]+)", output)
    assert match, output[-3000:]
    return float(match.group(1))


def last_checkpoint(root: Path) -> Path:
    found = [p for p in root.rglob("last.ckpt")]
    assert len(found) == 1, found
    return found[0]


def test_strategy_registered_and_checks_its_argument() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry.get("torchrec_ddp").__class__ is TorchrecDDPStrategy
    assert StrategyRegistry.get("torchrec_ddp").state_dict_type == "sharded"
    with pytest.raises(ValueError, match="state_dict_type='fsdp'.*'sharded'"):
        TorchrecDDPStrategy(state_dict_type="fsdp")


def test_folder_that_is_not_a_sharded_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    assert not is_sharded_checkpoint(tmp_path / "run")
    with pytest.raises(ValueError, match="is a folder but not a sharded checkpoint"):
        check_checkpoint(tmp_path / "run")


@pytest.mark.slow
# torchrec plans row-wise sharding for CUDA only; tests/test_multi_gpu.py covers it on two GPUs.
@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_sharded_checkpoint_reshards_into_one_process(tmp_path: Path, sharding: str) -> None:
    runs = {}
    for kind in ("full", "sharded"):
        root = tmp_path / kind
        proc = run_lit(["fit", "--config", str(dlrm_config(root, kind, 2, sharding))], timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[kind] = last_checkpoint(root)
    full, sharded = runs["full"], runs["sharded"]
    assert full.is_file() and is_sharded_checkpoint(sharded)
    # One DCP file per rank; no rank wrote a whole table (each .distcp holds its shards only).
    assert len(list(sharded.glob("*.distcp"))) == 2
    meta = torch.load(sharded / META_FILE, weights_only=True)
    assert "state_dict" not in meta and meta["lit_module_class"].endswith("DLRMModule")
    assert check_checkpoint(sharded, "models.dlrm.module.DLRMModule")["epoch"] == 0

    # A plain DDP strategy cannot read the folder: one clear line.
    one = tmp_path / "one"
    refused = run_lit(["validate", "--config", str(dlrm_config(one, "full", 1, sharding)),
                       "--trainer.strategy=auto", f"--ckpt_path={sharded}"])
    assert refused.returncode == 2 and "--trainer.strategy torchrec_ddp" in refused.stderr

    # Both checkpoints loaded into ONE process (another world size): same validation numbers.
    losses = {}
    for kind, ckpt in runs.items():
        proc = run_lit(["validate", "--config", str(dlrm_config(one / kind, "sharded", 1, sharding)),
                        f"--ckpt_path={ckpt}"], timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        losses[kind] = val_logloss(proc.stdout)
    assert losses["sharded"] == pytest.approx(losses["full"], abs=1e-6)

    # Resume each for a second epoch in one process: the fused Adagrad state came back too, so
    # both end at the same loss (a lost momentum would give a different second epoch).
    ends = {}
    for kind, ckpt in runs.items():
        proc = run_lit(["fit", "--config", str(dlrm_config(one / f"resume_{kind}", "full", 1, sharding)),
                        "--trainer.max_epochs=2", f"--ckpt_path={ckpt}"], timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Restoring states from the checkpoint" in proc.stdout + proc.stderr
        ends[kind] = torch.load(last_checkpoint(one / f"resume_{kind}"), weights_only=True)
    for key, value in ends["full"]["state_dict"].items():
        torch.testing.assert_close(ends["sharded"]["state_dict"][key], value, rtol=0, atol=1e-6,
                                   msg=lambda m, k=key: f"{k}: {m}")
