"""Mid-epoch resume of map-style training data: the same order, continued where it stopped.

Lightning restores the model, optimizers, schedulers and loop counters from a mid-epoch
checkpoint, but a plain shuffling ``DataLoader`` starts the epoch again with a new order, so a
resumed run trains on other batches than the run it continues. :class:`ResumableSampler` fixes
the order of every epoch by ``(seed, epoch)`` and, after :meth:`ResumableSampler.resume_at`,
starts that epoch after the samples already trained on. A datamodule records the position with
:func:`train_position` in its ``state_dict`` (which Lightning writes into every checkpoint) and
hands it back to the sampler in ``load_state_dict``.

Exact on one process. Under DDP Lightning wraps the sampler in its distributed wrapper, which
draws its own order; there the position is not restored and Lightning warns that the loader is
not resumable.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from lightning.pytorch import Trainer
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Indices ``0..length-1`` in an order fixed by ``(seed, epoch)``; can start mid-epoch.

    Args:
        length: the dataset's length.
        shuffle: a random permutation per epoch (else ``0..length-1``).
        seed: the permutation's seed; epoch ``e`` uses ``seed + e``.
    """

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0) -> None:
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples to skip)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch."""
        self.epoch = epoch

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """Skip the first ``samples_done`` indices of ``epoch`` (once)."""
        self._resume = (epoch, samples_done)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.length)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.length, generator=generator)

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        return iter(order[start:].tolist())

    def __len__(self) -> int:
        # The whole epoch's length, also when resuming: Lightning counts the epoch's batches
        # from the restored position up to this length.
        return self.length


def train_position(trainer: Trainer | None) -> dict[str, int]:
    """``{"epoch", "batches_done"}`` of the running fit, for a datamodule's ``state_dict``."""
    if trainer is None or trainer.state.fn != "fit":
        return {}
    loop = trainer.fit_loop
    return {"epoch": int(loop.epoch_progress.current.processed),
            "batches_done": int(loop.epoch_loop.batch_progress.current.processed)}
