"""Conviformer pre-sizer against hand-computed arrays, numpy's reflect padding and real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from datamodules.presize import ConviformerPresize, presize, presize_folder, reflect101_index


def framed(inner: list[list[int]], border: int = 1, fill: int = -1) -> torch.Tensor:
    """``inner`` surrounded by a ``border`` of ``fill`` (what the crop must remove)."""
    array = torch.tensor(inner)
    return torch.nn.functional.pad(array, (border,) * 4, value=fill)


def test_tall_is_padded_on_the_right_with_reflect_101() -> None:
    image = framed([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12], [13, 14, 15]])  # 5x3 inside
    expected = torch.tensor([[1, 2, 3, 2, 1],
                             [4, 5, 6, 5, 4],
                             [7, 8, 9, 8, 7],
                             [10, 11, 12, 11, 10],
                             [13, 14, 15, 14, 13]])
    assert torch.equal(presize(image, border=1), expected)


def test_wide_is_padded_on_the_top() -> None:
    image = framed([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])  # 2x5 inside: pad 3 rows on top
    expected = torch.tensor([[6, 7, 8, 9, 10],
                             [1, 2, 3, 4, 5],
                             [6, 7, 8, 9, 10],
                             [1, 2, 3, 4, 5],
                             [6, 7, 8, 9, 10]])
    assert torch.equal(presize(image, border=1), expected)


def test_square_is_only_cropped() -> None:
    image = framed([[1, 2], [3, 4]], border=2)
    assert torch.equal(presize(image, border=2), torch.tensor([[1, 2], [3, 4]]))


def test_three_to_one_reflects_repeatedly() -> None:
    inner = [[3 * r + c for c in range(3)] for r in range(9)]  # 9x3: 6 columns of padding > 3 - 1
    row = [0, 1, 2, 1, 0, 1, 2, 1, 0]  # columns 3..8 reflect 1, 0, 1, 2, 1, 0 (period 4)
    expected = torch.tensor([[3 * r + c for c in row] for r in range(9)])
    assert torch.equal(presize(framed(inner), border=1), expected)
    wide = torch.arange(12).view(2, 6)  # 1:3 wide with border 0: 4 rows on top, period 2
    assert torch.equal(presize(wide, border=0), wide[[0, 1, 0, 1, 0, 1]])


@pytest.mark.parametrize("size, before, after", [(5, 0, 2), (3, 0, 6), (4, 9, 0), (2, 7, 0), (7, 0, 30)])
def test_index_matches_numpy_reflect(size: int, before: int, after: int) -> None:
    values = np.arange(size)
    expected = np.pad(values, (before, after), mode="reflect")  # numpy "reflect" = REFLECT_101
    assert reflect101_index(size, before, after).numpy().tolist() == expected.tolist()


@pytest.mark.parametrize("name", ["china.jpg", "flower.jpg"])
def test_real_photos_wide_and_tall(name: str) -> None:
    photo = torch.from_numpy(np.array(load_sample_image(name))).permute(2, 0, 1)  # (3, 427, 640): wide
    out = presize(photo, border=20)
    assert out.shape == (3, 600, 600)
    crop = photo[:, 20:-20, 20:-20]  # (3, 387, 600)
    assert torch.equal(out[:, 213:], crop)  # the image sits at the bottom
    for i in range(213):  # row i of the strip mirrors crop row 213 - i (edge row not repeated)
        assert torch.equal(out[:, i], crop[:, 213 - i])
    tall = photo.transpose(1, 2)  # (3, 640, 427): padded on the right, an hflipped strip
    out_tall = presize(tall, border=20)
    assert out_tall.shape == (3, 600, 600)
    crop_tall = tall[:, 20:-20, 20:-20]
    assert torch.equal(out_tall[:, :, :387], crop_tall)
    assert torch.equal(out_tall[:, :, 387:], crop_tall[:, :, 385 - 212:386].flip(-1))


def test_transform_on_pil_equals_tensor_path_and_folder_tool(tmp_path) -> None:
    photo = np.array(load_sample_image("flower.jpg")[:300, :120])  # tall 300x120 crop
    image = Image.fromarray(photo)
    out = ConviformerPresize(border=20)(image)
    assert isinstance(out, Image.Image) and out.size == (260, 260)
    expected = presize(torch.from_numpy(photo).permute(2, 0, 1), 20).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(out), expected)
    gray = ConviformerPresize(border=2)(Image.fromarray(photo[:10, :30, 0]))
    assert gray.mode == "L" and gray.size == (26, 26)

    (tmp_path / "src" / "a").mkdir(parents=True)
    image.save(tmp_path / "src" / "a" / "tall.png")
    Image.fromarray(photo.transpose(1, 0, 2).copy()).save(tmp_path / "src" / "wide.png")
    assert presize_folder(tmp_path / "src", tmp_path / "dst", border=20) == 2
    tall_out = np.asarray(Image.open(tmp_path / "dst" / "a" / "tall.png"))
    assert np.array_equal(tall_out, expected)  # PNG is lossless
    assert Image.open(tmp_path / "dst" / "wide.png").size == (260, 260)


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ValueError, match="border: a 20 px border leaves nothing of a 30x100 image"):
        presize(torch.zeros(30, 100), border=20)
    with pytest.raises(ValueError, match="border must be >= 0"):
        ConviformerPresize(border=-1)
    with pytest.raises(ValueError, match="src:"):
        presize_folder("/nonexistent/folder", "/tmp/out")
