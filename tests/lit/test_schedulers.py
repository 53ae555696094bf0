"""WarmupDecay against hand-computed learning rates."""

from __future__ import annotations

import math

import pytest
import torch

from lit.schedulers import WarmupDecay


def _lrs(scheduler: WarmupDecay, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _opt(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_linear_warmup_then_linear_decay_by_hand() -> None:
    lrs = _lrs(WarmupDecay(_opt(), warmup_steps=3, total_steps=7, decay="linear"), 8)
    # warm-up (s+1)/(w+1): 1/4, 2/4, 3/4; then 1 - (s-3)/4 for s = 3..7
    expected = [0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert lrs == pytest.approx(expected)


def test_cosine_decay_to_a_floor_by_hand() -> None:
    lrs = _lrs(WarmupDecay(_opt(2.0), total_steps=4, decay="cosine", final_lr_fraction=0.1), 5)
    expected = [2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 4))) for s in range(5)]
    assert lrs == pytest.approx(expected)


def test_total_steps_filled_in_later_and_warmup_fraction() -> None:
    scheduler = WarmupDecay(_opt(), warmup_fraction=0.2, decay="linear")
    assert scheduler.optimizer.param_groups[0]["lr"] == 1.0  # unknown length: constant
    scheduler.plan(10)
    lrs = _lrs(scheduler, 11)
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lrs[-1] == pytest.approx(0.0)


@pytest.mark.parametrize("kwargs,field", [({"warmup_steps": -1}, "warmup_steps"),
                                          ({"warmup_fraction": 1.5}, "warmup_fraction"),
                                          ({"total_steps": 0}, "total_steps"),
                                          ({"final_lr_fraction": 2.0}, "final_lr_fraction")])
def test_bad_arguments_name_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        WarmupDecay(_opt(), **kwargs)
