"""Exactly-once assignment of a sample stream to DataLoader workers and DDP ranks.

The stream is cut into global batches of ``batch_size`` consecutive samples. Global batch ``k``
goes to rank ``k % world_size``; a rank's ``j``-th batch goes to its worker ``j % num_workers``.
So reader ``w * world_size + r`` (worker ``w`` of rank ``r``) of ``S = world_size * num_workers``
reads batches ``k = index, index + S, ...``. A DataLoader takes its workers' batches in turn, so
each rank sees its batches in increasing ``k``, ranks differ by at most one batch, and every
sample is read by exactly one reader. With a sample budget
the number of global batches is rounded down to a multiple of the world size, so every rank runs
the same number of steps (a rank that runs out early would hang the others' collectives).

Resuming mid-epoch: when the first ``first`` global batches were already trained on, the same
rules apply to batches ``first, first + 1, ...`` (reader ``index`` reads ``first + index,
first + index + S, ...``), so the samples read before and after the interruption are disjoint and
together cover the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Reader:
    """One reader's place among all readers: ``index`` in ``[0, count)``."""

    index: int
    count: int
    world_size: int


def current_reader() -> Reader:
    """This process's reader: DDP rank and DataLoader worker combined."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return Reader(index=worker * world + rank, count=world * workers, world_size=world)


def num_global_batches(num_samples: int, batch_size: int, world_size: int,
                       drop_last: bool, first: int = 0) -> int:
    """Global batches of a stream of ``num_samples`` samples (the end of the batch numbers).

    With ``drop_last`` a trailing partial batch is dropped and the batches from ``first`` on are
    rounded down to a multiple of ``world_size`` (training: equal steps per rank). Without it the
    last batch may be short and ranks may differ by one batch (evaluation loops that need no
    collectives per step).
    """
    if drop_last:
        full = num_samples // batch_size
        return max(first, full - (full - first) % world_size)
    return -(-num_samples // batch_size)


def batches_for_reader(num_batches: int, reader: Reader, first: int = 0) -> range:
    """Global batch numbers that ``reader`` reads, in increasing order, from batch ``first`` on."""
    return range(first + reader.index, num_batches, reader.count)


def batch_span(k: int, batch_size: int, num_samples: int) -> tuple[int, int]:
    """Sample range ``[start, stop)`` of global batch ``k``."""
    start = k * batch_size
    return start, min(start + batch_size, num_samples)
