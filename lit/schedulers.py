"""Learning-rate schedules that know the run's length.

``WarmupDecay`` is linear warm-up followed by linear or cosine decay, the schedule of BERT
fine-tuning and of DeiT/Swin training. When ``total_steps`` is omitted, :class:`lit.module.LitModule`
fills it in from ``Trainer.estimated_stepping_batches`` at train start, so a YAML file need not repeat
``max_epochs`` x batches, and plans it again when a resumed run is given a new length.

The protocol, read in one place (:func:`plans_run_length`): a scheduler with a ``plan(total_steps,
restart=False, automatic=False)`` method steps once per optimizer step and can be told the run's
length; callers (the base module, :class:`callbacks.NMPruning`) use only that method.
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
        self.automatic_length = False  # True once the length came from the Trainer, not the user
        self.decay = decay
        self.final_lr_fraction = final_lr_fraction
        super().__init__(optimizer, self.factor)

    def plan(self, total_steps: int, restart: bool = False, automatic: bool = False) -> None:
        """Set the schedule's length in optimizer steps (from step 0 again if ``restart``).

        ``automatic`` marks a length derived from the Trainer (which the base module may plan
        again on resume) rather than one given by the user or a callback. The current lr is
        updated at once.
        """
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
        if restart:
            self.last_epoch = 0
        self.total_steps = total_steps
        self.automatic_length = automatic
        lrs = [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs

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


def plans_run_length(scheduler: object) -> bool:
    """Whether ``scheduler`` follows the run-length protocol (see the module docstring)."""
    return callable(getattr(scheduler, "plan", None))
