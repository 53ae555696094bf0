"""An IterableDataset of whole batches of an index-addressable sample source, resumable mid-epoch.

The source is any picklable callable ``make_batch(indices) -> Batch``; the stream cuts
``[0, num_samples)`` (optionally permuted per epoch) into global batches and gives each
DataLoader worker and DDP rank its share (:mod:`datamodules.ctr.sharding`), so every index is read
exactly once per epoch. Serve it with :class:`StreamLoader`, which Lightning saves in every
checkpoint and restores when a run resumes mid-epoch: the stream then continues at the first
global batch not yet trained on, so a single-epoch run interrupted and resumed still reads each
sample exactly once.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from datamodules.ctr.sharding import (Reader, batch_span, batches_for_reader, current_reader,
                                      num_global_batches)


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
        for k in batches_for_reader(count, reader, first):
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


class StreamLoader(DataLoader):
    """A DataLoader of a stream's whole batches that Lightning can resume mid-epoch.

    Lightning keeps ``state_dict()`` with the fit loop's state in every checkpoint and, when a
    run resumes from a mid-epoch checkpoint, calls ``load_state_dict`` before the first
    ``iter()``. The state is the fit loop's own count of batches trained on in the epoch (equal
    on every rank under ``drop_last``), so the stream restarts where the loop does, whether the
    checkpoint was written after a batch, after a validation or on a signal. Workers are
    persistent, so each keeps counting epochs (the shuffle of epoch ``e`` is the same whether or
    not the run was interrupted).

    Args:
        stream: a :class:`BatchStream` or another :class:`ResumableStream`.
        num_workers: DataLoader workers (each reads its own global batches).
        trainer: the Trainer whose fit loop this loader feeds (None outside a Trainer: the state
            is then the start of an epoch).
    """

    def __init__(self, stream: IterableDataset, num_workers: int = 0, trainer=None) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers,
                         persistent_workers=num_workers > 0)
        self.trainer = trainer
        if trainer is not None:
            # The epoch the fit loop runs next (a checkpoint written at an epoch's end resumes
            # with the next epoch's shuffle).
            stream.epoch = trainer.fit_loop.epoch_progress.current.processed

    def state_dict(self) -> dict[str, int]:
        if self.trainer is None:
            return {"epoch": self.dataset.epoch, "batches": 0, "world_size": 1}
        return {"epoch": self.trainer.fit_loop.epoch_progress.current.completed,
                "batches": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                "world_size": self.trainer.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        if state["batches"] and state["world_size"] != world:
            raise ValueError(
                f"resume: this checkpoint was written mid-epoch on {state['world_size']} devices, "
                f"the run now has {world}; resume on {state['world_size']} devices so the stream "
                "continues exactly where it stopped (or resume from an end-of-epoch checkpoint)")
        first = state["batches"] * state["world_size"]
        total = self.dataset.epoch_batches(world)
        if total is not None and first >= total:  # the epoch was complete: start the next one
            self.dataset.epoch, self.dataset.first_batch = state["epoch"] + 1, 0
        else:
            self.dataset.epoch, self.dataset.first_batch = state["epoch"], first


__all__ = ["BatchStream", "Reader", "ResumableStream", "StreamLoader", "rank_batches"]
