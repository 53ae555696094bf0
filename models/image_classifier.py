"""Image classification on timm backbones (DeiT, ViT, Swin, ...).

PatchDropout (Liu et al., arXiv 2208.07220) is switched on with ``keep_rate < 1`` (or
``keep_rate_schedule: random``): at train time each image keeps a random subset of its patch
tokens (ViT/DeiT: :mod:`models.patch_dropout`; Swin: the structured rows x columns form of
:mod:`models.swin_patch_dropout`); validation, test and predict always see every patch.
"""

from __future__ import annotations

import time
from typing import Literal

import timm
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.data import Mixup, resolve_model_data_config
from timm.models.swin_transformer import SwinTransformer
from torch import nn
from typing_extensions import override

import models.timm_tiny  # noqa: F401  (registers the 28x28 models)
from lit.module import decay_groups, default_optimizer
from models.classifier import ClassifierModule
from models.patch_dropout import install_patch_dropout
from models.swin_patch_dropout import install_swin_patch_dropout


def build_backbone(backbone: str | nn.Module, num_classes: int, in_chans: int, img_size: int | None,
                   keep_rate: float, pretrained: bool, drop_path_rate: float,
                   keep_rate_schedule: Literal["fixed", "random"] = "fixed", ordered: bool = True) -> nn.Module:
    """Create a timm model by name (or take the given module) and install PatchDropout in it.

    PatchDropout goes into ViT/DeiT's ``patch_drop`` slot or turns a Swin into
    :class:`models.swin_patch_dropout.PatchDropoutSwinTransformer`; neither adds parameters, so
    the state dict stays timm's. Only a fixed keep rate of exactly 1.0 leaves the model as it is;
    every other value goes to the layer, which checks it.
    """
    model = backbone if isinstance(backbone, nn.Module) else \
        create_timm_model(backbone, num_classes, in_chans, img_size, pretrained, drop_path_rate)
    if keep_rate != 1.0 or keep_rate_schedule != "fixed":
        install_any_patch_dropout(model, keep_rate, keep_rate_schedule, ordered)
    return model


def install_any_patch_dropout(model: nn.Module, keep_rate: float, schedule: Literal["fixed", "random"],
                              ordered: bool) -> nn.Module:
    """Install the PatchDropout that fits ``model`` (Swin or a ViT with a ``patch_drop`` slot)."""
    if isinstance(model, SwinTransformer):
        return install_swin_patch_dropout(model, keep_rate, schedule)
    return install_patch_dropout(model, keep_rate, schedule, ordered)


def create_timm_model(name: str, num_classes: int, in_chans: int, img_size: int | None,
                      pretrained: bool, drop_path_rate: float) -> nn.Module:
    """``timm.create_model`` with this project's tiny models registered and a clear error."""
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
        raise ValueError(f"backbone: timm has no model named {name!r}; list them with "
                         f"`python -c \"import timm; print(timm.list_models('*deit*'))\"`") from err


def example_images(model: nn.Module) -> torch.Tensor:
    """One zero image ``(1, C, H, W)`` of the size ``model`` takes (for the model summary's FLOPs)."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None) is not None:
        return torch.zeros(1, embed.proj.in_channels, *embed.img_size)
    return torch.zeros(1, *resolve_model_data_config(model)["input_size"])


class ImageClassifier(ClassifierModule):
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
    block; for Swin the first stage's tokens). The model summary's FLOPs are those of one
    full-size image in eval mode (every patch).
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
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 (0 = off), got "
                             f"{mixup_alpha!r} and {cutmix_alpha!r}")
        if throughput_every_n_steps < 1:
            raise ValueError(f"throughput_every_n_steps must be >= 1, got {throughput_every_n_steps!r}")
        net = build_backbone(backbone, num_classes, in_chans, img_size, keep_rate, pretrained,
                             drop_path_rate, keep_rate_schedule, ordered)
        classes = getattr(net, "num_classes", num_classes)
        super().__init__(classes, label_smoothing, optimizer, lr_scheduler, lr_scheduler_interval)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.backbone = net
        self.example_input_array = example_images(net)
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing,
                           num_classes=classes) if mixup_alpha > 0 or cutmix_alpha > 0 else None
        self.throughput_every_n_steps = throughput_every_n_steps
        self._window_start: float | None = None
        self._window_images = 0

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.backbone(images)

    @override
    def optimizer_groups(self) -> list[dict]:
        return decay_groups(self.backbone)

    @override
    def split_batch(self, batch) -> tuple[tuple[torch.Tensor], torch.Tensor | None]:
        if isinstance(batch, torch.Tensor):
            return (batch,), None
        return (batch[0],), (batch[1] if len(batch) > 1 else None)

    @override
    def training_loss(self, inputs: tuple[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is None:
            return super().training_loss(inputs, labels)
        mixed, soft = self.mixup(inputs[0], labels)  # soft targets include label smoothing
        logits = self(mixed)
        return logits, torch.sum(-soft * logits.log_softmax(dim=-1), dim=-1).mean()

    @override
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        layer = getattr(self.backbone, "patch_drop", None)
        if getattr(layer, "last_tokens", None) is not None:
            self.log("train/keep_rate", float(layer.last_keep_rate))
            self.log("train/tokens_kept", float(layer.last_tokens))
        return loss

    @override
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

    @override
    def on_train_epoch_start(self) -> None:
        self._window_start, self._window_images = None, 0
