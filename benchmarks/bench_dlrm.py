"""DLRM training throughput: Lightning (DLRMModule) vs raw fused torchrec loops vs dense gradients,
and data throughput of the CTR readers, all in samples/s and as ratios measured in the same run.

* raw DMP loop: torchrec DMP, row-wise Adagrad fused into backward, dense Adagrad; a bare loop
  over batches already on the device.
* raw TrainPipelineSparseDist: torchrec's own training pipeline over the same DMP, fed host
  (pinned) batches: it overlaps their copy to the device and the input distribution with compute.
* Lightning: ``models.DLRMModule`` on a ``Trainer`` (same DMP, same device batches), and fed
  the pipeline's host batches (the module copies them without blocking).
* dense gradients: the unsharded torchrec DLRM with plain Adagrad over every parameter, so each
  step materialises and updates a gradient for every embedding row (the baseline).
* readers: ``CriteoTSV`` text (plain and gzip) and ``.npy`` at 1, 2, 4, 8 (16) DataLoader
  workers, and ``SyntheticCTR`` on the CPU (0 to 8 workers) and on the training device; rates
  are taken from the first batch on (worker start-up and the plain text's line index, built
  once before the workers start and shown in the row, excluded); the on-device stream is timed
  from its first batch.

    python benchmarks/bench_dlrm.py                       # CPU: 26 x 100k x 64, B=2048
    python benchmarks/bench_dlrm.py --device cuda --batch-size 8192 --steps 100 --rows 100000 1000000
"""

from __future__ import annotations

import argparse
import gc
import gzip
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def make_batches(rows: int, batch_size: int, count: int, device: torch.device):
    from datamodules.ctr.synthetic import SyntheticCTR

    dm = SyntheticCTR(batch_size=batch_size, train_samples=batch_size * count,
                      cardinalities=[rows] * 26, max_cardinality=rows, zipf_exponent=1.05,
                      device="cuda" if device.type == "cuda" else "cpu")
    return dm, [b.to(device) for b in dm.train_dataloader()]


def _shape(module_kwargs: dict, schema):
    from models.dlrm.sizing import dlrm_shape

    return dlrm_shape(schema.cardinalities, schema.num_dense, module_kwargs["num_embeddings"],
                      module_kwargs["embedding_dim"], module_kwargs["dense_arch_layer_sizes"],
                      module_kwargs["over_arch_layer_sizes"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def raw_fused(module_kwargs: dict, schema, batches, warmup: int, device) -> float:
    from models.dlrm.network import build_dlrm
    from models.dlrm.sharded import make_fused_dense_optimizer, shard_with_fused_optimizer

    dmp = shard_with_fused_optimizer(build_dlrm(_shape(module_kwargs, schema), schema.sparse_names),
                                     device, "row_wise_adagrad", 0.01)
    dense = torch.optim.Adagrad(list(_dense_params(dmp)), lr=0.01)
    opt = make_fused_dense_optimizer(dmp, dense)
    start = None
    for i, b in enumerate(batches):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        logits = dmp(b.dense_features, b.sparse_features).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, b.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(device)
    return _rate(batches, warmup, time.perf_counter() - start)


def raw_pipeline(module_kwargs: dict, schema, batches, warmup: int, device) -> float:
    """torchrec's TrainPipelineSparseDist over DMP(DLRMTrain(DLRM)), fed host batches."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.models.dlrm import DLRMTrain

    from models.dlrm.network import build_dlrm
    from models.dlrm.sharded import make_fused_dense_optimizer, shard_with_fused_optimizer

    net = DLRMTrain(build_dlrm(_shape(module_kwargs, schema), schema.sparse_names))
    dmp = shard_with_fused_optimizer(net, device, "row_wise_adagrad", 0.01)
    opt = make_fused_dense_optimizer(dmp, torch.optim.Adagrad(list(_dense_params(dmp)), lr=0.01))
    pipeline = TrainPipelineSparseDist(dmp, opt, device, execute_all_batches=True)
    it = iter(batches)
    start, i = None, 0
    while True:
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        try:
            pipeline.progress(it)
        except StopIteration:
            break
        i += 1
    sync(device)
    return _rate(batches, warmup, time.perf_counter() - start)


def _dense_params(dmp):
    from models.dlrm.sharded import dense_named_parameters

    return dense_named_parameters(dmp).values()


def _rate(batches, warmup: int, seconds: float) -> float:
    return sum(len(b.labels) for b in batches[warmup:]) / seconds


def lightning_loop(module_kwargs: dict, schema, batches, warmup: int, device) -> float:
    import lightning as L
    from lightning.pytorch import Callback
    from torch.utils.data import DataLoader, IterableDataset

    from models.dlrm.module import DLRMModule

    class Listed(IterableDataset):
        def __iter__(self):
            return iter(batches)

        def __len__(self):
            return len(batches)

    class Clock(Callback):
        start = end = 0.0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == warmup:
                sync(device)
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            # The clock stops after the last step, as the raw loops' does: the epoch-end hooks
            # (one per epoch, not per step) are not part of the loop's rate.
            if batch_idx == len(batches) - 1:
                sync(device)
                self.end = time.perf_counter()

    clock = Clock()
    model = DLRMModule(**module_kwargs, embedding_lr=0.01, num_dense_features=schema.num_dense,
                       sparse_feature_names=list(schema.sparse_names),
                       sparse_cardinalities=list(schema.cardinalities))
    trainer = L.Trainer(max_epochs=1, accelerator=device.type, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[clock], limit_val_batches=0,
                        log_every_n_steps=50)
    trainer.fit(model, train_dataloaders=DataLoader(Listed(), batch_size=None))
    return _rate(batches, warmup, clock.end - clock.start)


def dense_gradients(module_kwargs: dict, schema, batches, warmup: int, device) -> float:
    from models.dlrm.network import build_dlrm

    model = build_dlrm(_shape(module_kwargs, schema), schema.sparse_names,
                       embedding_device=device).to(device)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.01)
    start = None
    for i, b in enumerate(batches):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(model(b.dense_features, b.sparse_features).squeeze(-1), b.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(device)
    return _rate(batches, warmup, time.perf_counter() - start)


def write_criteo_files(folder: Path, samples: int) -> dict[str, Path]:
    """A Criteo-format text file (plain and gzip) and torchrec's three .npy files of it."""
    rng = np.random.default_rng(0)
    ints = rng.integers(-1, 1000, (samples, 13))
    cats = rng.integers(0, 2**32, (samples, 26))
    text = folder / "day_0.tsv"
    with open(text, "w") as f:
        for n in range(samples):
            row = [str(n % 2)] + ["" if v == 5 else str(v) for v in ints[n]] + \
                  [format(v, "08x") for v in cats[n]]
            f.write("\t".join(row) + "\n")
    gz = folder / "day_0.tsv.gz"
    gz.write_bytes(gzip.compress(text.read_bytes(), 1))
    np.save(folder / "day_0_dense.npy", np.log1p(np.maximum(ints, 0)).astype(np.float32))
    np.save(folder / "day_0_sparse.npy", cats)
    np.save(folder / "day_0_labels.npy", (np.arange(samples) % 2).reshape(-1, 1).astype(np.int32))
    return {"text": text, "gzip": gz, ".npy": folder / "day_0_dense.npy"}


def reader_rates(batch_size: int, samples: int, workers: list[int], device) -> dict[str, float]:
    """samples/s of each reader (CPU batches, pinned on a GPU machine, as training gets them)."""
    from datamodules.ctr.criteo import CriteoTSV
    from datamodules.ctr.synthetic import SyntheticCTR

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_criteo_files(Path(tmp), samples)
        for kind, path in files.items():
            for n in workers:
                name = f"CriteoTSV {kind}, {n} workers"
                try:
                    dm = CriteoTSV(train_files=[str(path)], batch_size=batch_size,
                                   hash_size=100_000, num_workers=n)
                    start = time.perf_counter()
                    loader = dm.train_dataloader()  # plain text, several workers: line index
                    built = time.perf_counter() - start
                    if kind == "text" and n > 1:
                        name += f" (line index: {built:.2f} s once, before the workers start)"
                    out[name] = _drain(loader, device)
                except Exception as err:  # one failing row must not lose the table
                    print(f"{name}: failed: {type(err).__name__}: {err}")
    for n in [0, *workers]:
        name = f"SyntheticCTR on the CPU, {n} workers"
        try:
            dm = SyntheticCTR(batch_size=batch_size, train_samples=samples, num_workers=n)
            out[name] = _drain(dm.train_dataloader(), device)
        except Exception as err:
            print(f"{name}: failed: {type(err).__name__}: {err}")
    if device.type == "cuda":
        name = "SyntheticCTR on the GPU (device: cuda)"
        try:
            dm = SyntheticCTR(batch_size=batch_size, train_samples=samples * 4, device="cuda")
            next(iter(dm.train_dataloader()))  # the teacher's copy to the GPU, kernels loaded
            out[name] = _drain(dm.train_dataloader(), device, from_start=True)
        except Exception as err:
            print(f"{name}: failed: {type(err).__name__}: {err}")
    return out


def _drain(loader, device, from_start: bool = False) -> float:
    """samples/s from the first batch on (DataLoader worker start-up excluded), each batch
    copied to ``device`` without blocking (synchronised at the end). ``from_start``: the
    first batch counts too (a loader without workers, which may generate several batches at
    once)."""
    start, n = None, 0
    if from_start:
        sync(device)
        start = time.perf_counter()
    for b in loader:
        b = b.to(device, non_blocking=True) if device.type == "cuda" else b
        if start is None:
            sync(device)
            start = time.perf_counter()
            continue
        n += len(b.labels)
    sync(device)
    return n / max(time.perf_counter() - start, 1e-9)


def logged_train_rate(folder: str) -> str:
    """Median of the ``train/samples_per_s`` values a fit logged to TensorBoard under
    ``folder`` (the training loop's own rate, data included, evaluation and start-up not), as
    text for a table cell; ``"n/a"`` with the reason if there are none."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        values = []
        for path in sorted(Path(folder).rglob("events.out.tfevents*")):
            acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
            acc.Reload()
            if "train/samples_per_s" in acc.Tags().get("scalars", []):
                values += [e.value for e in acc.Scalars("train/samples_per_s")]
        if not values:
            return "n/a (nothing logged)"
        return f"{statistics.median(values):,.0f} (median of {len(values)})"
    except Exception as err:  # a table cell, never a failed run
        return f"n/a ({type(err).__name__})"


def run_rows(name: str, fn, *args) -> float | None:
    try:
        return fn(*args)
    except Exception as err:  # one failing row must not lose the table
        print(f"{name}: failed: {type(err).__name__}: {err}")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000],
                        help="rows per table; one table of results per value")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dense-steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reader-samples", type=int, default=65536)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--skip-readers", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    print(f"DLRM 26 tables x V x 64, bottom 512-256-64, top 512-512-256-1, B={args.batch_size}, "
          f"{device.type}, {args.steps} timed steps after {args.warmup}; median of {args.rounds} "
          f"interleaved rounds")
    print("| loop | V (rows/table) | samples/s | vs raw DMP loop |")
    print("|---|---|---|---|")
    best_lit = None
    for rows in args.rows:
        kwargs = dict(embedding_dim=64, num_embeddings=rows, dense_arch_layer_sizes=[512, 256],
                      over_arch_layer_sizes=[512, 512, 256])
        dm, batches = make_batches(rows, args.batch_size, args.steps + args.warmup, device)
        host = [b.to("cpu") for b in batches]
        if device.type == "cuda":
            host = [b.pin_memory() for b in host]
        results: dict[str, list[float]] = {"raw": [], "pipe": [], "lit": [], "lit_host": []}
        for _ in range(args.rounds):  # interleaved, so load changes hit all alike
            for key, fn, data in (("raw", raw_fused, batches), ("pipe", raw_pipeline, host),
                                  ("lit", lightning_loop, batches),
                                  ("lit_host", lightning_loop, host)):
                # The previous loop's model freed first (its tables are GBs at 1M rows, and
                # its objects would otherwise be collected inside the next loop's clock).
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rate = run_rows(f"{key} V={rows}", fn, kwargs, dm.schema, data, args.warmup, device)
                if rate is not None:
                    results[key].append(rate)
        dense = run_rows(f"dense V={rows}", dense_gradients, kwargs, dm.schema,
                         batches[:args.dense_steps + 1], 1, device)
        median = {k: statistics.median(v) if v else None for k, v in results.items()}
        base = median["raw"]

        def row(label: str, rate: float | None) -> None:
            ratio = f"{rate / base:.2f}" if rate and base else "-"
            shown = f"{rate:,.0f}" if rate else "failed"
            print(f"| {label} | {rows:,} | {shown} | {ratio} |")

        row("raw torchrec DMP loop, fused row-wise Adagrad", base)
        row("raw torchrec TrainPipelineSparseDist (host batches)", median["pipe"])
        row("Lightning DLRMModule (same DMP, same batches)", median["lit"])
        row("Lightning DLRMModule, host batches (pinned, non-blocking copy)", median["lit_host"])
        row("dense gradients on every row (plain Adagrad)", dense)
        print(f"rounds {rows}: " + ", ".join(f"{k} {[round(r) for r in v]}" for k, v in results.items()))
        if median["lit"] and (best_lit is None):
            best_lit = median["lit"]
        del dm, batches, host
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.skip_readers:
        return
    rates = reader_rates(args.batch_size, args.reader_samples, args.workers, device)
    ref = best_lit or 1.0
    print(f"\n| data source (B={args.batch_size}) | samples/s | vs Lightning training, "
          f"V={args.rows[0]:,} |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / ref:.2f}x |")


if __name__ == "__main__":
    main()
