"""DLRM training throughput: Lightning (DLRMModule) vs a raw fused torchrec loop vs dense gradients,
and data throughput of the CTR readers, all in samples/s and as ratios measured in the same run.

* raw fused: torchrec DMP, row-wise Adagrad fused into backward, dense Adagrad; a bare loop.
* Lightning: ``models.DLRMModule`` on a ``Trainer`` (manual optimization, same DMP, same batches).
* dense gradients: the unsharded torchrec DLRM with plain Adagrad over every parameter, so each
  step materialises and updates a gradient for every embedding row (the baseline).
* readers: ``CriteoTSV`` text (plain and gzip) and ``.npy``, and ``SyntheticCTR``, batched.

    python benchmarks/bench_dlrm.py                       # CPU: 26 x 100k x 64, B=2048
    python benchmarks/bench_dlrm.py --device cuda --batch-size 8192 --steps 200
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def make_batches(rows: int, batch_size: int, count: int, device: torch.device):
    from datamodules.ctr.synthetic import SyntheticCTR

    dm = SyntheticCTR(batch_size=batch_size, train_samples=batch_size * count,
                      cardinalities=[rows] * 26, max_cardinality=rows, zipf_exponent=1.05)
    return dm, [b.to(device) for b in dm.train_dataloader()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def raw_fused(module_kwargs: dict, schema, batches, warmup: int, device) -> float:
    from models.dlrm.sharded import make_fused_dense_optimizer, shard_with_fused_optimizer
    from models.dlrm.sizing import dlrm_shape
    from models.dlrm.network import build_dlrm

    shape = dlrm_shape(schema.cardinalities, schema.num_dense, module_kwargs["num_embeddings"],
                       module_kwargs["embedding_dim"], module_kwargs["dense_arch_layer_sizes"],
                       module_kwargs["over_arch_layer_sizes"])
    dmp = shard_with_fused_optimizer(build_dlrm(shape, schema.sparse_names), device,
                                     "row_wise_adagrad", 0.01)
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

        def on_train_end(self, trainer, module):
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
    from models.dlrm.sizing import dlrm_shape
    from models.dlrm.network import build_dlrm

    shape = dlrm_shape(schema.cardinalities, schema.num_dense, module_kwargs["num_embeddings"],
                       module_kwargs["embedding_dim"], module_kwargs["dense_arch_layer_sizes"],
                       module_kwargs["over_arch_layer_sizes"])
    model = build_dlrm(shape, schema.sparse_names, embedding_device=device).to(device)
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


def reader_rates(batch_size: int, samples: int) -> dict[str, float]:
    from datamodules.ctr.criteo import CriteoTSV
    from datamodules.ctr.synthetic import SyntheticCTR

    rng = np.random.default_rng(0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "day_0.tsv"
        ints = rng.integers(-1, 1000, (samples, 13))
        cats = rng.integers(0, 2**32, (samples, 26))
        with open(path, "w") as f:
            for n in range(samples):
                row = [str(n % 2)] + ["" if v == 5 else str(v) for v in ints[n]] + \
                      [format(v, "08x") for v in cats[n]]
                f.write("\t".join(row) + "\n")
        (Path(tmp) / "day_0.tsv.gz").write_bytes(gzip.compress(path.read_bytes(), 1))
        np.save(Path(tmp) / "day_0_dense.npy", np.log1p(np.maximum(ints, 0)).astype(np.float32))
        np.save(Path(tmp) / "day_0_sparse.npy", cats)
        np.save(Path(tmp) / "day_0_labels.npy", (np.arange(samples) % 2).reshape(-1, 1).astype(np.int32))
        for name, file, workers in (("CriteoTSV text", "day_0.tsv", 0),
                                    ("CriteoTSV text, 2 workers", "day_0.tsv", 2),
                                    ("CriteoTSV gzip", "day_0.tsv.gz", 0),
                                    ("CriteoTSV .npy", "day_0_dense.npy", 0)):
            dm = CriteoTSV(train_files=[str(Path(tmp) / file)], batch_size=batch_size,
                           hash_size=100_000, num_workers=workers)
            out[name] = _drain(dm.train_dataloader())
    for workers in (0, 2):
        dm = SyntheticCTR(batch_size=batch_size, train_samples=samples, num_workers=workers)
        out[f"SyntheticCTR{'' if not workers else ', 2 workers'}"] = _drain(dm.train_dataloader())
    return out


def _drain(loader) -> float:
    start, n = time.perf_counter(), 0
    for b in loader:
        n += len(b.labels)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dense-steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reader-samples", type=int, default=65536)
    args = parser.parse_args()
    device = torch.device(args.device)
    kwargs = dict(embedding_dim=64, num_embeddings=args.rows, dense_arch_layer_sizes=[512, 256],
                  over_arch_layer_sizes=[512, 512, 256])
    dm, batches = make_batches(args.rows, args.batch_size, args.steps + args.warmup, device)
    raw, lit = [], []
    for _ in range(args.rounds):  # interleaved, so load changes hit both alike
        raw.append(raw_fused(kwargs, dm.schema, batches, args.warmup, device))
        lit.append(lightning_loop(kwargs, dm.schema, batches, args.warmup, device))
    dense = dense_gradients(kwargs, dm.schema, batches[:args.dense_steps + 1], 1, device)
    raw_best, lit_best = max(raw), max(lit)
    print(f"DLRM 26 tables x {args.rows} x 64, bottom 512-256-64, top 512-512-256-1, "
          f"B={args.batch_size}, {device.type}; best of {args.rounds} interleaved rounds")
    print("| loop | samples/s | vs raw fused |")
    print("|---|---|---|")
    print(f"| raw torchrec, fused row-wise Adagrad (DMP) | {raw_best:,.0f} | 1.00 |")
    print(f"| Lightning DLRMModule (same DMP, same batches) | {lit_best:,.0f} | {lit_best / raw_best:.2f} |")
    print(f"| dense gradients on every row (plain Adagrad) | {dense:,.0f} | {dense / raw_best:.3f} |")
    print(f"rounds raw {[round(r) for r in raw]}, Lightning {[round(r) for r in lit]}")
    rates = reader_rates(args.batch_size, args.reader_samples)
    print("| data source | samples/s | vs Lightning training |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / lit_best:.1f}x |")


if __name__ == "__main__":
    main()
