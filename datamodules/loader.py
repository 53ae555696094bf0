"""The one DataLoader recipe of the datamodules, resumable mid-epoch, and the checks that there is
data to load.

Map-style splits go through :func:`make_loader`; the CTR streams, which cut their own batches,
through :class:`datamodules.ctr.stream.StreamLoader`. Both keep workers persistent (so per-epoch
state in a worker survives) and pin memory when a GPU is present.

Resume: a training loader is a :class:`ResumableLoader`. Lightning keeps its ``state_dict()`` with
the fit loop's state in every checkpoint and, when a run resumes from a mid-epoch checkpoint,
calls ``load_state_dict`` before the first ``iter()``. The state is the fit loop's own count of
batches trained on in the epoch, so the data restarts where the loop does (whether the checkpoint
was written after a batch, after a validation or on a signal): the rest of the epoch is the same
batches, in the same order, as in an uninterrupted run.

Nothing to train on is an error that names the sizes; an empty evaluation split is a warning,
since leaving out validation can be intended.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableLoader(DataLoader):
    """A training DataLoader that Lightning saves and restores with the fit loop (see the module
    docstring). Subclasses apply a resume point in :meth:`resume`.

    Args:
        dataset: as the DataLoader's.
        trainer: the Trainer whose fit loop this loader feeds (None outside a Trainer).
        options: the DataLoader's own options, passed through (so Lightning can re-create the
            loader with a ``DistributedSampler`` under DDP).
    """

    def __init__(self, dataset: Dataset, *, trainer=None, **options) -> None:
        super().__init__(dataset, **options)
        self.trainer = trainer

    def next_epoch(self) -> int:
        """The epoch the fit loop runs next (a checkpoint written at an epoch's end resumes with
        the next epoch's order)."""
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer else 0

    def state_dict(self) -> dict[str, int]:
        if self.trainer is None:
            return {"epoch": 0, "batches": 0, "world_size": 1}
        loop = self.trainer.fit_loop
        return {"epoch": loop.epoch_progress.current.completed,
                "batches": loop.epoch_loop.batch_progress.current.processed,
                "world_size": self.trainer.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        if state["batches"] and state["world_size"] != world:
            raise ValueError(
                f"resume: this checkpoint was written mid-epoch on {state['world_size']} devices, "
                f"the run now has {world}; resume on {state['world_size']} devices so the data "
                "continues exactly where it stopped (or resume from an end-of-epoch checkpoint)")
        self.resume(state["epoch"], state["batches"])

    def resume(self, epoch: int, batches: int) -> None:
        """Start the next ``iter()`` in ``epoch`` after the ``batches`` each rank already trained on."""
        raise NotImplementedError


class EpochSampler(Sampler[int]):
    """A permutation of ``range(size)`` drawn from ``(seed, epoch)``, so epoch ``e``'s order is the
    same in an interrupted and an uninterrupted run; ``start`` skips the first samples of the next
    iteration only (a mid-epoch resume). Lightning calls ``set_epoch`` at each epoch's start."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(self.size, generator=generator)[start:].tolist()

    def __len__(self) -> int:
        return self.size


class ShuffledLoader(ResumableLoader):
    """A map-style training loader over an :class:`EpochSampler`. Under DDP, Lightning re-creates
    it with the sampler wrapped in its ``DistributedSamplerWrapper`` (then a mid-epoch resume
    restarts the epoch's data, as Lightning does for any loader, with a warning)."""

    def resume(self, epoch: int, batches: int) -> None:
        if not isinstance(self.sampler, EpochSampler):
            if not batches:
                return
            warnings.warn("resume: Lightning wrapped the sampler for DDP, so this epoch's data "
                          "restarts from its beginning", UserWarning, stacklevel=2)
            return
        self.sampler.epoch = epoch
        if batches * self.batch_size < len(self.sampler):
            self.sampler.start = batches * self.batch_size
        else:  # the epoch was complete: the next one starts from its beginning
            self.sampler.epoch = epoch + 1


def make_loader(dataset: Dataset, split: str, batch_size: int, num_workers: int, *,
                shuffle: bool = False, drop_last: bool = False,
                collate_fn: Callable | None = None, seed: int = 0, trainer=None) -> DataLoader:
    """A DataLoader over a map-style ``split`` (``"train"``, ``"val"``, ``"test"``, ``"predict"``).

    Args:
        dataset: the split's samples.
        split: its name, for the messages.
        batch_size, num_workers: as the DataLoader's.
        shuffle: a new order every epoch, drawn from ``(seed, epoch)``; the loader is then a
            :class:`ShuffledLoader` that resumes mid-epoch.
        drop_last: drop a ragged last batch (never the only one: a training set smaller than a
            batch still trains on one short batch).
        collate_fn: batch builder (default: torch's).
        seed: seeds the shuffle.
        trainer: the Trainer of a training loader (its fit loop's position is the resume state).
    """
    size = len(dataset)
    check_split_size(split, size, batch_size=1)
    options = dict(batch_size=batch_size, num_workers=num_workers,
                   persistent_workers=num_workers > 0, drop_last=drop_last and size > batch_size,
                   collate_fn=collate_fn, pin_memory=torch.cuda.is_available())
    if not shuffle:
        return DataLoader(dataset, **options)
    sampler = EpochSampler(size, seed)
    loader = ShuffledLoader(dataset, sampler=sampler, trainer=trainer, **options)
    sampler.epoch = loader.next_epoch()
    return loader


def check_split_size(split: str, samples: int | None, batch_size: int, world_size: int = 1,
                     where: str = "") -> None:
    """Raise when a training split makes no whole batch on every rank; warn when an evaluation
    split is empty. ``samples=None`` (unknown size) passes; ``where`` names the files or setting."""
    if samples is None:
        return
    source = f" ({where})" if where else ""
    if split == "train":
        need = batch_size * world_size
        if samples < need:
            per = f"batch_size {batch_size}" + (f" x {world_size} devices" if world_size > 1 else "")
            raise ValueError(f"train split{source}: {samples} samples, fewer than one whole batch "
                             f"({per} = {need}): nothing to train on; add data or lower batch_size")
    elif samples == 0:
        warnings.warn(f"{split} split{source} is empty: no {split} metrics this run", UserWarning,
                      stacklevel=2)
