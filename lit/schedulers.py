"""Learning-rate schedules that know the run's length.

``WarmupDecay`` is linear warm-up followed by linear or cosine decay, the schedule of BERT
fine-tuning and of DeiT/Swin training. When ``total_steps`` is omitted, :class:`lit.module.LitModule`
fills it in from ``Trainer.estimated_stepping_batches``, so a YAML file need not repeat
``max_epochs`` x batches.
"""

from __future__ import annotations

import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupDecay(LambdaLR):
    """Linear warm-up to the optimizer's lr, then linear or cosine decay.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: steps of linear warm-up from 0; if ``warmup_fraction`` is set it wins.
        warmup_fraction: warm-up length as a fraction of ``total_steps`` (0 to 1).
        total_steps: length of the schedule in optimizer steps; ``None`` = set by the module.
        decay: ``"linear"`` or ``"cosine"`` after warm-up; ``"constant"`` keeps the peak.
        final_lr_fraction: lr at the end, as a fraction of the peak.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        warmup_fraction: float | None = None,
        total_steps: int | None = None,
        decay: Literal["linear", "cosine", "constant"] = "linear",
        final_lr_fraction: float = 0.0,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
        if warmup_fraction is not None and not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction!r}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 or null, got {total_steps!r}")
        if not 0.0 <= final_lr_fraction <= 1.0:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {final_lr_fraction!r}")
        self.warmup_steps = warmup_steps
        self.warmup_fraction = warmup_fraction
        self.total_steps = total_steps
        self.decay = decay
        self.final_lr_fraction = final_lr_fraction
        super().__init__(optimizer, self.factor)

    def set_total_steps(self, total_steps: int) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
        self.total_steps = total_steps
        # Re-apply the factor for the current step now that the length is known.
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self.factor(self.last_epoch)

    def _warmup(self) -> int:
        if self.warmup_fraction is not None and self.total_steps is not None:
            return int(round(self.warmup_fraction * self.total_steps))
        return self.warmup_steps

    def factor(self, step: int) -> float:
        warmup = self._warmup()
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if self.decay == "constant" or self.total_steps is None:
            return 1.0
        span = max(1, self.total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        end = self.final_lr_fraction
        if self.decay == "linear":
            return end + (1.0 - end) * (1.0 - progress)
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
