"""EvalAtSamples: a point is the module's own validation scoring (the last one equals the
Trainer's epoch-end ``val/*`` and scikit-learn on the module's predictions), and evaluating at a
point writes no checkpoint."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.eval_at_samples import EvalAtSamples
from datamodules.ctr.synthetic import SyntheticCTR
from models.dlrm.module import DLRMModule

TINY = dict(embedding_dim=4, num_embeddings=8, dense_arch_layer_sizes=[6], over_arch_layer_sizes=[5])


def test_points_are_the_modules_validation_and_write_no_checkpoint(tmp_path):
    from sklearn.metrics import log_loss, roc_auc_score

    data = SyntheticCTR(batch_size=128, train_samples=128 * 8, val_samples=512, test_samples=128,
                        cardinalities=[30, 200, 5], num_dense=3)
    evals = EvalAtSamples(at_samples=[384, 1024])  # after steps 3 and 8
    # Saves at every validation end (validation every 4 steps): at steps 4 and 8, never at 3.
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, val_check_interval=4, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path, callbacks=[evals, checkpoints])
    model = DLRMModule(**TINY)
    trainer.fit(model, data)
    assert [h["samples"] for h in evals.history] == [384, 1024]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=4.ckpt", "step=8.ckpt"]

    last = evals.history[-1]  # the weights of the epoch-end validation: same numbers
    for name in ("logloss", "auroc", "ne", "calibration", "base_rate"):
        assert last[name] == pytest.approx(float(trainer.callback_metrics[f"val/{name}"]), rel=1e-6), name
    model.eval()
    with torch.no_grad():
        scored = [(torch.sigmoid(model(b)).double(), b.labels.double()) for b in data.val_dataloader()]
    p, y = (torch.cat(t).numpy() for t in zip(*scored))
    assert last["logloss"] == pytest.approx(log_loss(y, p), rel=1e-5)
    assert last["auroc"] == pytest.approx(roc_auc_score(y, p), rel=1e-5)
    assert last["base_rate"] == pytest.approx(y.mean(), rel=1e-6)
