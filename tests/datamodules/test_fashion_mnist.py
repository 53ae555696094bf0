"""Fashion-MNIST: the IDX reader against torchvision's reader, the split, bad directories."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from datamodules.fashion_mnist import FashionMNIST, load_split
from datamodules.idx import read_idx
from tests.conftest import FMNIST_DIR, needs_fmnist


@needs_fmnist
def test_idx_reader_matches_torchvision(tmp_path: Path) -> None:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    for stem, reader in (("t10k-images-idx3-ubyte", read_image_file),
                         ("t10k-labels-idx1-ubyte", read_label_file)):
        plain = tmp_path / stem
        with gzip.open(FMNIST_DIR / f"{stem}.gz", "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        ours = read_idx(FMNIST_DIR / f"{stem}.gz")
        theirs = reader(str(plain))
        assert ours.shape == theirs.shape
        assert torch.equal(ours.to(theirs.dtype), theirs)


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))  # says 5 bytes, holds 2
    with pytest.raises(ValueError, match="header says"):
        read_idx(short)


@needs_fmnist
def test_split_is_deterministic_disjoint_and_complete() -> None:
    dm = FashionMNIST(val_size=5000, seed=3)
    dm.setup("fit")
    again = FashionMNIST(val_size=5000, seed=3)
    again.setup("fit")
    assert torch.equal(dm.val_set.labels, again.val_set.labels)
    assert len(dm.train_set) == 55000 and len(dm.val_set) == 5000
    images, _ = load_split(FMNIST_DIR, "train")
    # Every training image lands in exactly one of the two sets: compare by content hash.
    flat = images.view(len(images), -1).long()
    weights = torch.randint(1, 2**20, (flat.shape[1],), generator=torch.Generator().manual_seed(0))
    key = lambda x: (x.view(len(x), -1).long() * weights).sum(1)  # noqa: E731
    all_keys = torch.sort(key(flat)).values
    split_keys = torch.sort(torch.cat([key(dm.train_set.images), key(dm.val_set.images)])).values
    assert torch.equal(all_keys, split_keys)
    other = FashionMNIST(val_size=5000, seed=4)
    other.setup("fit")
    assert not torch.equal(other.val_set.labels, dm.val_set.labels)


@needs_fmnist
def test_test_split_is_the_official_10k_and_normalised() -> None:
    dm = FashionMNIST()
    dm.setup("test")
    assert len(dm.test_set) == 10000
    image, label = dm.test_set[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0 <= int(label) < 10
    batch = torch.stack([dm.test_set[i][0] for i in range(2000)])
    assert abs(batch.mean().item()) < 0.1 and abs(batch.std().item() - 1) < 0.1


def test_missing_directory_and_files_name_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(data_dir=str(tmp_path / "missing")).prepare_data()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        FashionMNIST(data_dir=str(tmp_path)).prepare_data()  # exists but empty: not a silent empty set


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        FashionMNIST(batch_size=0)
    with pytest.raises(ValueError, match="val_size"):
        FashionMNIST(val_size=60000)


def _idx_files(directory: Path) -> None:
    """The four files of a tiny valid Fashion-MNIST: 3 train and 2 test images of 28x28."""
    directory.mkdir()
    for stem, n in (("train", 3), ("t10k", 2)):
        images = bytes([0, 0, 8, 3]) + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28))
        labels = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big")
        (directory / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images + bytes(n * 784)))
        (directory / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels + bytes(n)))


def test_truncated_or_bad_crc_gz_names_the_file_and_the_fix(tmp_path: Path) -> None:
    data = tmp_path / "fmnist"
    _idx_files(data)
    assert load_split(data, "test")[0].shape == (2, 28, 28)
    path = data / "t10k-images-idx3-ubyte.gz"
    good = path.read_bytes()
    crc = bytearray(good)
    crc[-8] ^= 0xFF  # the gzip trailer's CRC32
    for damaged in (good[: len(good) // 2], bytes(crc)):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: damaged .*"
                                             r"apt-get install --reinstall dataset-fashion-mnist"):
            load_split(data, "test")
    assert load_split(data, "train")[0].shape == (3, 28, 28)  # the other split still loads


def test_empty_validation_split_is_a_warning(tmp_path: Path) -> None:
    data = tmp_path / "fmnist"
    _idx_files(data)
    dm = FashionMNIST(data_dir=str(data), batch_size=2, val_size=0)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 1  # 3 images, ragged last batch dropped
    with pytest.warns(UserWarning, match="val split is empty"):
        dm.val_dataloader()
