"""Image classification on timm backbones (DeiT, ViT, Swin, ...).

PatchDropout (Liu et al., arXiv 2208.07220) is switched on with ``keep_rate < 1``: at train time
each image keeps a random subset of its patch tokens; validation, test and predict always see
every patch.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lit.module import LitModule, default_optimizer


def build_backbone(
    backbone: str | nn.Module,
    num_classes: int,
    in_chans: int,
    img_size: int | None,
    keep_rate: float,
    pretrained: bool,
    drop_path_rate: float,
) -> nn.Module:
    """Create a timm model by name (or take the given module as it is)."""
    if isinstance(backbone, nn.Module):
        return backbone
    import timm

    import models.timm_tiny  # noqa: F401  (registers the 28x28 models)

    kwargs: dict = {"num_classes": num_classes, "in_chans": in_chans, "pretrained": pretrained}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if keep_rate < 1.0:
        kwargs["patch_drop_rate"] = 1.0 - keep_rate
    try:
        return timm.create_model(backbone, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise ValueError(
            f"backbone: timm has no model named {backbone!r}; list them with "
            f"`python -c \"import timm; print(timm.list_models('*deit*'))\"`"
        ) from err


class ImageClassifier(LitModule):
    """Classifier on a timm backbone with optional PatchDropout.

    Args:
        backbone: a timm model name (``"deit_small_patch16_224"``) or an ``nn.Module``.
        num_classes: output classes (ignored when ``backbone`` is a module).
        in_chans: input channels (1 for Fashion-MNIST).
        img_size: input resolution, when it differs from the timm model's default.
        keep_rate: fraction of patch tokens kept at train time (1.0 = no PatchDropout).
        pretrained: load timm's pretrained weights (needs them in the local cache).
        drop_path_rate: stochastic depth rate.
        label_smoothing: cross-entropy label smoothing.
        optimizer, lr_scheduler, lr_scheduler_interval: see :class:`lit.module.LitModule`.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "deit_fmnist_tiny_patch4_28",
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int | None = None,
        keep_rate: float = 1.0,
        pretrained: bool = False,
        drop_path_rate: float = 0.0,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval, monitor="val/loss")
        if not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.backbone = build_backbone(
            backbone, num_classes, in_chans, img_size, keep_rate, pretrained, drop_path_rate
        )
        self.keep_rate = keep_rate
        self.label_smoothing = label_smoothing
        classes = getattr(self.backbone, "num_classes", num_classes)
        self.train_acc = MulticlassAccuracy(classes, average="micro")
        self.val_acc = MulticlassAccuracy(classes, average="micro")
        self.test_acc = MulticlassAccuracy(classes, average="micro")
        self._step_start: float | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.backbone(images)

    def optimizer_groups(self):
        from lit.module import decay_groups

        return decay_groups(self.backbone)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._step_start is not None:
            elapsed = time.perf_counter() - self._step_start
            self.log("train/images_per_s", batch[0].shape[0] / max(elapsed, 1e-9))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).argmax(dim=-1)

    def _eval_step(self, batch, stage: str, metric: MulticlassAccuracy) -> None:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        metric(logits, labels)
        self.log(f"{stage}/loss", loss, sync_dist=True, prog_bar=stage == "val")
        self.log(f"{stage}/acc", metric, prog_bar=True)
