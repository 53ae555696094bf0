"""Scaling from one GPU to two: training throughput per GPU under Lightning DDP (NCCL), and for
DLRM a bound from the bytes its all-to-alls move per step.

Each row trains the project's own LightningModule on a ``Trainer`` (bf16-mixed where the recipe
uses it) from data already on the GPU (a fixed batch per rank, so no loader takes part), first on
1 GPU, then on 2 with the same batch per GPU. Scaling efficiency = (2-GPU samples/s per GPU) /
(1-GPU samples/s); 1.0 is perfect.

* ``deit_b``: ImageClassifier, DeiT-B/16 at 224, PatchDropout keep 0.5, fused AdamW, batch 128/GPU.
* ``bert_base``: BertClassifier, BERT-base shapes (random init), 32 x 128 tokens/GPU, AdamW.
* ``dlrm_tw`` / ``dlrm_rw``: DLRMModule, 26 tables x ``--rows`` x 128 (fp32; 26 x 4M x 128 is
  53 GB), bottom 512-256-128, top 1024-1024-512-256-1, batch 8192/GPU, fused row-wise Adagrad,
  tables sharded table-wise / row-wise by torchrec (TorchrecDDPStrategy).

For DLRM the table adds the bytes one rank sends per step through all-to-all (ids in, pooled
embeddings out, their gradients back; torchrec's fp32 default) and the time NCCL needs for them
at the all-to-all bandwidth measured in the same run: the step's communication floor.

    python benchmarks/bench_multi_gpu.py                    # needs 2 GPUs; about 4 minutes
    python benchmarks/bench_multi_gpu.py --workloads dlrm_tw,dlrm_rw --rows 2000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
TABLES, DIM, DLRM_BATCH = 26, 128, 8192


class FixedBatches:
    """An endless-enough iterable of one batch per rank, made on this rank's GPU once."""

    def __init__(self, make, steps: int) -> None:
        self.make, self.steps, self.batch = make, steps, None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        if self.batch is None:
            self.batch = self.make(torch.device("cuda", torch.cuda.current_device()))
        for _ in range(self.steps):
            yield self.batch


def timing_callback(warmup: int, steps: int, batch: int, out: Path):
    from lightning.pytorch import Callback

    class Timer(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx) -> None:
            if batch_idx == warmup - 1:
                torch.cuda.synchronize()
                self.start = time.perf_counter()
            elif batch_idx == warmup + steps - 1:
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - self.start
                if trainer.global_rank == 0:
                    out.write_text(json.dumps({"per_gpu": batch * steps / elapsed,
                                               "step_ms": 1000 * elapsed / steps,
                                               "world": trainer.world_size,
                                               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))
    return Timer()


def build(workload: str, rows: int):
    """(module, make_batch(device), batch size per GPU, strategy, precision)."""
    if workload == "deit_b":
        from models.image_classifier import ImageClassifier

        module = ImageClassifier(backbone="deit_base_patch16_224", num_classes=1000, keep_rate=0.5,
                                 throughput_every_n_steps=1000,
                                 optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, fused=True))
        return module, lambda d: (torch.randn(128, 3, 224, 224, device=d),
                                  torch.randint(0, 1000, (128,), device=d)), 128, "ddp", "bf16-mixed"
    if workload == "bert_base":
        from models.bert_classifier import BertClassifier

        module = BertClassifier(pretrained=None, config={
            "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "max_position_embeddings": 512},
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, fused=True))

        def make(d):
            return {"input_ids": torch.randint(1000, 30000, (32, 128), device=d),
                    "attention_mask": torch.ones(32, 128, dtype=torch.long, device=d),
                    "labels": torch.randint(0, 2, (32,), device=d)}
        return module, make, 32, "ddp", "bf16-mixed"
    if workload in ("dlrm_tw", "dlrm_rw"):
        from datamodules.ctr.batch import make_tensor_batch
        from models.dlrm.module import DLRMModule

        names = tuple(f"t{i}" for i in range(TABLES))
        module = DLRMModule(embedding_dim=DIM, num_embeddings=rows,
                            dense_arch_layer_sizes=[512, 256, DIM],
                            over_arch_layer_sizes=[1024, 1024, 512, 256, 1],
                            sharding_types=["table_wise" if workload == "dlrm_tw" else "row_wise"],
                            num_dense_features=13, sparse_feature_names=list(names),
                            sparse_cardinalities=[rows] * TABLES)

        def make(d):
            g = torch.Generator(device="cpu").manual_seed(torch.cuda.current_device())
            # Zipf-like ids: a few hot rows, a long tail (as in CTR data).
            ids = (torch.rand(DLRM_BATCH, TABLES, generator=g) ** 4 * rows).long()
            batch = make_tensor_batch(torch.rand(DLRM_BATCH, 13, generator=g), ids,
                                      torch.randint(0, 2, (DLRM_BATCH,), generator=g).float(),
                                      torch.arange(DLRM_BATCH), names)
            return batch.to(d)
        return module, make, DLRM_BATCH, "torchrec_ddp", "32-true"
    raise ValueError(f"--workloads: unknown {workload!r}; choose deit_b, bert_base, dlrm_tw, dlrm_rw")


def worker(args) -> None:
    import lightning.pytorch as pl

    import models.dlrm.strategy  # noqa: F401  (registers torchrec_ddp)

    module, make, batch, strategy, precision = build(args.worker, args.rows)
    loader = FixedBatches(make, args.warmup + args.steps)
    trainer = pl.Trainer(accelerator="gpu", devices=args.devices,
                         strategy=strategy if args.devices > 1 or strategy != "ddp" else "auto",
                         precision=precision, max_steps=args.warmup + args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         use_distributed_sampler=False,
                         callbacks=[timing_callback(args.warmup, args.steps, batch, Path(args.json))])
    trainer.fit(module, train_dataloaders=loader)


def alltoall_ms(nbytes: int) -> float:
    """Milliseconds for one NCCL all-to-all between 2 GPUs in which each rank sends ``nbytes``
    to the other (and as much to itself), mean of 20 after 5 warm-ups."""
    script = f"""
import time, torch, torch.distributed as dist
dist.init_process_group("nccl"); r = dist.get_rank(); torch.cuda.set_device(r)
x = torch.empty(2 * {nbytes} // 4, device="cuda"); y = torch.empty_like(x)
for _ in range(5): dist.all_to_all_single(y, x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): dist.all_to_all_single(y, x)
torch.cuda.synchronize()
if r == 0: print("MS", (time.perf_counter() - t) / 20 * 1000)
dist.destroy_process_group()
"""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--no-python", sys.executable, "-c", script],
                          capture_output=True, text=True, env={**os.environ, **NCCL_ENV}, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith("MS"):
            return float(line.split()[1])
    raise RuntimeError(proc.stderr[-2000:])


def dlrm_bytes_per_rank(workload: str, batch: int) -> int:
    """Bytes one of 2 ranks sends per step (fp32 embeddings, int64 ids, one id per feature).

    Table-wise: ids of the other rank's samples for my 13 tables come in, and my pooled
    embeddings for its samples go out (forward) and their gradients come back (backward): each
    rank sends ``B*13*8`` + ``B*13*D*4`` + ``B*13*D*4``. Row-wise: each table is split by rows;
    half of my ids go to the other rank, and pooled partial sums for all 26 tables are
    reduce-scattered forward and their gradients all-gathered backward: ``B*26/2*8`` +
    ``2 * B*26*D*4``.
    """
    half = TABLES // 2
    if workload == "dlrm_tw":
        return batch * half * 8 + 2 * batch * half * DIM * 4
    return batch * half * 8 + 2 * batch * TABLES * DIM * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="deit_b,bert_base,dlrm_tw,dlrm_rw")
    parser.add_argument("--rows", type=int, default=4_000_000, help="rows per DLRM table")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if torch.cuda.device_count() < 2:
        sys.exit("bench_multi_gpu: needs 2 CUDA GPUs")
    env = {**os.environ, **NCCL_ENV, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    workloads = args.workloads.split(",")
    # 1-GPU baselines two at a time, one per GPU (separate GPUs do not share SMs or memory); at
    # world size 1 row- and table-wise are the same single shard, so DLRM runs once.
    baselines = list(dict.fromkeys("dlrm_tw" if w.startswith("dlrm") else w for w in workloads))
    jobs = [(w, 1, str(i % 2)) for i, w in enumerate(baselines)] + [(w, 2, "0,1") for w in workloads]
    results: dict = {}
    pending: list = []

    def finish(job, proc, out, started) -> None:
        workload, devices, _ = job
        proc.wait()
        if proc.returncode != 0 or not out.is_file():
            log = out.with_suffix(".log").read_text()
            print(f"{workload} x{devices}: FAILED (rc {proc.returncode})\n{log[-2500:]}", flush=True)
            return
        results[(workload, devices)] = {**json.loads(out.read_text()),
                                        "wall_s": time.perf_counter() - started}
        print(f"{workload} x{devices}: {results[(workload, devices)]}", flush=True)

    for job in jobs:
        workload, devices, visible = job
        if devices == 2 or len(pending) == 2:  # a 2-GPU run waits for both GPUs
            for item in pending:
                finish(*item)
            pending = []
        out = Path(f"/tmp/bench_multi_gpu_{workload}_{devices}.json")
        out.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, __file__, "--worker", workload, "--devices",
                                 str(devices), "--json", str(out), "--rows", str(args.rows),
                                 "--warmup", str(args.warmup), "--steps", str(args.steps)],
                                env={**env, "CUDA_VISIBLE_DEVICES": visible},
                                stdout=out.with_suffix(".log").open("w"), stderr=subprocess.STDOUT)
        pending.append((job, proc, out, time.perf_counter()))
        if devices == 2:
            finish(*pending.pop())
    for item in pending:
        finish(*item)
    for workload in workloads:  # DLRM's 1-GPU baseline serves both shardings
        if workload.startswith("dlrm") and ("dlrm_tw", 1) in results:
            results[(workload, 1)] = results[("dlrm_tw", 1)]
    print("\n| workload | 1 GPU samples/s | 2 GPUs samples/s per GPU | scaling efficiency | "
          "step ms 1 / 2 GPUs | peak GiB/GPU 1 / 2 |\n|---|---|---|---|---|---|")
    for workload in workloads:
        one, two = results.get((workload, 1)), results.get((workload, 2))
        if not one or not two:
            continue
        print(f"| {workload} | {one['per_gpu']:,.0f} | {two['per_gpu']:,.0f} | "
              f"{two['per_gpu'] / one['per_gpu']:.3f} | {one['step_ms']:.1f} / {two['step_ms']:.1f} | "
              f"{one['peak_gib']:.1f} / {two['peak_gib']:.1f} |")
    dlrm = [w for w in workloads if w.startswith("dlrm") and (w, 2) in results]
    if dlrm:
        print("\n| DLRM, 2 GPUs | bytes sent/rank/step | NCCL all-to-all GB/s at that size | "
              "comm floor ms | step ms | floor / step |\n|---|---|---|---|---|---|")
        for workload in dlrm:
            nbytes = dlrm_bytes_per_rank(workload, DLRM_BATCH)
            try:
                floor = alltoall_ms(nbytes)
            except Exception as error:  # report, keep the table
                print(f"| {workload} | {nbytes / 1e6:.1f} MB | failed: {error} | | | |")
                continue
            step = results[(workload, 2)]["step_ms"]
            print(f"| {workload} | {nbytes / 1e6:.1f} MB | {nbytes / floor / 1e6:.0f} | "
                  f"{floor:.2f} | {step:.1f} | {floor / step:.2f} |")


if __name__ == "__main__":
    main()
