"""RunSummary: the JSON a scaling sweep reads, checked against the module's own float64
progressive loss and logged test metrics; the prefix lookup by hand; bad arguments."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest

from callbacks.eval_at_samples import EvalAtSamples
from callbacks.run_summary import RunSummary, progressive_at
from datamodules.ctr.synthetic import SyntheticCTR
from models.dlrm.metrics import normalized_entropy
from models.dlrm.module import DLRMModule

TINY = dict(embedding_dim=4, num_embeddings=8, dense_arch_layer_sizes=[6], over_arch_layer_sizes=[5])
SYN = dict(cardinalities=[30, 200, 5], num_dense=3, val_samples=256, test_samples=256)


def test_progressive_at_by_hand():
    cumulative = [(100, 70.0, 20.0), (200, 130.0, 50.0), (300, 180.0, 75.0)]
    assert progressive_at(cumulative, 200) == (0.65, 0.25)
    assert progressive_at(cumulative, 250) == (0.65, 0.25)  # the last batch end at or before
    assert progressive_at(cumulative, 1000) == (0.6, 0.25)
    assert all(math.isnan(v) for v in progressive_at(cumulative, 99))


def test_summary_matches_the_module_and_logged_metrics(tmp_path):
    path = tmp_path / "out" / "summary.json"
    data = SyntheticCTR(batch_size=128, train_samples=128 * 8, **SYN)
    model = DLRMModule(**TINY)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[EvalAtSamples(at_samples=[256, 1024]), RunSummary(str(path))])
    trainer.fit(model, data)
    progressive = float(trainer.callback_metrics["train/progressive_loss"])  # module, float64
    trainer.test(model, data)
    got = json.loads(path.read_text())
    assert got["train_logloss"] == pytest.approx(progressive, rel=1e-6)
    assert got["samples_seen"] == 1024
    assert got["embedding_parameters"] == (8 + 8 + 5) * 4 == model.size_report["embedding_parameters"]
    assert got["dense_parameters"] == model.size_report["dense_parameters"]
    assert got["test_ne"] == pytest.approx(float(trainer.callback_metrics["test/ne"]))
    assert got["test_logloss"] == pytest.approx(float(trainer.callback_metrics["test/logloss"]))
    assert got["train_s"] > 0 and not got["interrupted"]
    points = got["eval_at"]
    assert [p["samples"] for p in points] == [256, 1024]
    assert points[-1]["train_logloss"] == pytest.approx(progressive, rel=1e-6)
    labels = [float(b.labels.mean()) for b in data.train_dataloader()]  # equal-size batches
    base_rate = sum(labels) / len(labels)
    assert got["train_ne"] == pytest.approx(normalized_entropy(progressive, base_rate), rel=1e-6)
    assert not list(path.parent.glob("*.tmp"))


def test_empty_path_is_rejected():
    with pytest.raises(ValueError, match="RunSummary.path"):
        RunSummary("")
