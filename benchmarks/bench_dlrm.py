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

Modes (the first argument):

* ``table`` (default): all of the above, every V, then every reader.
* ``loops``: the bare DMP loop (torchrec's ``CombinedOptimizer``; and again with the module's
  ``FusedDenseOptimizer``) against the Lightning loop on device batches, interleaved rounds,
  medians and their ratio, and the host time per step of each (``--rates-json`` keeps the
  medians for the other modes).
* ``profile``: ``torch.profiler`` over ``--profile-steps`` steps of the Lightning loop and of the
  bare loop (:mod:`benchmarks.dlrm_profile`).
* ``readers``: ``.npy`` at ``--workers`` against the training rate, with what bounds each row
  (:mod:`benchmarks.dlrm_readers`).

    python benchmarks/bench_dlrm.py                       # CPU: 26 x 100k x 64, B=2048
    python benchmarks/bench_dlrm.py --device cuda --batch-size 8192 --steps 100 --rows 100000 1000000
    python benchmarks/bench_dlrm.py loops --device cuda --batch-size 8192 --rows 1000000 --steps 200

The whole ``python -m lit fit`` command, phase by phase: :mod:`benchmarks.dlrm_phases`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.dlrm_readers import drain, write_criteo_files  # noqa: E402


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


def raw_fused(module_kwargs: dict, schema, batches, warmup: int, device,
              host: list[float] | None = None, optimizer: str = "torchrec") -> float:
    """The bare loop: DMP, fused row-wise Adagrad, dense Adagrad, over device batches, with
    torchrec's own ``CombinedOptimizer`` (``optimizer="torchrec"``, the baseline) or the module's
    ``FusedDenseOptimizer`` (``"module"``). ``host`` receives each timed step's host seconds."""
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

    from models.dlrm.network import build_dlrm
    from models.dlrm.sharded import make_fused_dense_optimizer, shard_with_fused_optimizer

    dmp = shard_with_fused_optimizer(build_dlrm(_shape(module_kwargs, schema), schema.sparse_names),
                                     device, "row_wise_adagrad", 0.01)
    dense = torch.optim.Adagrad(_dense_params(dmp), lr=0.01)
    if optimizer == "module":
        opt = make_fused_dense_optimizer(dmp, dense)
    else:
        opt = CombinedOptimizer([("fused", dmp.fused_optimizer), ("dense", KeyedOptimizerWrapper(
            dict(_dense_named(dmp)), lambda _params: dense))])
    start = None
    before = 0.0
    for i, b in enumerate(batches):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        if start is not None and host is not None:
            before = time.perf_counter()
        logits = dmp(b.dense_features, b.sparse_features).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, b.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if start is not None and host is not None:
            host.append(time.perf_counter() - before)
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
    opt = make_fused_dense_optimizer(dmp, torch.optim.Adagrad(_dense_params(dmp), lr=0.01))
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


def _dense_named(dmp):
    from models.dlrm.sharded import dense_named_parameters

    return dense_named_parameters(dmp).items()


def _dense_params(dmp):
    return [p for _name, p in _dense_named(dmp)]


def _rate(batches, warmup: int, seconds: float) -> float:
    return sum(len(b.labels) for b in batches[warmup:]) / seconds


class _Listed(torch.utils.data.IterableDataset):
    def __init__(self, batches) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def lightning_loop(module_kwargs: dict, schema, batches, warmup: int, device,
                   host: dict[str, list[float]] | None = None, callbacks: list | None = None,
                   profiler=None) -> float:
    """``DLRMModule`` on a Trainer over the same batches. ``host`` receives, per timed step, the
    host seconds from ``on_train_batch_start`` to ``on_train_batch_end`` (``"step"``: the
    training step and the hooks around it) and from there to the next step's start
    (``"between"``: Lightning's loop: progress, logging, the next batch, its transfer hook)."""
    import lightning as L
    from lightning.pytorch import Callback
    from torch.utils.data import DataLoader

    from models.dlrm.module import DLRMModule

    class Clock(Callback):
        start = end = 0.0
        last_end = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            now = time.perf_counter()
            if batch_idx == warmup:
                sync(device)
                self.start = now = time.perf_counter()
            elif host is not None and batch_idx > warmup and self.last_end is not None:
                host["between"].append(now - self.last_end)
            self.step_start = now

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            now = time.perf_counter()
            if host is not None and batch_idx >= warmup:
                host["step"].append(now - self.step_start)
            self.last_end = now
            # The clock stops after the last step, as the raw loops' does: the epoch-end hooks
            # (one per epoch, not per step) are not part of the loop's rate.
            if batch_idx == len(batches) - 1:
                sync(device)
                self.end = time.perf_counter()

    if host is not None:
        host.setdefault("step", [])
        host.setdefault("between", [])
    clock = Clock()
    model = DLRMModule(**module_kwargs, embedding_lr=0.01, num_dense_features=schema.num_dense,
                       sparse_feature_names=list(schema.sparse_names),
                       sparse_cardinalities=list(schema.cardinalities))
    trainer = L.Trainer(max_epochs=1, accelerator=device.type, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[clock, *(callbacks or [])],
                        limit_val_batches=0, log_every_n_steps=50, profiler=profiler)
    trainer.fit(model, train_dataloaders=DataLoader(_Listed(batches), batch_size=None))
    if host is not None:
        host["path"] = [model.step_path.value]
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
                    out[name] = drain(loader, device)[0]
                except Exception as err:  # one failing row must not lose the table
                    print(f"{name}: failed: {type(err).__name__}: {err}")
    for n in [0, *workers]:
        name = f"SyntheticCTR on the CPU, {n} workers"
        try:
            dm = SyntheticCTR(batch_size=batch_size, train_samples=samples, num_workers=n)
            out[name] = drain(dm.train_dataloader(), device)[0]
        except Exception as err:
            print(f"{name}: failed: {type(err).__name__}: {err}")
    if device.type == "cuda":
        name = "SyntheticCTR on the GPU (device: cuda)"
        try:
            dm = SyntheticCTR(batch_size=batch_size, train_samples=samples * 4, device="cuda")
            next(iter(dm.train_dataloader()))  # the teacher's copy to the GPU, kernels loaded
            out[name] = drain(dm.train_dataloader(), device, from_start=True)[0]
        except Exception as err:
            print(f"{name}: failed: {type(err).__name__}: {err}")
    return out


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


def run_rows(name: str, fn, *args, **kwargs) -> float | None:
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # one failing row must not lose the table
        print(f"{name}: failed: {type(err).__name__}: {err}")
        return None


def free(device: torch.device) -> None:
    """The previous loop's model freed (its tables are GBs at 1M rows, and its objects would
    otherwise be collected inside the next loop's clock)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def module_kwargs(rows: int) -> dict:
    return dict(embedding_dim=64, num_embeddings=rows, dense_arch_layer_sizes=[512, 256],
                over_arch_layer_sizes=[512, 512, 256])


def loops(args, device: torch.device) -> None:
    """Bare loop vs Lightning loop on device batches, interleaved rounds, medians, host split."""
    rows = args.rows[0]
    kwargs = module_kwargs(rows)
    dm, batches = make_batches(rows, args.batch_size, args.steps + args.warmup, device)
    results: dict[str, list[float]] = {"raw": [], "raw_module_opt": [], "lit": []}
    raw_host: list[float] = []
    lit_host: dict[str, list[float]] = {}
    median: dict[str, float | None] = {}
    for round_ in range(args.rounds):  # interleaved, so load changes hit all alike
        for key, fn, extra in (("raw", raw_fused, {"host": raw_host}),
                               ("raw_module_opt", raw_fused, {"optimizer": "module"}),
                               ("lit", lightning_loop, {"host": lit_host})):
            free(device)
            rate = run_rows(f"{key} V={rows}", fn, kwargs, dm.schema, batches, args.warmup,
                            device, **extra)
            if rate is not None:
                results[key].append(rate)
        # Written after every round: a run cut by its time limit still leaves its rates.
        median = {k: statistics.median(v) if v else None for k, v in results.items()}
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in results.items()
                                                  if v), flush=True)
        if args.out_json:
            Path(args.out_json).write_text(json.dumps({**median, "rows": rows,
                                                       "batch_size": args.batch_size}))
    base = median["raw"]
    print(f"| loop, V = {rows:,} rows/table, B = {args.batch_size} | samples/s (median) | "
          f"vs bare loop | rounds |")
    print("|---|---|---|---|")
    for key, label in (("raw", "bare DMP loop (torchrec CombinedOptimizer)"),
                       ("raw_module_opt", "bare DMP loop with the module's FusedDenseOptimizer"),
                       ("lit", f"Lightning DLRMModule (step path: "
                               f"{(lit_host.get('path') or ['?'])[0]})")):
        rate = median[key]
        ratio = f"{rate / base:.3f}" if rate and base else "-"
        shown = f"{rate:,.0f}" if rate else "failed"
        rounds = ", ".join(f"{r:,.0f}" for r in results[key])
        print(f"| {label} | {shown} | {ratio} | {rounds} |")
    if raw_host and lit_host.get("step"):
        raw_us = 1e6 * statistics.median(raw_host)
        step_us = 1e6 * statistics.median(lit_host["step"])
        between_us = 1e6 * statistics.median(lit_host["between"]) if lit_host["between"] else 0
        print(f"host time per step (median, no synchronisation; the GPU waits for the host when "
              f"these add up to the step time): bare loop {raw_us:.0f} us; Lightning: "
              f"{step_us:.0f} us from on_train_batch_start to on_train_batch_end (training_step "
              f"and its hooks) + {between_us:.0f} us between steps (Lightning's loop: progress, "
              f"logging, next batch, transfer hooks)")


def profile(args, device: torch.device) -> None:
    from benchmarks.dlrm_profile import profile_bare, profile_lightning, python_profile_lightning

    rows = args.rows[0]
    kwargs = module_kwargs(rows)
    steps = args.profile_steps
    dm, batches = make_batches(rows, args.batch_size, args.warmup + steps + 1, device)
    free(device)
    run_rows("profile Lightning", profile_lightning, kwargs, dm.schema, batches, args.warmup,
             device, steps, lightning_loop)
    free(device)
    run_rows("profile bare", profile_bare, kwargs, dm.schema, batches, args.warmup, device, steps,
             _shape(kwargs, dm.schema))
    free(device)
    run_rows("cProfile Lightning", python_profile_lightning, kwargs, dm.schema, batches,
             args.warmup, device, steps, lightning_loop)


def readers(args, device: torch.device) -> None:
    from benchmarks.dlrm_readers import npy_rates

    train = args.train_rate
    if train is None and args.rates_json and Path(args.rates_json).is_file():
        train = json.loads(Path(args.rates_json).read_text()).get("lit")
    npy_rates(args.batch_size, args.reader_samples, args.workers, device, train,
              args.text_workers)


def table(args, device: torch.device) -> None:
    """Every loop at every V, then every reader (the long benchmark)."""
    print(f"DLRM 26 tables x V x 64, bottom 512-256-64, top 512-512-256-1, B={args.batch_size}, "
          f"{device.type}, {args.steps} timed steps after {args.warmup}; median of {args.rounds} "
          f"interleaved rounds")
    print("| loop | V (rows/table) | samples/s | vs raw DMP loop |")
    print("|---|---|---|---|")
    best_lit = None
    for rows in args.rows:
        kwargs = module_kwargs(rows)
        dm, batches = make_batches(rows, args.batch_size, args.steps + args.warmup, device)
        host = [b.to("cpu") for b in batches]
        if device.type == "cuda":
            host = [b.pin_memory() for b in host]
        results: dict[str, list[float]] = {"raw": [], "pipe": [], "lit": [], "lit_host": []}
        for _ in range(args.rounds):  # interleaved, so load changes hit all alike
            for key, fn, data in (("raw", raw_fused, batches), ("pipe", raw_pipeline, host),
                                  ("lit", lightning_loop, batches),
                                  ("lit_host", lightning_loop, host)):
                free(device)
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
        free(device)
    if args.skip_readers:
        return
    rates = reader_rates(args.batch_size, args.reader_samples, args.workers, device)
    ref = best_lit or 1.0
    print(f"\n| data source (B={args.batch_size}) | samples/s | vs Lightning training, "
          f"V={args.rows[0]:,} |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / ref:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="table",
                        choices=["table", "loops", "profile", "readers"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000],
                        help="rows per table; one table of results per value (loops, profile: "
                             "the first)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dense-steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--reader-samples", type=int, default=65536)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--text-workers", type=int, nargs="*", default=[],
                        help="readers: also Criteo text and gzip at these worker counts")
    parser.add_argument("--train-rate", type=float, default=None,
                        help="readers: the training rate to compare with")
    parser.add_argument("--rates-json", default=None,
                        help="loops: write the median rates here; readers: read 'lit' from it")
    parser.add_argument("--skip-readers", action="store_true")
    args = parser.parse_args()
    args.out_json = args.rates_json if args.mode == "loops" else None
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    {"table": table, "loops": loops, "profile": profile, "readers": readers}[args.mode](args, device)


if __name__ == "__main__":
    main()
