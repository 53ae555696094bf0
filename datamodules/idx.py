"""Reader for the IDX format of MNIST and Fashion-MNIST (plain or gzip).

Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
big-endian uint32 per dimension; the data follows in C order.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file (``.gz`` or not) into a tensor of its stored shape.

    A damaged file (truncated, bad gzip CRC, foreign content) raises ``ValueError`` naming it.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as err:  # truncated gzip, CRC or length mismatch
        raise ValueError(f"{path}: damaged ({type(err).__name__}: {err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[data[2]])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"{path}: header says {dims} x {dtype.itemsize} bytes, file holds {len(data) - offset}"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))
