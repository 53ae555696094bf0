"""How fast the Criteo readers feed a GPU, and what bounds them.

``.npy`` rows (torchrec's preprocessed layout) at 1, 2, 4, ... DataLoader workers, each batch
pinned and copied to the device as training gets it. Beside each rate: the training process's
own CPU time per batch (receiving the batch from a worker, the pin-memory thread's copy, the
copy to the device): when it approaches one core the workers cannot help; the previous batch
layout (a torchrec batch of separate tensors, each sent, pinned and copied on its own) at the
same worker counts; and one worker's own rate (a batch made in the process, nothing sent), the
ceiling per worker. Criteo text (parsed per line, the slow path) optionally.
"""

from __future__ import annotations

import gzip
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_criteo_files(folder: Path, samples: int, text: bool = True) -> dict[str, Path]:
    """A Criteo-format text file (plain and gzip) and torchrec's three .npy files of it."""
    rng = np.random.default_rng(0)
    ints = rng.integers(-1, 1000, (samples, 13))
    cats = rng.integers(0, 2**32, (samples, 26))
    out = {}
    if text:
        path = folder / "day_0.tsv"
        with open(path, "w") as f:
            for n in range(samples):
                row = [str(n % 2)] + ["" if v == 5 else str(v) for v in ints[n]] + \
                      [format(v, "08x") for v in cats[n]]
                f.write("\t".join(row) + "\n")
        gz = folder / "day_0.tsv.gz"
        gz.write_bytes(gzip.compress(path.read_bytes(), 1))
        out.update(text=path, gzip=gz)
    np.save(folder / "day_0_dense.npy", np.log1p(np.maximum(ints, 0)).astype(np.float32))
    np.save(folder / "day_0_sparse.npy", cats)
    np.save(folder / "day_0_labels.npy", (np.arange(samples) % 2).reshape(-1, 1).astype(np.int32))
    out[".npy"] = folder / "day_0_dense.npy"
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def drain(loader, device: torch.device, from_start: bool = False) -> tuple[float, float]:
    """(samples/s, training-process CPU ms per batch) from the first batch on (worker start-up
    excluded), each batch copied to ``device`` without blocking (synchronised at the end)."""
    start, cpu, n, batches = None, 0.0, 0, 0
    if from_start:
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
    for b in loader:
        b = b.to(device, non_blocking=True) if device.type == "cuda" else b
        if start is None:
            _sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            continue
        # A packed batch left packed on the CPU (a GPU unpacks it on the device, above).
        n += b.batch_size if hasattr(b, "batch_size") else len(b.labels)
        batches += 1
    _sync(device)
    seconds = max(time.perf_counter() - start, 1e-9)
    return n / seconds, 1e3 * (time.process_time() - cpu) / max(batches, 1)


class PerTensorBatches:
    """A source giving the previous batch layout (separate tensors) of another source's rows."""

    def __init__(self, source) -> None:
        self.source = source

    def __call__(self, indices):
        from datamodules.ctr.batch import make_batch

        b = self.source(indices).unpack()
        ids = b.sparse_features.values().view(len(b.sparse_features.keys()), -1).T.numpy()
        return make_batch(b.dense_features.numpy(), ids, b.labels.numpy(), b.indices.numpy(),
                          tuple(b.sparse_features.keys()))


def npy_rates(batch_size: int, samples: int, workers: list[int], device: torch.device,
              train_rate: float | None, text_workers: list[int] | None = None) -> None:
    from datamodules.ctr.criteo import CriteoTSV, NpySource
    from datamodules.ctr.stream import BatchStream, StreamLoader

    pin = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_criteo_files(Path(tmp), samples, text=bool(text_workers))
        stem = str(files[".npy"])[: -len("_dense.npy")]
        source = NpySource([stem], (100_000,) * 26)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        source(np.arange(batch_size))
        count = min(samples // batch_size, 64)
        started = time.perf_counter()
        for k in range(count):
            source(np.arange(k * batch_size, (k + 1) * batch_size))
        own = count * batch_size / (time.perf_counter() - started)
        torch.set_num_threads(threads)
        ref = f"vs training ({train_rate:,.0f}/s)" if train_rate else "vs training"
        print(f"one worker's own rate (a PackedBatch made in the process, nothing sent): "
              f"{own:,.0f} samples/s")
        print(f"| `.npy`, B={batch_size}, workers | samples/s | {ref} | training process CPU "
              f"ms/batch | previous layout (separate tensors) samples/s | its CPU ms/batch |")
        print("|---|---|---|---|---|---|")
        for n in workers:
            try:
                dm = CriteoTSV(train_files=[str(files[".npy"])], batch_size=batch_size,
                               hash_size=100_000, num_workers=n)
                rate, cpu = drain(dm.train_dataloader(), device)
                old = StreamLoader(BatchStream(len(source), batch_size, PerTensorBatches(source)),
                                   n, None, pin_memory=pin)
                old_rate, old_cpu = drain(old, device)
                vs = f"{rate / train_rate:.2f}x" if train_rate else ""
                print(f"| {n} | {rate:,.0f} | {vs} | {cpu:.2f} | {old_rate:,.0f} | {old_cpu:.2f} |",
                      flush=True)
            except Exception as err:  # one failing row must not lose the table
                print(f"| {n} | failed: {type(err).__name__}: {err} | | | | |", flush=True)
        for n in text_workers or []:
            for kind in ("text", "gzip"):
                try:
                    dm = CriteoTSV(train_files=[str(files[kind])], batch_size=batch_size,
                                   hash_size=100_000, num_workers=n)
                    rate, cpu = drain(dm.train_dataloader(), device)
                    vs = f"{rate / train_rate:.2f}x" if train_rate else ""
                    print(f"| Criteo {kind}, {n} workers | {rate:,.0f} | {vs} | {cpu:.2f} | | |",
                          flush=True)
                except Exception as err:
                    print(f"| Criteo {kind}, {n} workers | failed: {type(err).__name__}: {err} "
                          "| | | | |", flush=True)
