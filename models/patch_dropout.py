"""PatchDropout for ViT / DeiT (Liu et al., "PatchDropout: Economizing Vision Transformers Using
Patch Dropout", arXiv 2208.07220; reference repo yueliukth/PatchDropout).

At train time each image keeps ``k = max(1, int(L * keep_rate))`` of its ``L`` patch tokens,
chosen uniformly without replacement and independently per image; the prefix tokens (class,
distillation, register tokens) are always kept. The position embedding is added before the
drop, so every kept token still knows where it came from. Validation, test and predict see
every patch.

Two choices the sources leave open are arguments here:

* ``ordered``: the reference sorts the kept indices (tokens stay in raster order); timm's
  ``PatchDropout`` leaves them shuffled. For a ViT without causal structure the two are
  equivalent in distribution; sorting costs one small sort.
* ``schedule``: ``"fixed"`` uses ``keep_rate`` every step; ``"random"`` is the reference repo's
  later default, one keep rate per step: 1.0 with probability 1/2, otherwise
  ``1 - U{0..10} / 20`` (so 1.0, 0.95, ..., 0.5). The whole batch shares the step's rate.

The layer goes into timm's ``VisionTransformer.patch_drop`` slot (see :func:`install_patch_dropout`),
which runs right after ``_pos_embed``; DeiT's distilled model works too, because the number of
prefix tokens is read from the built model (timm's own ``patch_drop_rate`` counts only the class
token there and can drop the distillation token). The drop itself is timm's
``patch_dropout_forward``; this module adds the schedule, the exact token count and the logging.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers.patch_dropout import patch_dropout_forward
from torch import nn
from typing_extensions import override

KeepRateSchedule = Literal["fixed", "random"]


def keep_count(num_patches: int, keep_rate: float) -> int:
    """Patches kept out of ``num_patches``: ``max(1, floor(num_patches * keep_rate))``."""
    return max(1, int(num_patches * keep_rate))


def sample_keep_rate(generator: torch.Generator | None = None) -> float:
    """The reference repo's random keep rate: 1.0 w.p. 1/2, else ``1 - U{0..10}/20``."""
    if torch.rand((), generator=generator).item() < 0.5:
        return 1.0
    return 1.0 - int(torch.randint(0, 11, (), generator=generator).item()) / 20.0


def patch_dropout(
    x: torch.Tensor, keep_rate: float, num_prefix_tokens: int, ordered: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop patch tokens of ``x`` ``(B, P + L, D)`` (``P`` prefix tokens first) with timm's
    ``patch_dropout_forward``, keeping exactly :func:`keep_count` patches.

    Returns ``(B, P + k, D)`` and the kept patch indices ``(B, k)`` (``None`` when nothing is
    dropped, in which case ``x`` is returned as it is).
    """
    num_patches = x.shape[1] - num_prefix_tokens
    keep = keep_count(num_patches, keep_rate)
    if keep >= num_patches:
        return x, None
    # timm keeps max(1, int(L * (1 - prob))). With prob = 1 - keep_rate the float rounding of
    # 1 - (1 - keep_rate) loses a token for some (L, keep_rate) (399 pairs below L = 4000);
    # asking for keep + 0.5 tokens yields exactly `keep` for every L.
    prob = 1.0 - (keep + 0.5) / num_patches
    return patch_dropout_forward(x, prob, num_prefix_tokens, ordered, training=True)


class PatchDropout(nn.Module):
    """Token-dropping layer for timm's ``VisionTransformer.patch_drop`` slot.

    Args:
        keep_rate: fraction of patch tokens kept at train time (``schedule="fixed"``), in (0, 1].
        schedule: ``"fixed"`` or ``"random"`` (the reference's per-step random keep rate).
        ordered: keep the kept tokens in raster order (reference) instead of shuffled (timm).
        num_prefix_tokens: leading tokens never dropped (class, distillation, registers).

    After each training forward, ``last_keep_rate``, ``last_tokens`` (patch tokens kept per
    image) and ``last_indices`` (``(B, k)`` kept patch indices, ``None`` if all were kept) say
    what the step used, for logging and visualisation.
    """

    def __init__(
        self,
        keep_rate: float = 0.5,
        schedule: KeepRateSchedule = "fixed",
        ordered: bool = True,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        check_keep_rate(keep_rate, schedule)
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens!r}")
        self.keep_rate = keep_rate
        self.schedule = schedule
        self.ordered = ordered
        self.num_prefix_tokens = num_prefix_tokens
        self.last_keep_rate = 1.0
        self.last_tokens: int | None = None
        self.last_indices: torch.Tensor | None = None
        self.step_keep_rate: float | None = None

    def draw(self) -> float:
        """Fix the next training forwards' keep rate (the schedule's draw) and return it.

        For ``torch.compile``: call it outside the compiled region before each training step,
        so that the compiled forward reads a plain number (one graph per distinct keep count,
        no graph break on the draw). Without a call, each training forward draws its own rate.
        """
        rate = sample_keep_rate() if self.schedule == "random" else self.keep_rate
        self.step_keep_rate = rate
        return rate

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, P + L, D) -> (B, P + k, D)
        if not self.training:
            return x
        if torch.compiler.is_compiling():
            # Traced: no draw and no Python-side bookkeeping, so the graph is one piece; the
            # caller has set `step_keep_rate` (see `draw`) and records `last_*` itself.
            rate = self.keep_rate if self.step_keep_rate is None else self.step_keep_rate
            return patch_dropout(x, rate, self.num_prefix_tokens, self.ordered)[0]
        self.last_keep_rate = self.step_keep_rate if self.step_keep_rate is not None else \
            (sample_keep_rate() if self.schedule == "random" else self.keep_rate)
        x, self.last_indices = patch_dropout(x, self.last_keep_rate, self.num_prefix_tokens, self.ordered)
        self.last_tokens = x.shape[1] - self.num_prefix_tokens
        return x

    @override
    def extra_repr(self) -> str:
        return (f"keep_rate={self.keep_rate}, schedule={self.schedule!r}, ordered={self.ordered}, "
                f"num_prefix_tokens={self.num_prefix_tokens}")


def check_keep_rate(keep_rate: float, schedule: str) -> None:
    """Raise a ``ValueError`` naming the field for a bad keep rate or schedule."""
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate!r}; 0.5 keeps half the patches")
    if schedule not in ("fixed", "random"):
        raise ValueError(f"keep_rate_schedule must be 'fixed' or 'random', got {schedule!r}")


def install_patch_dropout(
    model: nn.Module,
    keep_rate: float,
    schedule: KeepRateSchedule = "fixed",
    ordered: bool = True,
) -> PatchDropout:
    """Put a :class:`PatchDropout` into a timm ``VisionTransformer``'s ``patch_drop`` slot.

    Works for every timm model that has the slot and runs it after ``_pos_embed`` (ViT, DeiT,
    distilled DeiT, DeiT-3, models with register tokens). Returns the installed layer.
    """
    if not hasattr(model, "patch_drop") or not hasattr(model, "num_prefix_tokens"):
        raise ValueError(
            f"backbone: {type(model).__name__} has no `patch_drop` slot; PatchDropout supports "
            "timm VisionTransformer models (ViT, DeiT) and SwinTransformer")
    layer = PatchDropout(keep_rate, schedule, ordered, num_prefix_tokens=int(model.num_prefix_tokens))
    model.patch_drop = layer
    return layer
