"""Image classification on timm backbones (DeiT, ViT, Swin, ...).

PatchDropout (Liu et al., arXiv 2208.07220) is switched on with ``keep_rate < 1`` (or
``keep_rate_schedule: random``): at train time each image keeps a random subset of its patch
tokens (ViT/DeiT: :mod:`models.patch_dropout`; Swin: the structured rows x columns form of
:mod:`models.swin_patch_dropout`); validation, test and predict always see every patch.
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
    keep_rate_schedule: Literal["fixed", "random"] = "fixed",
    ordered: bool = True,
) -> nn.Module:
    """Create a timm model by name (or take the given module) and install PatchDropout in it.

    PatchDropout goes into ViT/DeiT's ``patch_drop`` slot or turns a Swin into
    :class:`models.swin_patch_dropout.PatchDropoutSwinTransformer`; neither adds parameters, so
    the state dict stays timm's.
    """
    if isinstance(backbone, nn.Module):
        model = backbone
    else:
        model = create_timm_model(backbone, num_classes, in_chans, img_size, pretrained, drop_path_rate)
    if keep_rate < 1.0 or keep_rate_schedule == "random":
        install_any_patch_dropout(model, keep_rate, keep_rate_schedule, ordered)
    return model


def create_timm_model(name: str, num_classes: int, in_chans: int, img_size: int | None,
                      pretrained: bool, drop_path_rate: float) -> nn.Module:
    """``timm.create_model`` with this project's tiny models registered and a clear error."""
    import timm

    import models.timm_tiny  # noqa: F401  (registers the 28x28 models)

    kwargs: dict = {"num_classes": num_classes, "in_chans": in_chans, "pretrained": pretrained}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        if "Unknown model" not in str(err):
            raise
        raise ValueError(
            f"backbone: timm has no model named {name!r}; list them with "
            f"`python -c \"import timm; print(timm.list_models('*deit*'))\"`"
        ) from err


def install_any_patch_dropout(model: nn.Module, keep_rate: float,
                              schedule: Literal["fixed", "random"], ordered: bool) -> nn.Module:
    """Install the PatchDropout that fits ``model`` (Swin or a ViT with a ``patch_drop`` slot)."""
    from timm.models.swin_transformer import SwinTransformer

    if isinstance(model, SwinTransformer):
        from models.swin_patch_dropout import install_swin_patch_dropout

        return install_swin_patch_dropout(model, keep_rate, schedule)
    from models.patch_dropout import install_patch_dropout

    return install_patch_dropout(model, keep_rate, schedule, ordered)


class ImageClassifier(LitModule):
    """Classifier on a timm backbone with optional PatchDropout.

    Args:
        backbone: a timm model name (``"deit_small_patch16_224"``) or an ``nn.Module``.
        num_classes: output classes (ignored when ``backbone`` is a module).
        in_chans: input channels (1 for Fashion-MNIST).
        img_size: input resolution, when it differs from the timm model's default.
        keep_rate: fraction of patch tokens kept at train time (1.0 = no PatchDropout). For Swin
            it is the fraction of rows and of columns kept per 7x7 window
            (``n = int(keep_rate * 7)``), so the token fraction is ``(n / 7) ** 2``.
        keep_rate_schedule: ``"fixed"`` (``keep_rate`` every step) or ``"random"``: the
            reference's per-step rate, 1.0 with probability 1/2, else ``1 - U{0..10}/20``.
        ordered: ViT/DeiT: keep the kept tokens in raster order (reference) rather than
            shuffled (timm). Swin always keeps the grid order.
        pretrained: load timm's pretrained weights (needs them in the local cache).
        drop_path_rate: stochastic depth rate.
        label_smoothing: cross-entropy label smoothing.
        mixup_alpha, cutmix_alpha: timm Mixup / CutMix strengths; 0 (the default) is off.
        throughput_every_n_steps: log ``train/images_per_s`` over windows of this many steps
            (synchronising the GPU once per window, so the number includes data loading).
        optimizer, lr_scheduler, lr_scheduler_interval: see :class:`lit.module.LitModule`.

    Logged at train time: ``train/loss``, ``train/acc``, ``train/images_per_s``,
    ``train/keep_rate`` and ``train/tokens_kept`` (patch tokens per image entering the first
    block; for Swin the first stage's tokens).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "deit_fmnist_tiny_patch4_28",
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int | None = None,
        keep_rate: float = 1.0,
        keep_rate_schedule: Literal["fixed", "random"] = "fixed",
        ordered: bool = True,
        pretrained: bool = False,
        drop_path_rate: float = 0.0,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        throughput_every_n_steps: int = 20,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval, monitor="val/loss")
        if not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate!r}")
        if keep_rate_schedule not in ("fixed", "random"):
            raise ValueError(f"keep_rate_schedule must be 'fixed' or 'random', got {keep_rate_schedule!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 (0 = off), got "
                             f"{mixup_alpha!r} and {cutmix_alpha!r}")
        if throughput_every_n_steps < 1:
            raise ValueError(f"throughput_every_n_steps must be >= 1, got {throughput_every_n_steps!r}")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.backbone = build_backbone(
            backbone, num_classes, in_chans, img_size, keep_rate, pretrained, drop_path_rate,
            keep_rate_schedule, ordered,
        )
        self.keep_rate = keep_rate
        self.label_smoothing = label_smoothing
        classes = getattr(self.backbone, "num_classes", num_classes)
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                               label_smoothing=label_smoothing, num_classes=classes)
        self.throughput_every_n_steps = throughput_every_n_steps
        self.train_acc = MulticlassAccuracy(classes, average="micro")
        self.val_acc = MulticlassAccuracy(classes, average="micro")
        self.test_acc = MulticlassAccuracy(classes, average="micro")
        self._window_start: float | None = None
        self._window_images = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.backbone(images)

    def optimizer_groups(self):
        from lit.module import decay_groups

        return decay_groups(self.backbone)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.mixup is not None:
            mixed, soft = self.mixup(images, labels)  # soft targets include label smoothing
            logits = self(mixed)
            loss = torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            logits = self(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        layer = getattr(self.backbone, "patch_drop", None)
        if getattr(layer, "last_tokens", None) is not None:
            self.log("train/keep_rate", float(layer.last_keep_rate))
            self.log("train/tokens_kept", float(layer.last_tokens))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Throughput over windows of steps: one device sync per window, not per step.
        self._window_images += batch[0].shape[0]
        if self._window_start is None or (batch_idx + 1) % self.throughput_every_n_steps == 0:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            if self._window_start is not None:
                self.log("train/images_per_s", self._window_images / max(now - self._window_start, 1e-9))
            self._window_start, self._window_images = now, 0

    def on_train_epoch_start(self) -> None:
        self._window_start, self._window_images = None, 0

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
