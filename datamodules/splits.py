"""Shared DataLoader wiring for datamodules that hold map-style train/val/test datasets."""

from __future__ import annotations

from typing import Callable

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.loader import make_loader


class SplitDataModule(LightningDataModule):
    """Serves ``train_set`` / ``val_set`` / ``test_set`` (predict uses the test split) with
    ``batch_size`` and ``num_workers``; subclasses build the sets in ``setup``. The training
    order is drawn from ``(seed, epoch)`` and resumes mid-epoch (:mod:`datamodules.loader`).
    Under DDP, Lightning adds a ``DistributedSampler``, so each rank reads its own share."""

    batch_size: int
    num_workers: int
    seed: int
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None
    collate_fn: Callable | None = None  # None: torch's default collate

    def _loader(self, dataset: Dataset, split: str) -> DataLoader:
        train = split == "train"
        return make_loader(dataset, split, self.batch_size, self.num_workers, shuffle=train,
                           drop_last=train, collate_fn=self.collate_fn, seed=self.seed,
                           trainer=self.trainer if train else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "predict")
