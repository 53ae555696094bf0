"""ImageFolder on real image files written to tmp: crops of scikit-learn's sample photos (any
sizes and aspect ratios) and Fashion-MNIST images saved as PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from datamodules.fashion_mnist import load_split
from datamodules.image_folder import ImageFolder
from tests.conftest import FMNIST_DIR, needs_fmnist


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """train/ and val/ with two classes (china, flower), crops from 40x40 to 300x100 (3:1)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    sizes = [(40, 40), (120, 60), (60, 180), (300, 100), (100, 300), (90, 70)]
    for name in ("china", "flower"):
        photo = load_sample_image(f"{name}.jpg")
        for split, count in (("train", 6), ("val", 2)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                h, w = sizes[i % len(sizes)]
                top, left = rng.integers(0, 427 - h), rng.integers(0, 640 - w)
                Image.fromarray(photo[top:top + h, left:left + w]).save(root / split / name / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def fmnist_folder(tmp_path_factory):
    """Fashion-MNIST test images 0..23 saved as 28x28 grayscale PNGs under train/<class>/."""
    root = tmp_path_factory.mktemp("fmnist")
    images, labels = load_split(FMNIST_DIR, "test")
    for i in range(24):
        folder = root / "train" / f"class{labels[i].item()}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].numpy()).save(folder / f"{i}.png")
    return root, images[:24], labels[:24]


def test_photos_of_any_size_become_batches(photo_folder) -> None:
    data = ImageFolder(str(photo_folder), image_size=32, batch_size=4, num_workers=0, presize_border=5)
    data.setup("fit")
    assert data.classes == ["china", "flower"] and data.num_classes == 2
    assert len(data.train_set) == 12 and len(data.val_set) == 4
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    val_images, val_labels = next(iter(data.val_dataloader()))
    assert val_images.shape == (4, 3, 32, 32)
    assert val_labels.tolist() == [0, 0, 1, 1]  # folder order = class index
    assert data.test_set is data.val_set  # no test/ folder


@needs_fmnist
def test_fmnist_pngs_round_trip_through_the_eval_transform(fmnist_folder) -> None:
    """At the native 28 px with crop_pct 1, the eval transform is exactly pixel / 255 normalised."""
    root, images, labels = fmnist_folder
    data = ImageFolder(str(root), image_size=28, batch_size=24, num_workers=0, in_chans=1,
                       val_fraction=0.25, crop_pct=1.0, mean=[0.2860], std=[0.3530])
    data.setup("fit")
    assert len(data.train_set) == 18 and len(data.val_set) == 6
    loaded, folder_labels = next(iter(data.val_dataloader()))
    assert loaded.shape == (6, 1, 28, 28)
    files = [data.val_set.folder.samples[i][0] for i in data.val_set.indices]
    for k, path in enumerate(files):
        index = int(path.rsplit("/", 1)[1].split(".")[0])
        expected = (images[index].float() / 255 - 0.2860) / 0.3530
        torch.testing.assert_close(loaded[k, 0], expected, rtol=0, atol=1e-5)
        assert data.classes[folder_labels[k]] == f"class{labels[index].item()}"


def test_pre_transforms_and_custom_transforms_replace_timms(photo_folder) -> None:
    from torchvision.transforms import v2

    from datamodules.presize import ConviformerPresize

    data = ImageFolder(str(photo_folder), image_size=16, num_workers=0, batch_size=2,
                       pre_transforms=[ConviformerPresize(border=2)],
                       eval_transforms=[v2.PILToTensor(), v2.Resize((16, 16))])
    data.setup("fit")
    image, _ = data.val_set[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)


def test_bad_input_names_the_field(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="data_dir: .* must hold one sub-folder of images per class"):
        ImageFolder(str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="in_chans must be 1"):
        ImageFolder(str(tmp_path), in_chans=2)
    with pytest.raises(ValueError, match="mean/std: need 1 values"):
        ImageFolder(str(tmp_path), in_chans=1, mean=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="image_size must be >= 1"):
        ImageFolder(str(tmp_path), image_size=0)


def _with_truncated_jpeg(photo_folder, tmp_path):
    import shutil

    root = tmp_path / "photos"
    shutil.copytree(photo_folder, root)
    victim = root / "train" / "china" / "3.jpg"
    victim.write_bytes(victim.read_bytes()[:400])  # cut inside the entropy-coded data
    return root, victim


def test_truncated_jpeg_is_named_or_skipped_and_counted(photo_folder, tmp_path, caplog) -> None:
    root, victim = _with_truncated_jpeg(photo_folder, tmp_path)
    data = ImageFolder(str(root), image_size=32, batch_size=4, num_workers=0)
    data.setup("fit")
    with pytest.raises(ValueError, match=f"{victim}: not a readable image .*remove or replace the "
                                         "file, or set --data.init_args.on_bad_image skip"):
        for _ in data.train_dataloader():
            pass
    data = ImageFolder(str(root), image_size=32, batch_size=4, num_workers=0, on_bad_image="skip")
    data.setup("fit")
    with caplog.at_level("WARNING", logger="datamodules.image_folder"):
        sizes = [len(labels) for _, labels in data.train_dataloader()]
        sizes += [len(labels) for _, labels in data.train_dataloader()]
    assert sum(sizes) == 2 * (12 - 1)  # the bad image left out of both epochs, the rest kept
    assert data.train_set.skipped == 2
    assert str(victim) in caplog.text and "2 skipped so far" in caplog.text
    with pytest.raises(ValueError, match="on_bad_image must be 'error' or 'skip'"):
        ImageFolder(str(root), on_bad_image="ignore")
