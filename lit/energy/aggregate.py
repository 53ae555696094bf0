"""One job's energy, time and samples from its processes' own measurements.

Each process of a data-parallel job measures its own GPU over the same window of steps. The
job's energy is the sum over processes, its samples too; its time is the slowest process's (a
synchronous step lasts as long as its slowest GPU). Every energy callback reduces through
:func:`reduce_over_ranks`, so the three of them agree on what "the job's energy" is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy


def reduce_over_ranks(strategy: Strategy, energy_j: float, time_s: float,
                      samples: int) -> tuple[float, float, int]:
    """``(sum of energy_j, max of time_s, sum of samples)`` over the processes of ``strategy``.

    A collective: every process must call it at the same point of training, or the job hangs.
    With one process the values come back as they are, and nothing is communicated. The values
    travel as one float64 tensor on ``strategy.root_device`` (NCCL reduces only CUDA tensors)
    in a single all-gather.
    """
    if getattr(strategy, "world_size", 1) <= 1:
        return float(energy_j), float(time_s), int(samples)
    mine = torch.tensor([energy_j, time_s, float(samples)], dtype=torch.float64,
                        device=strategy.root_device)
    every = strategy.all_gather(mine).reshape(-1, 3).cpu()  # (world_size, 3)
    return float(every[:, 0].sum()), float(every[:, 1].max()), int(round(float(every[:, 2].sum())))
