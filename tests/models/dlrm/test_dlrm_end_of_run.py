"""What happens when a DLRM run ends: under ``torchrec_ddp`` the module stays on its device after
fit and test (Lightning's strategies copy it to the CPU), unless ``teardown_to_cpu``; and the GPU
config writes one sharded checkpoint at the end, which ``last.ckpt`` links to.

On the CPU (one gloo process) "its device" is the CPU itself, where a copy to the CPU changes no
tensor: the tests therefore watch for the copy itself (``module.cpu()``, which Lightning's
teardown calls), and the GPU tests check the tables' device (tests/models/dlrm/test_dlrm_gpu.py).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from datamodules.ctr.synthetic import SyntheticCTR
from lit.checkpoints import is_sharded_checkpoint
from models.dlrm.module import DLRMModule
from models.dlrm.strategy import TorchrecDDPStrategy

TINY = dict(embedding_dim=4, num_embeddings=50, dense_arch_layer_sizes=[6],
            over_arch_layer_sizes=[5])
SYN = dict(cardinalities=[30, 200, 5], num_dense=3, val_samples=256, test_samples=256)


class RecordsCopies(DLRMModule):
    """A DLRMModule that records each call of ``cpu()`` (Lightning's teardown copy)."""

    def cpu(self):
        self.copies = getattr(self, "copies", 0) + 1
        return super().cpu()


@pytest.mark.parametrize("strategy", ["torchrec_ddp", "torchrec_ddp_to_cpu", "single_device"])
def test_module_stays_on_its_device_after_fit_and_test(tmp_path: Path, strategy: str) -> None:
    chosen = {"torchrec_ddp": TorchrecDDPStrategy(),
              "torchrec_ddp_to_cpu": TorchrecDDPStrategy(teardown_to_cpu=True),
              "single_device": "auto"}[strategy]
    model = RecordsCopies(**TINY)
    trainer = L.Trainer(strategy=chosen, accelerator="cpu", devices=1, max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    dm = SyntheticCTR(batch_size=64, train_samples=64 * 3, **SYN)
    trainer.fit(model, dm)
    after_fit = getattr(model, "copies", 0)
    trainer.test(model, dm, verbose=False)
    copies = getattr(model, "copies", 0)
    # Lightning's own strategies copy after every run: the reference that the check can see it.
    expected = {"torchrec_ddp": (0, 0), "torchrec_ddp_to_cpu": (1, 2),
                "single_device": (1, 2)}[strategy]
    assert (after_fit, copies) == expected
    assert trainer.callback_metrics["test/logloss"] > 0


def test_gpu_config_writes_one_sharded_checkpoint_that_last_links_to(tmp_path: Path) -> None:
    """configs/dlrm/synthetic_gpu.yaml, shrunk, on the CPU: torchrec_ddp's sharded (DCP) folder
    written once at the epoch's end, ``last.ckpt`` a link to it (not a second copy)."""
    from lit.cli import main

    main(["fit", "--config", "configs/dlrm/synthetic_gpu.yaml", "--trainer.accelerator=cpu",
          f"--trainer.default_root_dir={tmp_path}",
          f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
          "--trainer.callbacks=[{class_path: callbacks.EvalAtSamples, "
          "init_args: {at_samples: [256]}}]",
          "--model.init_args.embedding_dim=4", "--model.init_args.num_embeddings=32",
          "--model.init_args.dense_arch_layer_sizes=[8]",
          "--model.init_args.over_arch_layer_sizes=[8]",
          "--data.init_args.batch_size=64", "--data.init_args.eval_batch_size=128",
          "--data.init_args.train_samples=256", "--data.init_args.val_samples=256",
          "--data.init_args.test_samples=128", "--data.init_args.cardinalities=[40, 20, 7]",
          "--data.init_args.num_dense=3"])
    folders = [p for p in tmp_path.rglob("*.ckpt") if not p.is_symlink()]
    links = [p for p in tmp_path.rglob("last.ckpt")]
    assert len(folders) == 1 and is_sharded_checkpoint(folders[0]), folders
    assert len(links) == 1 and links[0].is_symlink()
    assert links[0].resolve() == folders[0].resolve() and is_sharded_checkpoint(links[0])
