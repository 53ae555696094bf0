"""An IterableDataset of whole batches of an index-addressable sample source, resumable mid-epoch.

The source is any picklable callable ``make_batch(indices) -> Batch``; the stream cuts
``[0, num_samples)`` (optionally permuted per epoch) into global batches and gives each
DataLoader worker and DDP rank its share (:mod:`datamodules.ctr.sharding`), so every index is read
exactly once per epoch. Serve it with :class:`StreamLoader`, which Lightning saves in every
checkpoint and restores when a run resumes mid-epoch: the stream then continues at the first
global batch not yet trained on, so a single-epoch run interrupted and resumed still reads each
sample exactly once (a resume must use the same number of devices).
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
from torch.utils.data import IterableDataset

from datamodules.ctr.sharding import (Reader, batch_span, batches_for_reader, current_reader,
                                      num_global_batches)
from datamodules.loader import ResumableLoader


class ResumableStream(Protocol):
    """What :class:`StreamLoader` needs of a stream: the epoch its next ``iter()`` reads and the
    global batch that iteration starts at (reset to 0 after it)."""

    epoch: int
    first_batch: int

    def epoch_batches(self, world_size: int) -> int | None:
        """Global batches of one epoch on ``world_size`` ranks (None: unknown before reading)."""


class BatchStream(IterableDataset):
    """Batches ``make_batch(indices)`` over ``[0, num_samples)``.

    Args:
        num_samples: the sample budget (indices ``0 .. num_samples - 1``).
        batch_size: samples per global batch (per rank).
        make_batch: turns an int64 array of sample indices into a batch. If it has
            ``chunk_batches > 1`` and ``make_batches(spans)`` (a list of ``(start, stop)``
            sample ranges to a list of batches), unshuffled batches are made that many at a time
            (the same batches, in the same order).
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
        self.first_batch = 0  # set by a mid-epoch resume, for the next iteration only

    def _order(self, epoch: int) -> np.ndarray | None:
        if self.shuffle_seed is None:
            return None
        return np.random.default_rng([self.shuffle_seed, epoch]).permutation(self.num_samples)

    def epoch_batches(self, world_size: int) -> int:
        return num_global_batches(self.num_samples, self.batch_size, world_size, self.drop_last)

    def __iter__(self):
        reader = current_reader()
        epoch, first = self.epoch, self.first_batch
        self.epoch, self.first_batch = epoch + 1, 0
        order = self._order(epoch)
        count = num_global_batches(self.num_samples, self.batch_size, reader.world_size,
                                   self.drop_last, first)
        ks = batches_for_reader(count, reader, first)
        chunk = getattr(self.make_batch, "chunk_batches", 1)
        if order is None and chunk > 1:  # several batches from one call: fewer, larger kernels
            for i in range(0, len(ks), chunk):
                yield from self.make_batch.make_batches(
                    [batch_span(k, self.batch_size, self.num_samples) for k in ks[i:i + chunk]])
            return
        for k in ks:
            start, stop = batch_span(k, self.batch_size, self.num_samples)
            indices = np.arange(start, stop) if order is None else order[start:stop]
            yield self.make_batch(indices)

    def __len__(self) -> int:
        """Batches this rank yields in a whole epoch (all its workers together)."""
        reader = current_reader()
        return rank_batches(self.epoch_batches(reader.world_size), reader.index % reader.world_size,
                            reader.world_size)


def rank_batches(count: int, rank: int, world_size: int) -> int:
    """How many of ``count`` global batches rank ``rank`` reads (whatever its worker count)."""
    return len(range(rank, count, world_size))


class StreamLoader(ResumableLoader):
    """A DataLoader of a stream's whole batches that resumes mid-epoch (see
    :class:`datamodules.loader.ResumableLoader`): the stream continues at the first global batch
    not yet trained on. Workers are persistent, so each keeps counting epochs (the shuffle of
    epoch ``e`` is the same whether or not the run was interrupted).

    Args:
        stream: a :class:`BatchStream` or another :class:`ResumableStream`.
        num_workers: DataLoader workers (each reads its own global batches).
        trainer: the Trainer whose fit loop this loader feeds (None outside a Trainer).
        pin_memory: pin host batches (for non-blocking copies to a GPU).
    """

    def __init__(self, stream: IterableDataset, num_workers: int = 0, trainer=None,
                 pin_memory: bool = False) -> None:
        super().__init__(stream, trainer=trainer, batch_size=None, num_workers=num_workers,
                         persistent_workers=num_workers > 0, pin_memory=pin_memory)
        stream.epoch = self.next_epoch()

    def resume(self, epoch: int, batches: int) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        first = batches * world  # every rank trained on `batches` of the global batches
        total = self.dataset.epoch_batches(world)
        if total is not None and first >= total:  # the epoch was complete: start the next one
            self.dataset.epoch, self.dataset.first_batch = epoch + 1, 0
        else:
            self.dataset.epoch, self.dataset.first_batch = epoch, first


__all__ = ["BatchStream", "Reader", "ResumableStream", "StreamLoader", "rank_batches"]
