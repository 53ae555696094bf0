"""BudgetEvaluator: each point's validation accuracy is the module's own scoring of the held-out
split (against float64 by hand and the Trainer's validation), with the clock paused; the test
accuracy is copied into the last point; a model that is not a classifier is refused."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.budget_evaluator import BudgetEvaluator
from models.image_classifier import ImageClassifier


class Blobs(L.LightningDataModule):
    """Three Gaussian blobs as 1x4x4 images: train, validation and test splits of tensors."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(3, 16, generator=g)

        def split(n: int) -> TensorDataset:
            labels = torch.randint(0, 3, (n,), generator=g)
            images = (centers[labels] + 1.5 * torch.randn(n, 16, generator=g)).view(n, 1, 4, 4)
            return TensorDataset(images, labels)

        self.train, self.val, self.test = split(192), split(96), split(64)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=32)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=32)


def test_points_hold_the_modules_own_validation_accuracy(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(backbone=nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), num_classes=3,
                            optimizer=partial(torch.optim.SGD, lr=0.05))
    data = Blobs()
    path = tmp_path / "points.json"
    evaluator = BudgetEvaluator(str(path), run="blobs", eval_every_s=1e9)  # epoch ends only
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[evaluator])
    trainer.fit(model, data)
    trainer.test(model, data, verbose=False)
    points = json.loads(path.read_text())
    assert [(p["epochs"], p["steps"], p["at_epoch_end"]) for p in points] == [(1.0, 6, True), (2.0, 12, True)]
    assert points[0]["val_acc"] != points[1]["val_acc"]  # the model learned between the two

    model.eval()
    with torch.no_grad():
        images, labels = data.val.tensors
        by_hand = float((model(images).double().argmax(-1) == labels).double().mean())
    assert points[-1]["val_acc"] == round(by_hand, 4)
    validator = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    validated = validator.validate(model, data, verbose=False)[0]["val/acc"]
    assert points[-1]["val_acc"] == round(validated, 4)
    assert points[-1]["test_acc"] == round(float(trainer.callback_metrics["test/acc"]), 4)
    assert points[-1]["params"] == 16 * 3 + 3 and points[-1]["train_s"] > 0


def test_a_model_that_is_not_a_classifier_is_refused(tmp_path):
    with pytest.raises(ValueError, match="BudgetEvaluator: needs a classifier .* got Linear"):
        BudgetEvaluator(str(tmp_path / "p.json")).on_train_start(None, nn.Linear(2, 2))
