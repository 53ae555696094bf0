"""The steps shared by :class:`models.ImageClassifier` and :class:`models.BertClassifier`:
label-smoothed cross-entropy, torchmetrics accuracy per stage, argmax predictions. Subclasses
split batches (:meth:`ClassifierModule.split_batch`), may replace the training loss (mixup) and
set ``example_input_array`` so that the model summary shows FLOPs."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.utils.flop_counter import flop_registry
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lit.module import LitModule, default_optimizer

# The model summary counts FLOPs with torch's FlopCounterMode, which knows the CUDA attention
# kernels but not the CPU one: without this, a summary on the CPU leaves attention out.
flop_registry.setdefault(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                         flop_registry[torch.ops.aten._scaled_dot_product_flash_attention])


class ClassifierModule(LitModule):
    """Base class of the classifiers: steps, loss and accuracy (``{train,val,test}/{loss,acc}``).

    Args:
        num_classes: classes of the accuracy metrics.
        label_smoothing: cross-entropy label smoothing at train time, in [0, 1).
        optimizer, lr_scheduler, lr_scheduler_interval: see :class:`lit.module.LitModule`.
    """

    def __init__(
        self,
        num_classes: int,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval, monitor="val/loss")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = label_smoothing
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def split_batch(self, batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """``(forward inputs, labels)`` of a batch; labels ``None`` for unlabelled predict batches."""
        raise NotImplementedError

    def training_loss(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, loss)`` of a training batch: label-smoothed cross-entropy."""
        logits = self(*inputs)
        return logits, F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    @override
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, labels = self.split_batch(batch)
        logits, loss = self.training_loss(inputs, labels)
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    @override
    def validation_step(self, batch, batch_idx: int) -> None:
        self.evaluate(batch, "val", self.val_acc)

    @override
    def test_step(self, batch, batch_idx: int) -> None:
        self.evaluate(batch, "test", self.test_acc)

    @override
    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self(*self.split_batch(batch)[0]).argmax(dim=-1)

    def evaluate(self, batch, stage: str, metric: MulticlassAccuracy) -> None:
        """Plain cross-entropy (no smoothing) and accuracy of an evaluation batch."""
        inputs, labels = self.split_batch(batch)
        logits = self(*inputs)
        metric(logits, labels)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), sync_dist=True,
                 prog_bar=stage == "val", batch_size=len(labels))
        self.log(f"{stage}/acc", metric, prog_bar=True, batch_size=len(labels))
