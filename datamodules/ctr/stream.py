"""An IterableDataset of whole batches of an index-addressable sample source.

The source is any picklable callable ``make_batch(indices) -> Batch``; the stream cuts
``[0, num_samples)`` (optionally permuted per epoch) into global batches and gives each
DataLoader worker and DDP rank its share (:mod:`datamodules.ctr.sharding`), so every index is read
exactly once per epoch. Use it with ``DataLoader(stream, batch_size=None)``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from torch.utils.data import IterableDataset

from datamodules.ctr.sharding import (Reader, batch_span, batches_for_reader, current_reader,
                                 num_global_batches)


class BatchStream(IterableDataset):
    """Batches ``make_batch(indices)`` over ``[0, num_samples)``.

    Args:
        num_samples: the sample budget (indices ``0 .. num_samples - 1``).
        batch_size: samples per global batch (per rank).
        make_batch: turns an int64 array of sample indices into a batch.
        drop_last: drop a trailing partial batch and round the batch count down to a multiple
            of the world size (training); otherwise keep it (evaluation).
        shuffle_seed: ``None`` reads indices in order; an int permutes them, with a new
            permutation each epoch (each ``iter()``: use persistent workers when workers > 0).
    """

    def __init__(self, num_samples: int, batch_size: int, make_batch: Callable,
                 drop_last: bool = True, shuffle_seed: int | None = None) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.make_batch = make_batch
        self.drop_last = drop_last
        self.shuffle_seed = shuffle_seed
        self.epoch = 0

    def _order(self) -> np.ndarray | None:
        if self.shuffle_seed is None:
            return None
        return np.random.default_rng([self.shuffle_seed, self.epoch]).permutation(self.num_samples)

    def __iter__(self):
        reader = current_reader()
        order = self._order()
        self.epoch += 1
        count = num_global_batches(self.num_samples, self.batch_size, reader.world_size,
                                   self.drop_last)
        for k in batches_for_reader(count, reader):
            start, stop = batch_span(k, self.batch_size, self.num_samples)
            indices = np.arange(start, stop) if order is None else order[start:stop]
            yield self.make_batch(indices)

    def __len__(self) -> int:
        """Batches this rank yields (all its workers together)."""
        reader = current_reader()
        count = num_global_batches(self.num_samples, self.batch_size, reader.world_size,
                                   self.drop_last)
        return rank_batches(count, reader.index % reader.world_size, reader.world_size)


def rank_batches(count: int, rank: int, world_size: int) -> int:
    """How many of ``count`` global batches rank ``rank`` reads (whatever its worker count)."""
    return len(range(rank, count, world_size))


__all__ = ["BatchStream", "Reader", "rank_batches"]
