"""The Conviformer pre-sizer (Vaishnav et al., "Conviformer: Convolutionally guided Vision
Transformer", arXiv 2208.08900, Sec. 3.1).

Herbarium sheets are tall; resizing them to a square squashes them. The pre-sizer instead:

1. crops a ``border`` (20 px) frame off every side (scanner edges, rulers);
2. reflect-pads the shorter side so the image becomes square, on ONE side only: a tall image
   is padded on the RIGHT, a wide image on the TOP. The reflection is OpenCV's
   ``BORDER_REFLECT_101`` (numpy/torch ``"reflect"``: the edge pixel is not repeated), so for a
   tall image the new strip is a horizontally flipped copy of the image's right part;
3. does not resize: the training transform resizes afterwards.

When the pad is longer than the image side minus one (aspect ratios beyond about 2:1), a single
reflection does not reach far enough; the padding continues the reflection periodically, as
OpenCV does (period ``2 * (side - 1)``). torch's ``F.pad(mode="reflect")`` refuses such pads.

Use it offline (``python -m datamodules.presize SRC_DIR DST_DIR``, :func:`presize_folder`) or as a
transform (:class:`ConviformerPresize`, on PIL images or ``(..., H, W)`` tensors), e.g. in
``datamodules.ImageFolder``'s ``pre_transforms`` from YAML.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def reflect101_index(size: int, before: int, after: int) -> torch.Tensor:
    """Source index of each output position when ``size`` samples are padded by ``before`` and
    ``after`` with BORDER_REFLECT_101, repeated as often as needed."""
    if size < 1:
        raise ValueError(f"image side must be >= 1 pixel to pad, got {size!r}")
    pos = torch.arange(-before, size + after)
    if size == 1:
        return torch.zeros_like(pos)
    period = 2 * (size - 1)
    pos = pos.remainder(period)  # periodic extension of ... 0 1 .. n-1 n-2 .. 1 0 1 ...
    return torch.where(pos < size, pos, period - pos)


def presize(image: torch.Tensor, border: int = 20) -> torch.Tensor:
    """Crop ``border`` pixels off each side of ``image`` ``(..., H, W)``, then reflect-pad it
    square: right for tall images, top for wide ones. Returns ``(..., S, S)``, ``S = max(H, W) -
    2 * border``."""
    if border < 0:
        raise ValueError(f"border must be >= 0 pixels, got {border!r}")
    height, width = image.shape[-2:]
    if min(height, width) <= 2 * border:
        raise ValueError(f"border: a {border} px border leaves nothing of a {height}x{width} image; "
                         "use a smaller border")
    image = image[..., border:height - border, border:width - border]
    height, width = image.shape[-2:]
    if height > width:  # tall: pad the right side
        idx = reflect101_index(width, 0, height - width).to(image.device)
        return image.index_select(-1, idx)
    if width > height:  # wide: pad the top
        idx = reflect101_index(height, width - height, 0).to(image.device)
        return image.index_select(-2, idx)
    return image


class ConviformerPresize(nn.Module):
    """:func:`presize` as a transform for PIL images or ``(..., H, W)`` tensors.

    Args:
        border: pixels cropped off each side before padding (the paper's 20).
    """

    def __init__(self, border: int = 20) -> None:
        super().__init__()
        if border < 0:
            raise ValueError(f"border must be >= 0 pixels, got {border!r}")
        self.border = border

    def forward(self, image):
        if isinstance(image, torch.Tensor):
            return presize(image, self.border)
        import numpy as np
        from PIL import Image

        array = torch.from_numpy(np.asarray(image).copy())  # (H, W) or (H, W, C)
        chw = array.movedim(-1, 0) if array.ndim == 3 else array
        out = presize(chw, self.border)
        out = out.movedim(0, -1) if array.ndim == 3 else out
        return Image.fromarray(out.contiguous().numpy())  # uint8 (H, W[, C]): same mode back

    def extra_repr(self) -> str:
        return f"border={self.border}"


def presize_folder(src: str | Path, dst: str | Path, border: int = 20) -> int:
    """Pre-size every image under ``src`` into the same relative path under ``dst`` (lossless
    PNG for PNG inputs, JPEG quality 95 otherwise). Returns the number of images written."""
    from PIL import Image

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ValueError(f"src: {str(src)!r} is not a directory of images")
    transform = ConviformerPresize(border)
    count = 0
    for path in sorted(src.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            out = transform(image.convert("RGB") if image.mode not in ("RGB", "L") else image)
        options = {"quality": 95} if target.suffix.lower() in (".jpg", ".jpeg") else {}
        out.save(target, **options)
        count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Conviformer pre-sizer: crop a border, reflect-pad square.")
    parser.add_argument("src", help="folder of images (searched recursively)")
    parser.add_argument("dst", help="output folder (same layout)")
    parser.add_argument("--border", type=int, default=20, help="pixels cropped off each side (default 20)")
    args = parser.parse_args(argv)
    count = presize_folder(args.src, args.dst, args.border)
    print(f"pre-sized {count} images into {args.dst}")


if __name__ == "__main__":
    main()
