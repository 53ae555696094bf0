"""The one DataLoader recipe of the datamodules, and the checks that there is data to load.

Map-style splits go through :func:`make_loader`; the CTR streams, which cut their own batches,
through :class:`datamodules.ctr.stream.StreamLoader`. Both keep workers persistent (so per-epoch
state in a worker survives) and pin memory when a GPU is present. Nothing to train on is an
error that names the sizes; an empty evaluation split is a warning, since leaving out
validation can be intended.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset


def make_loader(dataset: Dataset, split: str, batch_size: int, num_workers: int, *,
                shuffle: bool = False, drop_last: bool = False,
                collate_fn: Callable | None = None, seed: int | None = None) -> DataLoader:
    """A DataLoader over a map-style ``split`` (``"train"``, ``"val"``, ``"test"``).

    Args:
        dataset: the split's samples.
        split: its name, for the messages.
        batch_size, num_workers: as the DataLoader's.
        shuffle: reshuffle every epoch (training).
        drop_last: drop a ragged last batch (never the only one: a training set smaller than a
            batch still trains on one short batch).
        collate_fn: batch builder (default: torch's).
        seed: seeds the shuffle (None: torch's global generator, seeded by ``seed_everything``).
    """
    size = len(dataset)
    check_split_size(split, size, batch_size=1)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=drop_last and size > batch_size,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed) if shuffle and seed is not None else None,
        pin_memory=torch.cuda.is_available(),
    )


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
