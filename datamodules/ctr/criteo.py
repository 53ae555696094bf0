"""Criteo click logs: the TSV text format (plain or gzip) and torchrec's binary ``.npy`` layout.

Text lines are ``label \\t int_0 .. int_12 \\t cat_0 .. cat_25``: a 0/1 label, 13 integer
counts and 26 categorical ids as hex strings; any field but the label may be empty (missing ->
0). Dense features become ``log(1 + max(x, 0))``; categorical ids are hashed into
``hash_size`` rows by modulo (torchrec's ``criteo.py`` layout, without its per-file minimum
shift of the dense values). Binary files are torchrec's preprocessed ``day_N_{dense,sparse,labels}.npy``
(dense already log-transformed by torchrec's script: taken as stored; sparse ids hashed here).

Every line is read by exactly one DataLoader worker of one DDP rank (:mod:`datamodules.ctr.sharding`):
with several readers, plain text files are indexed once before the readers start (the byte
offset of every batch's first line, :class:`LineIndex`) and each reader seeks to its own global
batches and parses only those (in bulk with numpy), so throughput grows with DataLoader workers.
gzip cannot seek: there (and without an index) a reader scans the stream as bytes, counting
newlines per block for the lines of other readers. Malformed lines either stop the run
with ``file:line`` (``on_malformed: error``) or are skipped, counted and reported per reader
(``on_malformed: count``); they are never dropped silently.

Batches are :class:`~datamodules.ctr.batch.PackedBatch` es (one tensor per batch from the workers
to the training process, unpacked on the GPU); hash sizes must stay below ``2**31``.

Nothing to read is an error before the model is built (``setup``): no training files, an empty
file, fewer training lines than one batch per device, ``.npy`` files whose row counts disagree;
an unreadable (e.g. truncated gzip) file is named when the reader reaches it. Training streams
resume mid-epoch at the first line not yet trained on (:class:`datamodules.ctr.stream.StreamLoader`).
"""

from __future__ import annotations

import gzip
import logging
import os
from itertools import islice
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from datamodules.ctr.batch import MAX_PACKED_ID, CTRSchema, PackedBatch, pack_batch
from datamodules.ctr.sharding import current_reader, num_global_batches
from datamodules.ctr.stream import BatchStream, StreamLoader
from datamodules.loader import check_split_size

NUM_INT, NUM_CAT = 13, 26
NUM_FIELDS = 1 + NUM_INT + NUM_CAT
SPARSE_NAMES = tuple(f"cat_{i}" for i in range(NUM_CAT))
log = logging.getLogger(__name__)
NO_TRAIN_FILES = (
    "train_files: no training files given; give them on the command line, e.g. "
    "--data.init_args.train_files='[day_0.gz, day_1.gz]' (Criteo .tsv/.txt, plain or gzip, or "
    "torchrec's day_N_dense.npy)")


class MalformedLine(ValueError):
    """A Criteo text line that does not parse; the message names ``file:line``."""


def parse_line(text: str) -> tuple[int, list[int], list[int]]:
    """Label, 13 ints and 26 hex ids of one line (missing -> 0); raises ValueError if malformed."""
    parts = text.rstrip("\r\n").split("\t")
    if len(parts) != NUM_FIELDS:
        raise ValueError(f"expected {NUM_FIELDS} tab-separated fields, got {len(parts)}")
    if parts[0] not in ("0", "1"):
        raise ValueError(f"label must be 0 or 1, got {parts[0]!r}")
    try:
        ints = [int(x) if x else 0 for x in parts[1:1 + NUM_INT]]
    except ValueError as err:
        raise ValueError(f"integer feature: {err}") from None
    try:
        cats = [int(x, 16) if x else 0 for x in parts[1 + NUM_INT:]]
    except ValueError as err:
        raise ValueError(f"categorical feature (hex expected): {err}") from None
    return int(parts[0]), ints, cats


_HEX = np.full(256, 255, dtype=np.int64)  # hex digit value of each byte, 255 = not a digit
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i
_DEC = np.full(256, 255, dtype=np.int64)
_DEC[48:58] = np.arange(10)


def _digits(buf: np.ndarray, start: np.ndarray, length: np.ndarray, table: np.ndarray,
            base: int) -> np.ndarray | None:
    """Values of the digit strings ``buf[start:start + length]`` (elementwise), or None if a
    character is not a digit of ``table`` or a string is too long for int64."""
    width = int(length.max(initial=0))
    if width > (15 if base == 16 else 18):
        return None
    value = np.zeros(start.shape, dtype=np.int64)
    for k in range(width):
        live = k < length
        d = table[buf[np.where(live, start + k, 0)]]
        if (live & (d == 255)).any():
            return None
        value = np.where(live, value * base + d, value)
    return value


def parse_lines_fast(lines: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Labels ``(n,)``, ints ``(n, 13)`` and hex ids ``(n, 26)`` of well-formed lines, parsed in
    bulk with numpy on the raw bytes (the values :func:`parse_line` gives); None if any line is
    not plainly well-formed, so the caller parses line by line (and reports what is wrong)."""
    n = len(lines)
    blob = b"".join(lines).replace(b"\r\n", b"\n")
    if n == 0 or blob.count(b"\n") != n or not blob.endswith(b"\n"):
        return None
    buf = np.frombuffer(blob.replace(b"\n", b"\t"), dtype=np.uint8)
    ends = np.flatnonzero(buf == 9)  # one tab after every field
    if len(ends) != n * NUM_FIELDS:
        return None
    starts = np.empty_like(ends)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    starts, length = starts.reshape(n, NUM_FIELDS), (ends - starts).reshape(n, NUM_FIELDS)
    if (length[:, 0] != 1).any():
        return None
    labels = buf[starts[:, 0]].astype(np.int64) - 48
    if ((labels != 0) & (labels != 1)).any():
        return None
    s, l = starts[:, 1:1 + NUM_INT], length[:, 1:1 + NUM_INT]
    neg = (l > 0) & (buf[np.where(l > 0, s, 0)] == 45)  # a leading minus sign
    if (neg & (l == 1)).any():
        return None
    ints = _digits(buf, s + neg, l - neg, _DEC, 10)
    cats = _digits(buf, starts[:, 1 + NUM_INT:], length[:, 1 + NUM_INT:], _HEX, 16)
    if ints is None or cats is None:
        return None
    return labels, np.where(neg, -ints, ints), cats


def _in_worker() -> bool:
    """In a DataLoader worker (batches are then made in shared memory, sent without a copy)."""
    return torch.utils.data.get_worker_info() is not None


def dense_transform(ints: np.ndarray) -> np.ndarray:
    """``log(1 + max(x, 0))`` as float32 (negative counts, which Criteo has, clamp to 0)."""
    return np.log1p(np.maximum(ints, 0).astype(np.float64)).astype(np.float32)


def open_text(path: str | Path):
    """A text file as binary lines, gunzipped when it starts with gzip's magic bytes (lines are
    decoded only where parsed in bulk is not possible, so skipping other readers' lines is cheap)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


class LineIndex:
    """Byte offsets of the lines that start global batches (every ``stride``-th line of the
    stream), so that a reader seeks straight to its next batch instead of reading the lines of
    the batches of other readers.

    Built by one newline scan of the files (numpy, in large blocks) before the readers start.
    Only plain text can seek: indexing stops at the first gzip file, whose lines (and those of
    every later file) the readers still scan. ``max_lines`` stops the scan at the sample budget.
    """

    BLOCK = 1 << 24

    def __init__(self, files: list[str], stride: int, max_lines: int | None = None) -> None:
        self.stride = stride
        # (file number, first global line, lines, first indexed local line, byte offsets)
        self.entries: list[tuple[int, int, int, int, np.ndarray]] = []
        first = 0
        for number, path in enumerate(files):
            if (max_lines is not None and first >= max_lines) or is_gzip(path):
                break
            start = (-first) % stride  # the file's first line that starts a global batch
            budget = None if max_lines is None else max_lines - first
            lines, offsets = self._scan(path, start, budget)
            self.entries.append((number, first, lines, start, offsets))
            first += lines

    def _scan(self, path: str, start: int, max_lines: int | None) -> tuple[int, np.ndarray]:
        """Lines of the file (counted up to ``max_lines`` or a little beyond) and the byte
        offsets of its lines ``start, start + stride, ...``."""
        stride = self.stride
        parts = [np.zeros(1, np.int64)] if start == 0 else []
        newlines, size, last = 0, 0, 10
        with open(path, "rb") as f:
            while True:
                block = f.read(self.BLOCK)
                if not block:
                    break
                ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
                # Newline m ends line m, so line m + 1 starts after it: the wanted newlines are
                # those with m = start - 1 (mod stride).
                skip = (start - 1 - newlines) % stride
                parts.append(ends[skip::stride].astype(np.int64) + (size + 1))
                newlines, size, last = newlines + len(ends), size + len(block), block[-1]
                if max_lines is not None and newlines >= max_lines:
                    break
        lines = newlines + (1 if size and last != 10 else 0)  # a last line without a newline
        offsets = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        keep = max(0, -(-(lines - start) // stride))  # indexed lines that exist
        return lines, offsets[:keep]

    def locate(self, target: int) -> tuple[int, int, int] | None:
        """(file number, line within that file, byte offset) of global line ``target``, or
        None when it is not indexed."""
        for number, first, lines, start, offsets in self.entries:
            if first <= target < first + lines:
                j, rest = divmod(target - first - start, self.stride)
                if rest == 0 and 0 <= j < len(offsets):
                    return number, target - first, int(offsets[j])
                return None
        return None


class _Lines:
    """All lines of several files as one stream, with position, skipping and file:line.

    Files are read as bytes in large blocks: skipping counts newlines in each block (C speed,
    nothing decoded or split), and taking splits off only the lines taken. A last line without
    a newline is a line like the others. With a :class:`LineIndex`, skipping to an indexed line
    seeks to its byte offset instead.
    """

    BLOCK = 1 << 20

    def __init__(self, files: list[str], index: LineIndex | None = None) -> None:
        self.files = files
        self.index = index
        self.pos = 0
        self._index = -1
        self._f = None
        self._path = ""
        self._number = 0  # lines of the current file consumed so far
        self._buf = b""
        self._eof = True

    def _open_next(self) -> bool:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._index += 1
        if self._index >= len(self.files):
            return False
        self._path = self.files[self._index]
        self._f, self._number, self._buf, self._eof = open_text(self._path), 0, b"", False
        return True

    def _fill(self) -> bool:
        """Append a block of the current file to the buffer; False when the file is used up."""
        if self._eof:
            return False
        try:
            block = self._f.read1(self.BLOCK)  # what one underlying read gives (a damaged
            # gzip fails where the damage is, not a block early)
        except (OSError, EOFError) as err:  # truncated gzip
            raise ValueError(f"{self._path}: unreadable after line {self._number} ({err}); the "
                             "file is damaged or truncated: download or decompress it again, "
                             "or remove it from the list") from err
        if block:
            self._buf += block
            return True
        self._eof = True
        if self._buf:  # a last line without its newline
            self._buf += b"\n"
            return True
        return False

    def _current(self) -> bool:
        """True while a file is open with data left (opening the next one as needed)."""
        while True:
            if self._f is not None and (self._buf or self._fill()):
                return True
            if not self._open_next():
                return False

    def skip_to(self, target: int) -> bool:
        """Advance to line ``target``; False if the stream ends first."""
        place = self.index.locate(target) if self.index is not None and target > self.pos else None
        if place is not None:
            number, line, offset = place
            if self._f is None or self._index != number:
                if self._f is not None:
                    self._f.close()
                self._index, self._path = number, self.files[number]
                self._f = open(self._path, "rb", buffering=1 << 20)  # indexed: plain text
            self._f.seek(offset)
            self._buf, self._eof, self._number, self.pos = b"", False, line, target
            return True
        while self.pos < target and self._current():
            need = target - self.pos
            count = self._buf.count(b"\n")
            if count >= need:
                self._buf = self._buf.split(b"\n", need)[-1]
                self.pos, self._number = self.pos + need, self._number + need
                break
            if count:
                self._buf = self._buf[self._buf.rfind(b"\n") + 1:]
                self.pos, self._number = self.pos + count, self._number + count
            if not self._fill():
                self._buf = b""
                self._open_next_or_end()
        return self.pos == target

    def _open_next_or_end(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def take(self, count: int) -> list[tuple[str, int, bytes]]:
        lines: list[tuple[str, int, bytes]] = []
        while len(lines) < count and self._current():
            parts = self._buf.split(b"\n", count - len(lines))
            complete, self._buf = parts[:-1], parts[-1]
            first = self._number
            lines += [(self._path, first + i, text + b"\n") for i, text in enumerate(complete, 1)]
            self._number += len(complete)
            if len(lines) < count and not self._fill():
                self._buf = b""
                self._open_next_or_end()
        self.pos += len(lines)
        return lines


class CriteoTextStream(IterableDataset):
    """Batches of Criteo TSV lines; see the module docstring for sharding and malformed lines.

    Args:
        files: text files, read in order as one stream.
        batch_size: lines per global batch.
        hash_sizes: per categorical feature, ids are taken modulo this.
        max_samples: read only the first this many lines (the sample budget).
        drop_last: training mode: only whole batches, and equal batch counts on every rank.
        on_malformed: ``"error"`` or ``"count"``.
    """

    def __init__(self, files: list[str], batch_size: int, hash_sizes: tuple[int, ...],
                 max_samples: int | None, drop_last: bool,
                 on_malformed: Literal["error", "count"]) -> None:
        super().__init__()
        self.files, self.batch_size = files, batch_size
        self.hash_sizes = np.asarray(hash_sizes, dtype=np.int64)
        self.max_samples, self.drop_last, self.on_malformed = max_samples, drop_last, on_malformed
        self.epoch, self.first_batch = 0, 0  # see StreamLoader: resume at global batch first_batch
        self.malformed = 0
        self.first_malformed: str | None = None
        self.index: LineIndex | None = None

    def build_index(self) -> None:
        """Index the batch starts of the plain text files (:class:`LineIndex`), so that each
        reader seeks to its own batches: call it before the readers start (one scan here
        instead of one per reader)."""
        self.index = LineIndex(self.files, self.batch_size, self.max_samples)

    def parse(self, lines: list[tuple[str, int, bytes]], start: int):
        bulk = parse_lines_fast([text for _path, _number, text in lines])
        if bulk is not None:  # the common case: every line well-formed, parsed with numpy
            labels, ints, cats = bulk
            return pack_batch(dense_transform(ints), cats % self.hash_sizes, labels,
                              np.arange(start, start + len(lines)), SPARSE_NAMES, _in_worker())
        labels, ints, cats, keep = [], [], [], []
        for offset, (path, number, text) in enumerate(lines):
            try:
                label, i, c = parse_line(text.decode("utf-8"))  # bad bytes: a ValueError too
            except ValueError as err:
                where = f"{path}:{number}: {err}"
                if self.on_malformed == "error":
                    raise MalformedLine(f"{where}; fix or remove the line, or set "
                                        f"on_malformed: count to skip and count such lines") from None
                self.malformed += 1
                self.first_malformed = self.first_malformed or where
                continue
            labels.append(label)
            ints.append(i)
            cats.append(c)
            keep.append(start + offset)
        if not labels:
            return None
        ids = np.asarray(cats, dtype=np.int64) % self.hash_sizes
        dense = dense_transform(np.asarray(ints, dtype=np.int64))
        return pack_batch(dense, ids, np.asarray(labels), np.asarray(keep), SPARSE_NAMES,
                          _in_worker())

    def epoch_batches(self, world_size: int) -> None:
        return None  # unknown until the files are read

    def __iter__(self):
        reader = current_reader()
        self.malformed, self.first_malformed = 0, None
        first, self.first_batch, self.epoch = self.first_batch, 0, self.epoch + 1
        b, world = self.batch_size, reader.world_size
        limit = None
        if self.max_samples is not None:
            limit = num_global_batches(self.max_samples, b, world, self.drop_last, first)
        src = _Lines(self.files, self.index)
        pending, pending_end = None, 0
        k = first + reader.index
        while limit is None or k < limit:
            start = k * b
            reached = src.skip_to(start)
            if pending is not None:
                # Yield the held batch only if its whole round of `world` batches exists, so
                # every rank runs the same number of steps.
                if src.pos >= pending_end:
                    yield pending
                pending = None
            if not reached:
                break
            count = b if self.max_samples is None else min(b, self.max_samples - start)
            lines = src.take(count)
            if not lines or (self.drop_last and len(lines) < b):
                break
            batch = self.parse(lines, start)
            if batch is None:
                pass
            elif self.drop_last and world > 1:
                pending, pending_end = batch, (first + ((k - first) // world + 1) * world) * b
            else:
                yield batch
            k += reader.count
        if pending is not None and src.skip_to(pending_end):
            yield pending
        if self.malformed:
            log.warning("Criteo reader %d/%d skipped %d malformed lines (first: %s)",
                        reader.index, reader.count, self.malformed, self.first_malformed)


class NpyColumns:
    """One ``.npy`` file of a day opened for reading rows: its dtype, row width and where its data
    starts, and a file descriptor for ``os.pread`` (one per process: not picklable)."""

    def __init__(self, path: str) -> None:
        array = np.load(path, mmap_mode="r")
        self.path, self.dtype = path, array.dtype
        self.width = int(np.prod(array.shape[1:], dtype=np.int64))
        self.offset = int(array.offset)
        self.array = array  # the memory map, for rows that are not one contiguous range
        self.fd = os.open(path, os.O_RDONLY)

    def read_into(self, out: np.ndarray, lo: int) -> None:
        """Rows ``lo .. lo + len(out)`` into ``out`` (C-contiguous, this file's dtype and width):
        one ``pread`` from the page cache, where copying from the memory map would fault on
        every 4 KB page the first time this process touches it (once per page per epoch)."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        at, start = 0, self.offset + lo * self.width * self.dtype.itemsize
        while at < len(view):
            got = os.preadv(self.fd, [view[at:]], start + at)
            if got <= 0:
                raise ValueError(f"{self.path}: ended before row {lo + len(out)}; the file is "
                                 "truncated: write it again")
            at += got

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)


class NpySource:
    """torchrec's binary layout: ``<stem>_dense.npy`` (N, 13) float32, ``<stem>_sparse.npy``
    (N, 26) int, ``<stem>_labels.npy`` (N, 1); addressed by global row, made into
    :class:`~datamodules.ctr.batch.PackedBatch` es.

    A batch of consecutive rows (the unshuffled stream) is read with one ``pread`` per file part
    into the packed batch itself (the dense rows) or a reused scratch buffer (ids, labels); other
    index sets are gathered from the memory maps. Ids are hashed (modulo) here, in the workers.
    """

    def __init__(self, stems: list[str], hash_sizes: tuple[int, ...]) -> None:
        self.stems = stems
        self.hash_sizes = np.asarray(hash_sizes, dtype=np.int64)
        self._files: list[tuple[NpyColumns, NpyColumns, NpyColumns]] | None = None
        self._scratch: dict[tuple[str, int], np.ndarray] = {}
        self.rows = [npy_rows(s) for s in stems]
        self.starts = np.cumsum([0] + self.rows)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": None, "_scratch": {}}  # workers open their own

    def _open(self) -> list[tuple[NpyColumns, NpyColumns, NpyColumns]]:
        if self._files is None:
            self._files = [tuple(NpyColumns(f"{s}_{part}.npy") for part in ("dense", "sparse", "labels"))
                           for s in self.stems]
        return self._files

    def _buffer(self, name: str, rows: int, columns: NpyColumns) -> np.ndarray:
        """A scratch array of ``rows`` rows of ``columns``' dtype and width, reused per process."""
        key = (name, columns.dtype.num)
        if key not in self._scratch or len(self._scratch[key]) < rows:
            self._scratch[key] = np.empty((rows, columns.width), dtype=columns.dtype)
        return self._scratch[key][:rows]

    def __call__(self, indices: np.ndarray) -> PackedBatch:
        indices = np.asarray(indices, dtype=np.int64)
        files = self._open()
        batch, out = PackedBatch.empty(len(indices), NUM_INT, SPARSE_NAMES,
                                       shared=torch.utils.data.get_worker_info() is not None)
        out["indices"][:] = indices
        file_of = np.searchsorted(self.starts, indices, side="right") - 1
        for f in np.unique(file_of):  # batches crossing into the next day's files: two parts
            where = np.flatnonzero(file_of == f)  # the part's places in the batch
            rows = indices[where] - self.starts[f]
            n, lo = len(rows), int(rows[0])
            dense, sparse, labels = files[f]
            if (np.diff(rows) == 1).all() and where[-1] - where[0] == n - 1:  # consecutive: read
                part = slice(int(where[0]), int(where[0]) + n)
                if dense.dtype == np.float32:
                    dense.read_into(out["dense"][part], lo)
                else:
                    out["dense"][part] = dense.array[lo:lo + n]
                ids = self._buffer("ids", n, sparse)
                sparse.read_into(ids, lo)
                flags = self._buffer("labels", n, labels)
                labels.read_into(flags, lo)
            else:  # any other order: gather from the memory maps
                part = where
                out["dense"][part] = dense.array[rows]
                ids = np.asarray(sparse.array[rows])
                flags = np.asarray(labels.array[rows]).reshape(n, -1)
            if ids.dtype != np.int64:
                ids = ids.astype(np.int64)
            np.remainder(ids, self.hash_sizes, out=ids)
            out["ids"][:, part] = ids.T
            out["labels"][part] = flags[:, 0]
        return batch


def npy_rows(stem: str) -> int:
    """Rows of one day's three ``.npy`` files; an error naming them unless they agree in rows
    and hold (N, 13) dense, (N, 26) sparse and (N,) or (N, 1) labels."""
    shapes = {}
    for part in ("dense", "sparse", "labels"):
        path = f"{stem}_{part}.npy"
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} not found: torchrec's layout needs {stem}_dense.npy, "
                                    f"{stem}_sparse.npy and {stem}_labels.npy side by side")
        try:
            shapes[path] = np.load(path, mmap_mode="r").shape
        except ValueError as err:  # numpy's own message for a truncated or foreign file
            raise ValueError(f"{path}: not a readable .npy file ({err}); write it again") from err
    (dense, d), (sparse, s), (labels, l) = shapes.items()
    if len({d[0], s[0], l[0]}) != 1:
        raise ValueError(f"row counts disagree: {dense} has {d[0]}, {sparse} has {s[0]}, {labels} "
                         f"has {l[0]}; the three files of one day must hold the same samples")
    if d[1:] != (NUM_INT,) or s[1:] != (NUM_CAT,) or l[1:] not in ((), (1,)):
        raise ValueError(f"shapes {d} / {s} / {l} of {stem}_{{dense,sparse,labels}}.npy: "
                         f"expected (N, {NUM_INT}), (N, {NUM_CAT}) and (N,) or (N, 1)")
    if d[0] == 0:
        raise ValueError(f"{dense}: 0 rows; remove the day from the list or write it again")
    return int(d[0])


def count_lines(path: str, limit: int) -> int:
    """Lines of a text file (gzip or plain), counting no further than ``limit``."""
    lines = _Lines([path])
    lines.skip_to(limit)
    return lines.pos


def npy_stem(path: str) -> str | None:
    """``/d/day_0`` for ``/d/day_0_dense.npy`` (or any of the three), else None."""
    for part in ("_dense.npy", "_sparse.npy", "_labels.npy"):
        if path.endswith(part):
            return path[: -len(part)]
    return None


class CriteoTSV(LightningDataModule):
    """Criteo click logs from text (``.tsv``, ``.txt``, gzip) or torchrec ``.npy`` files.

    Args:
        train_files, val_files, test_files: files of each split, read in order; a split is
            all text or all ``*_dense.npy`` (naming torchrec's three files by the dense one).
        batch_size: samples per batch (per device).
        hash_size: categorical ids are taken modulo this (one int, or one per feature); also
            the cardinality the model caps its tables (V, ``num_embeddings``) at.
        train_samples: the sample budget (single epoch: the first N lines, each seen once);
            ``None`` reads every training line.
        val_samples, test_samples: read only this many evaluation lines (``None`` = all).
        on_malformed: ``"error"`` stops at the first bad line with ``file:line``; ``"count"``
            skips such lines and reports how many (and the first) per reader.
        num_workers: DataLoader workers per device.
    """

    def __init__(
        self,
        train_files: list[str],
        val_files: list[str] | None = None,
        test_files: list[str] | None = None,
        batch_size: int = 2048,
        hash_size: int | list[int] = 40_000_000,
        train_samples: int | None = None,
        val_samples: int | None = None,
        test_samples: int | None = None,
        on_malformed: Literal["error", "count"] = "error",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if on_malformed not in ("error", "count"):
            raise ValueError(f"on_malformed must be 'error' or 'count', got {on_malformed!r}")
        sizes = [hash_size] * NUM_CAT if isinstance(hash_size, int) else list(hash_size)
        if len(sizes) != NUM_CAT or any(s < 1 for s in sizes):
            raise ValueError(f"hash_size must be an int >= 1 or {NUM_CAT} of them, got {hash_size!r}")
        if max(sizes) > MAX_PACKED_ID + 1:
            raise ValueError(f"hash_size must be at most 2**31 rows per table (ids travel as "
                             f"int32), got {hash_size!r}")
        self.save_hyperparameters()
        self.files = {"train": list(train_files), "val": list(val_files or []),
                      "test": list(test_files or [])}
        for split, files in self.files.items():
            for path in files:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"{split}_files: {path!r} does not exist; give paths "
                                            "to Criteo .tsv/.gz files or torchrec *_dense.npy files")
        self.hash_sizes = tuple(sizes)
        self.batch_size, self.num_workers, self.on_malformed = batch_size, num_workers, on_malformed
        self.budgets = {"train": train_samples, "val": val_samples, "test": test_samples}
        self.schema = CTRSchema(NUM_INT, SPARSE_NAMES, self.hash_sizes)

    def dataset(self, split: str) -> IterableDataset:
        files, budget, train = self.files[split], self.budgets[split], split == "train"
        stems = [npy_stem(f) for f in files]
        if all(stems):
            source = NpySource(stems, self.hash_sizes)
            total = len(source) if budget is None else min(budget, len(source))
            return BatchStream(total, self.batch_size, source, drop_last=train)
        if any(stems):
            raise ValueError(f"{split}_files: mixes .npy and text files; use one format per split")
        return CriteoTextStream(files, self.batch_size, self.hash_sizes, budget, train,
                                self.on_malformed)

    def setup(self, stage: str | None = None) -> None:
        """Before the model is built: every file of the stage's splits holds samples, ``.npy``
        files agree in rows, and the training split makes a whole batch on every device."""
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                  "predict": ("test",)}.get(stage, ("train", "val", "test"))
        if "train" in splits and not self.files["train"]:
            raise ValueError(NO_TRAIN_FILES)
        world = self.trainer.world_size if self.trainer is not None else 1
        for split in splits:
            files, budget = self.files[split], self.budgets[split]
            if not files:
                continue
            need = self.batch_size * world if split == "train" else 1
            if budget is not None:
                need = min(need, budget)
            stems = [npy_stem(f) for f in files]
            if all(stems):
                samples = len(NpySource(stems, self.hash_sizes))
            else:
                samples = 0
                for path in files:
                    lines = count_lines(path, max(need - samples, 1))
                    if lines == 0:
                        raise ValueError(f"{split}_files: {path} is empty; remove it from the "
                                         "list or download it again")
                    samples += lines
            if budget is not None:
                samples = min(samples, budget)
            check_split_size(split, samples, self.batch_size, world,
                             f"{split}_files {files}" if budget is None
                             else f"{split}_samples {budget} of {split}_files {files}")

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        stream = self.dataset(split)
        world = self.trainer.world_size if self.trainer is not None else 1
        if isinstance(stream, CriteoTextStream) and max(self.num_workers, 1) * world > 1:
            stream.build_index()  # several readers: each seeks to its own batches
        # Pinned host batches on a GPU machine: DLRMModule copies them without blocking.
        return StreamLoader(stream, self.num_workers, self.trainer if train else None,
                            pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        if not self.files["val"]:
            return []
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        if not self.files["test"]:
            return []
        return self._loader("test")
