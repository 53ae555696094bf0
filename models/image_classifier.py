"""Image classification on timm backbones (DeiT, ViT, Swin, ...).

PatchDropout (Liu et al., arXiv 2208.07220) is switched on with ``keep_rate < 1`` (or
``keep_rate_schedule: random``): at train time each image keeps a random subset of its patch
tokens (ViT/DeiT: :mod:`models.patch_dropout`; Swin: the structured rows x columns form of
:mod:`models.swin_patch_dropout`); validation, test and predict always see every patch.

``compile`` runs the backbone through ``torch.compile``: the whole backbone, PatchDropout
included, or each transformer block (``compile_scope``), with inductor's caches in
``compile_cache_dir``; see :mod:`models.compile_backbone`.
"""

from __future__ import annotations

import time
from typing import Literal

import timm
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from timm.data import Mixup, resolve_model_data_config
from timm.models.swin_transformer import SwinTransformer
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from typing_extensions import override

import models.timm_tiny  # noqa: F401  (registers the 28x28 models)
from lit.module import decay_groups, default_optimizer
from models.classifier import ClassifierModule
from models.compile_backbone import (
    COMPILE_MODES,
    COMPILE_SCOPES,
    DEFAULT_COMPILE_SCOPE,
    CompileMode,
    CompileScope,
    CompileWatch,
    compile_backbone,
    compiled_scope,
    configure_compile_cache,
    describe_cache,
)
from models.patch_dropout import PatchDropout, install_patch_dropout, keep_count
from models.swin_patch_dropout import SwinPatchDropout, install_swin_patch_dropout, kept_window_size

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


def draw_patch_dropout(model: nn.Module, image_hw: tuple[int, int]) -> float | None:
    """Draw the keep rate of the next training step of ``model``'s PatchDropout (outside any
    compiled region) and record ``last_keep_rate`` / ``last_tokens`` as the eager layer would;
    ``None`` when ``model`` has no PatchDropout."""
    layer = getattr(model, "patch_drop", None)
    if not isinstance(layer, (PatchDropout, SwinPatchDropout)):
        return None
    rate = layer.draw()
    patch = model.patch_embed.patch_size
    patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
    grid = (image_hw[0] // patch[0], image_hw[1] // patch[1])
    if isinstance(layer, SwinPatchDropout):
        n, w = kept_window_size(rate, layer.window), layer.window
        tokens = grid[0] * grid[1] if n >= w else (grid[0] // w * n) * (grid[1] // w * n)
    else:
        tokens = min(keep_count(grid[0] * grid[1], rate), grid[0] * grid[1])
    layer.last_keep_rate, layer.last_tokens = rate, tokens
    return rate


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
        compile: ``torch.compile`` the backbone: ``false`` (eager), ``true`` (default mode) or a
            mode (``"reduce-overhead"`` = CUDA graphs, ``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``). One graph per keep count (the random schedule: at
            most 11) plus one for eval; the state dict is unchanged.
        compile_backend: ``"inductor"`` (code generation), or ``"aot_eager"`` / ``"eager"`` to
            trace only (checks the graph quickly on a CPU).
        compile_dynamic: ``torch.compile(dynamic=...)``; ``false`` specialises each keep count
            and batch size (fastest kernels), ``true`` makes the batch size symbolic (ViT/DeiT;
            tracing Swin's structured drop symbolically takes minutes).
        compile_scope: ``"model"`` (the whole backbone, PatchDropout inside the graph) or
            ``"blocks"`` (each transformer block; identical blocks share one graph, so the first
            compile is about depth times shorter; PatchDropout, patch embedding and head run
            eager). Backbones without a ``blocks`` sequence (Swin) compile whole either way.
        compile_cache_dir: where inductor's FX graph and AOTAutograd caches live (both on), so a
            second run of the same configuration loads its graphs instead of compiling them;
            ``null`` keeps torch's default (``TORCHINDUCTOR_CACHE_DIR``, else
            ``<tmp>/torchinductor_<user>``). The directory applies to the whole process.
        optimizer, lr_scheduler, lr_scheduler_interval: see :class:`lit.module.LitModule`.

    Logged at train time: ``train/loss``, ``train/acc``, ``train/images_per_s``,
    ``train/keep_rate`` and ``train/tokens_kept`` (patch tokens per image entering the first
    block; for Swin the first stage's tokens). The model summary's FLOPs are those of one
    full-size image in eval mode (every patch). When compiled, the log names the scope and the
    cache directory, and gives the seconds of the first step of every graph (a new keep count
    or batch size: compile or cache load) with the cache hits and misses it caused; the same
    records are in ``compile_records``.
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
        compile: bool | CompileMode = False,
        compile_backend: str = "inductor",
        compile_dynamic: bool = False,
        compile_scope: CompileScope = DEFAULT_COMPILE_SCOPE,
        compile_cache_dir: str | None = None,
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
        if compile is not True and compile is not False and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be false, true or one of {COMPILE_MODES}, got {compile!r}")
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {compile_scope!r}")
        if compile_cache_dir is not None and (not isinstance(compile_cache_dir, str) or not compile_cache_dir.strip()):
            raise ValueError(f"compile_cache_dir must be a directory path or null (torch's default), "
                             f"got {compile_cache_dir!r}")
        self.compiled = compile is not False
        self._compile_watch = CompileWatch() if self.compiled else None
        self._compile_summary: str | None = None  # logged, and the cache set up, at the first forward
        self._compile_cache = (compile_backend == "inductor", compile_cache_dir)
        if self.compiled:
            what = compiled_scope(net, compile_scope, compile)  # before compile_backbone changes the blocks
            compile_backbone(net, compile, compile_backend, compile_dynamic, compile_scope)
            mode = compile if compile is not True else "default"
            self._compile_summary = f"torch.compile ({compile_backend}, mode {mode}, scope {compile_scope!r}): {what}"

    def prepare_compile(self) -> dict | None:
        """Point inductor's caches at ``compile_cache_dir`` and log the compile settings, once,
        before the first compiled forward (so that building a model changes nothing process-wide);
        returns the cache state (:func:`models.compile_backbone.configure_compile_cache`)."""
        if self._compile_summary is None:
            return None
        generates_code, cache_dir = self._compile_cache
        cache = configure_compile_cache(cache_dir) if generates_code else None
        caches = "no code caches (trace-only backend)" if cache is None else (
            f"FX graph cache {'on' if cache['fx_graph_cache'] else 'OFF'}, AOTAutograd cache "
            f"{'on' if cache['autograd_cache'] else 'OFF'}, cache dir {cache['dir']}")
        rank_zero_info(f"{self._compile_summary}; {caches}")
        self._compile_summary = None
        return cache

    @property
    def compile_records(self) -> list[dict]:
        """One record per compiled graph key: ``key`` (``("train", tokens, batch)`` or
        ``("eval", batch)``), ``seconds`` of its first step, and the cache counter deltas."""
        return [] if self._compile_watch is None else list(self._compile_watch.records)

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        if not self.compiled:
            return self.backbone(images)
        if _get_current_dispatch_mode() is not None:
            # Under a dispatch mode (the model summary's FLOP counter): eager, so that counting
            # compiles nothing (whole backbone or its compiled blocks).
            with torch.compiler.set_stance("force_eager"):
                return self.backbone(images)
        if self._compile_summary is not None:
            self.prepare_compile()
        watch = self._compile_watch
        if self.training:
            draw_patch_dropout(self.backbone, tuple(images.shape[-2:]))
            layer = getattr(self.backbone, "patch_drop", None)
            key = ("train", getattr(layer, "last_tokens", None), images.shape[0])
        else:
            key = ("eval", images.shape[0])
        if watch.needs_finish(key):  # a loop without on_train_batch_end: the record ends here
            self._report_compile(images.device)
        timed = watch.start(key, images.device)
        if self.training:  # closed in on_train_batch_end: the backward graph compiles in backward
            return self.backbone(images)
        logits = self.backbone(images)
        if timed:
            self._report_compile(images.device)
        return logits

    def _report_compile(self, device: torch.device) -> None:
        record = self._compile_watch.finish(device)
        if record is None:
            return
        stage, *rest = record["key"]
        what = (f"training, {rest[0] if rest[0] is not None else 'all'} patch tokens, batch {rest[1]}"
                if stage == "train" else f"eval, batch {rest[0]}")
        rank_zero_info(f"torch.compile: first step of a new graph ({what}): {record['seconds']:.1f} s; "
                       f"{describe_cache(record)}")

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
        if self._compile_watch is not None:
            self._report_compile(self.device)
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
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints of a `torch.compile(module)` wrapper carry `_orig_mod.` in their keys;
        # this module's own keys never do (compile is in place), so strip it.
        state = checkpoint.get("state_dict")
        if state and any("._orig_mod." in key or key.startswith("_orig_mod.") for key in state):
            checkpoint["state_dict"] = {key.replace("_orig_mod.", ""): value for key, value in state.items()}
        super().on_load_checkpoint(checkpoint)

    @override
    def on_train_epoch_start(self) -> None:
        self._window_start, self._window_images = None, 0
