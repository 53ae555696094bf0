"""DLRMModule in 2 processes on the CPU (gloo): torchrec shards the tables across ranks, Lightning
launches the processes (TorchrecDDPStrategy), and each sample is trained on exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Callback

from tests.conftest import cli_args, run_lit


class DumpIndices(Callback):
    """Writes the sample indices each rank trained on to ``out_dir/rank<R>.txt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += batch.indices.tolist()

    def on_train_end(self, trainer, pl_module) -> None:
        (self.out_dir / f"rank{trainer.global_rank}.txt").write_text(
            " ".join(map(str, self.seen)))


@pytest.mark.slow
def test_two_process_gloo_fit_shards_tables_and_samples(tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 2,
                    "strategy": {"class_path": "models.dlrm.strategy.TorchrecDDPStrategy",
                                 "init_args": {"state_dict_type": "full"}},
                    "enable_progress_bar": False, "num_sanity_val_steps": 0,
                    "callbacks": [{"class_path": "tests.models.dlrm.test_dlrm_ddp.DumpIndices",
                                   "init_args": {"out_dir": str(tmp_path)}}]},
        "model": {"class_path": "models.DLRMModule",
                  "init_args": {"embedding_dim": 8, "num_embeddings": 64,
                                "dense_arch_layer_sizes": [16], "over_arch_layer_sizes": [16],
                                "sharding_types": ["table_wise"]}},
        "data": {"class_path": "datamodules.SyntheticCTR",
                 "init_args": {"batch_size": 64, "train_samples": 64 * 10 + 30,
                               "val_samples": 256, "test_samples": 256,
                               "cardinalities": [100, 50, 7, 300], "num_dense": 3}},
        "test_after_fit": True,
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_lit(cli_args("fit", "--config", str(path), tmp_path=tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [list(map(int, (tmp_path / f"rank{r}.txt").read_text().split())) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 64 * 5     # equal steps per rank
    assert sorted(ranks[0] + ranks[1]) == list(range(64 * 10))  # each sample once
    assert "test/auroc" in proc.stdout + proc.stderr
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts
    import torch

    saved = torch.load(ckpts[0], weights_only=True)
    # Tables gathered whole from both ranks into the plain-tensor checkpoint, fused state too.
    key = "sparse_arch.embedding_bag_collection.embedding_bags.t_cat_3.weight"
    assert saved["state_dict"][f"model.{key}"].shape == (64, 8)
    assert saved["optimizer_states"][0]["fused"][key]["t_cat_3.momentum1"].abs().sum() > 0
    # Resume in 2 processes: each rank copies its own shards back from the full tensors.
    proc = run_lit(cli_args("fit", "--config", str(path), "--trainer.max_epochs=2",
                            f"--ckpt_path={ckpts[0]}", tmp_path=tmp_path / "resumed"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Restoring states from the checkpoint" in proc.stdout + proc.stderr
