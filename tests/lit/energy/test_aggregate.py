"""One process: the reduction over ranks gives the values back and communicates nothing (the
multi-process sums and maxima run in the 2-process DDP job of tests/callbacks/test_zeus.py)."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from lit.energy.aggregate import reduce_over_ranks


class CountingStrategy(SingleDeviceStrategy):
    """A real single-device strategy that counts collectives."""

    calls = 0

    def all_gather(self, tensor, group=None, sync_grads=False):
        CountingStrategy.calls += 1
        return super().all_gather(tensor, group, sync_grads)


def test_one_process_is_a_no_op() -> None:
    strategy = CountingStrategy(torch.device("cpu"))
    assert reduce_over_ranks(strategy, 12.5, 3.25, 40) == (12.5, 3.25, 40)
    energy, time_s, samples = reduce_over_ranks(strategy, 1, 2, 3)
    assert (type(energy), type(time_s), type(samples)) == (float, float, int)
    assert CountingStrategy.calls == 0
