"""Fashion-MNIST from its real IDX files (Debian's ``dataset-fashion-mnist`` by default)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from datamodules.idx import read_idx
from datamodules.splits import SplitDataModule

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; `make setup` "
    "does this when run as root), or pass --data.init_args.data_dir DIR pointing at a folder "
    "with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
    "and t10k-labels-idx1-ubyte.gz"
)
REPAIR_HINT = (
    "reinstall the data with `sudo apt-get install --reinstall dataset-fashion-mnist` "
    "(Debian/Ubuntu), or replace the file with an intact copy")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Per-pixel statistics of the 60k training images (after /255).
MEAN, STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {directory}: {INSTALL_HINT}")


def load_split(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of ``"train"`` or ``"test"``."""
    directory = Path(data_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory {str(directory)!r} does not exist: {INSTALL_HINT}")
    images_stem, labels_stem = FILES[split]
    try:
        images = read_idx(_find(directory, images_stem))
        labels = read_idx(_find(directory, labels_stem)).long()
    except ValueError as err:
        raise ValueError(f"Fashion-MNIST file {err}; {REPAIR_HINT}") from err
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{directory}: {split} images {tuple(images.shape)} and labels "
                         f"{tuple(labels.shape)} do not match")
    return images, labels


class ImageTensorDataset(Dataset):
    """Images held in memory as uint8 ``(N, H, W)`` or ``(N, C, H, W)``, returned as float
    ``(C, H, W)`` normalised tensors, each passed through ``transforms`` in order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float,
                 transforms: list[nn.Module] | None = None) -> None:
        self.images = images if images.ndim == 4 else images.unsqueeze(1)
        self.labels = labels
        self.mean, self.std = mean, std
        self.transforms = nn.Sequential(*transforms) if transforms else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = (self.images[index].float() / 255.0 - self.mean) / self.std
        if self.transforms is not None:
            image = self.transforms(image)
        return image, self.labels[index]


class FashionMNIST(SplitDataModule):
    """Fashion-MNIST: 60k train images split into train/val by seed, the official 10k as test.

    Args:
        data_dir: folder with the four IDX files (``.gz`` or not); default Debian's.
        batch_size: per-device batch size.
        val_size: images held out of the 60k for validation.
        seed: seed of the train/val split.
        num_workers: DataLoader workers.
        train_transforms: modules applied to each normalised ``(1, 28, 28)`` training image
            (e.g. ``torchvision.transforms.v2.RandomHorizontalFlip``); eval images get
            ``eval_transforms``.
        eval_transforms: modules applied to validation/test/predict images (e.g. a resize).
    """

    num_classes = 10
    in_chans = 1

    def __init__(
        self,
        data_dir: str = DEBIAN_DIR,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        train_transforms: list[nn.Module] | None = None,
        eval_transforms: list[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if not 0 <= val_size < 60000:
            raise ValueError(f"val_size must be in [0, 60000), got {val_size!r}")
        self.save_hyperparameters(ignore=["train_transforms", "eval_transforms"])
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_size = val_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_transforms = train_transforms
        self.eval_transforms = eval_transforms
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        # Fail before any process starts work when the data is missing.
        for split in FILES:
            for stem in FILES[split]:
                if not Path(self.data_dir).is_dir():
                    raise FileNotFoundError(
                        f"Fashion-MNIST directory {self.data_dir!r} does not exist: {INSTALL_HINT}")
                _find(Path(self.data_dir), stem)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = load_split(self.data_dir, "train")
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            val_idx, train_idx = order[: self.val_size], order[self.val_size :]
            self.train_set = self._dataset(images[train_idx], labels[train_idx], self.train_transforms)
            self.val_set = self._dataset(images[val_idx], labels[val_idx], self.eval_transforms)
        if stage in (None, "test", "predict") and self.test_set is None:
            images, labels = load_split(self.data_dir, "test")
            self.test_set = self._dataset(images, labels, self.eval_transforms)

    @staticmethod
    def _dataset(images, labels, transforms) -> ImageTensorDataset:
        return ImageTensorDataset(images, labels, MEAN, STD, transforms)

