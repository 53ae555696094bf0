"""Your own images in class folders, with timm's ImageNet-style train / eval transforms.

Layout (torchvision ``ImageFolder``)::

    DATA_DIR/train/<class>/*.jpg      required
    DATA_DIR/val/<class>/*.jpg        optional: else ``val_fraction`` of train is held out
    DATA_DIR/test/<class>/*.jpg       optional: else the validation images are the test set

Images may have any size and aspect ratio. Each image goes through, in order: the optional
Conviformer pre-sizer (``presize_border``, see :mod:`datamodules.presize`), any
``pre_transforms`` (modules on the PIL image, e.g. ``datamodules.presize.ConviformerPresize``
from YAML), then timm's ``create_transform`` at ``image_size`` (random-resized crop, flip,
optional RandAugment / random erasing for training; resize + centre crop for evaluation) unless
``train_transforms`` / ``eval_transforms`` replace them.

An image that does not decode (truncated JPEG, foreign file) stops the run with its path
(``on_bad_image: error``), or is left out of its batch and logged with its path and a running
count (``on_bad_image: skip``), like the Criteo reader's ``on_malformed: count``.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from datamodules.splits import SplitDataModule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
log = logging.getLogger(__name__)


class BadImage(ValueError):
    """An image file that does not decode; the message names it and the fix."""


class TransformedSubset(Dataset):
    """Samples ``indices`` of an ``ImageFolder`` (which returns PIL images) through ``transform``.

    With ``skip_bad``, an image that raises :class:`BadImage` comes out as ``None`` (dropped by
    :func:`collate_skipping_none`) and is counted in ``skipped`` (per process: each DataLoader
    worker counts its own).
    """

    def __init__(self, folder, indices: list[int], transform: nn.Module, skip_bad: bool = False) -> None:
        self.folder, self.indices, self.transform = folder, indices, transform
        self.skip_bad = skip_bad
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        try:
            image, label = self.folder[self.indices[index]]
        except BadImage as err:
            if not self.skip_bad:
                raise
            self.skipped += 1
            log.warning("ImageFolder: skipped %s (%d skipped so far in this process)", err,
                        self.skipped)
            return None
        return self.transform(image), label


def collate_skipping_none(items: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """torch's collate over the samples that loaded (None when none did: Lightning skips it)."""
    kept = [item for item in items if item is not None]
    return default_collate(kept) if kept else None


class ImageFolder(SplitDataModule):
    """Image classification from class folders, any image sizes.

    Args:
        data_dir: root holding ``train/`` and optionally ``val/`` and ``test/``.
        image_size: training and evaluation resolution (square).
        batch_size: per-device batch size.
        num_workers: DataLoader workers.
        in_chans: 3 (RGB) or 1 (grayscale); images are converted on load.
        val_fraction: share of ``train/`` held out for validation when there is no ``val/``.
        seed: seed of that split.
        presize_border: apply the Conviformer pre-sizer with this border (the paper: 20);
            ``None`` = off.
        pre_transforms: modules applied to the PIL image before the resolution transform.
        auto_augment: timm auto-augment policy, e.g. ``"rand-m9-mstd0.5-inc1"`` (DeiT); None = off.
        scale_min: lower bound of the random-resized-crop area (DeiT: 0.08).
        hflip: horizontal flip probability.
        re_prob: random-erasing probability (DeiT: 0.25).
        interpolation: resize interpolation.
        crop_pct: evaluation centre-crop fraction (resize to ``image_size / crop_pct``, crop).
        mean, std: normalisation; default ImageNet's (0.5 for grayscale).
        train_transforms, eval_transforms: replace timm's transforms entirely (modules applied
            in order to the pre-transformed PIL image; the last must return a tensor).
        on_bad_image: ``"error"`` stops at an image that does not decode, naming it;
            ``"skip"`` leaves such images out of their batch, logging each with a count.
    """

    def __init__(
        self,
        data_dir: str,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 2,
        in_chans: Literal[1, 3] = 3,
        val_fraction: float = 0.1,
        seed: int = 0,
        presize_border: int | None = None,
        pre_transforms: list[nn.Module] | None = None,
        auto_augment: str | None = None,
        scale_min: float = 0.08,
        hflip: float = 0.5,
        re_prob: float = 0.0,
        interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic",
        crop_pct: float = 0.875,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        train_transforms: list[nn.Module] | None = None,
        eval_transforms: list[nn.Module] | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1 pixel, got {image_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if not 0.0 < scale_min <= 1.0:
            raise ValueError(f"scale_min must be in (0, 1], got {scale_min!r}")
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        if presize_border is not None and presize_border < 0:
            raise ValueError(f"presize_border must be >= 0 or null (off), got {presize_border!r}")
        default_mean, default_std = ((0.5,), (0.5,)) if in_chans == 1 else (IMAGENET_MEAN, IMAGENET_STD)
        self.mean = tuple(mean) if mean is not None else default_mean
        self.std = tuple(std) if std is not None else default_std
        if len(self.mean) != in_chans or len(self.std) != in_chans:
            raise ValueError(f"mean/std: need {in_chans} values for in_chans={in_chans}, got "
                             f"{list(self.mean)!r} and {list(self.std)!r}")
        self.save_hyperparameters(ignore=["pre_transforms", "train_transforms", "eval_transforms"])
        self.data_dir = Path(data_dir)
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.in_chans, self.val_fraction, self.seed = in_chans, val_fraction, seed
        self.presize_border, self.pre_transforms = presize_border, pre_transforms or []
        self.auto_augment, self.scale_min, self.hflip, self.re_prob = auto_augment, scale_min, hflip, re_prob
        self.interpolation, self.crop_pct = interpolation, crop_pct
        self.train_transforms, self.eval_transforms = train_transforms, eval_transforms
        self.on_bad_image = on_bad_image
        self.collate_fn = collate_skipping_none if on_bad_image == "skip" else None
        self.classes: list[str] = []
        self.train_set = self.val_set = self.test_set = None

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else len(self._class_dirs(self.data_dir / "train"))

    @staticmethod
    def _class_dirs(split: Path) -> list[str]:
        return sorted(p.name for p in split.iterdir() if p.is_dir()) if split.is_dir() else []

    def prepare_data(self) -> None:
        train = self.data_dir / "train"
        if not self._class_dirs(train):
            raise FileNotFoundError(
                f"data_dir: {str(train)!r} must hold one sub-folder of images per class "
                "(DATA_DIR/train/<class>/<image>); val/ and test/ are optional")

    def build_transform(self, training: bool):
        """The full per-image transform of a split (PIL image -> normalised tensor)."""
        from timm.data import create_transform
        from torchvision.transforms import Compose

        steps: list = []
        if self.presize_border is not None:
            from datamodules.presize import ConviformerPresize

            steps.append(ConviformerPresize(self.presize_border))
        steps += list(self.pre_transforms)
        custom = self.train_transforms if training else self.eval_transforms
        if custom is not None:
            steps += list(custom)
        else:
            steps.append(create_transform(
                input_size=(self.in_chans, self.image_size, self.image_size), is_training=training,
                scale=(self.scale_min, 1.0), hflip=self.hflip, auto_augment=self.auto_augment,
                re_prob=self.re_prob, interpolation=self.interpolation, crop_pct=self.crop_pct,
                mean=self.mean, std=self.std))
        return Compose(steps)

    def _folder(self, split: str):
        from torchvision.datasets import ImageFolder as TorchImageFolder

        mode = "RGB" if self.in_chans == 3 else "L"
        folder = TorchImageFolder(str(self.data_dir / split), loader=partial(_load, mode=mode))
        if self.classes and folder.classes != self.classes:
            raise ValueError(f"data_dir: {split}/ has classes {folder.classes}, train/ has {self.classes}; "
                             "every split needs the same class folders")
        return folder

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.prepare_data()
        train = self._folder("train")
        self.classes = list(train.classes)
        subset = partial(TransformedSubset, skip_bad=self.on_bad_image == "skip")
        if (self.data_dir / "val").is_dir():
            val = self._folder("val")
            self.train_set = subset(train, list(range(len(train))), self.build_transform(True))
            self.val_set = subset(val, list(range(len(val))), self.build_transform(False))
        else:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = max(1, int(round(self.val_fraction * len(train))))
            if n_val >= len(train):
                raise ValueError(f"val_fraction: {self.val_fraction} of {len(train)} images leaves none "
                                 "for training; add images or a val/ folder")
            self.train_set = subset(train, order[n_val:], self.build_transform(True))
            self.val_set = subset(train, order[:n_val], self.build_transform(False))
        if (self.data_dir / "test").is_dir():
            test = self._folder("test")
            self.test_set = subset(test, list(range(len(test))), self.build_transform(False))
        else:
            self.test_set = self.val_set


def _load(path: str, mode: str):
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert(mode)
    except (OSError, SyntaxError, ValueError) as err:  # PIL: truncated data, unknown format
        raise BadImage(f"{path}: not a readable image ({err}); remove or replace the file, or "
                       "set --data.init_args.on_bad_image skip to leave such images out") from err

