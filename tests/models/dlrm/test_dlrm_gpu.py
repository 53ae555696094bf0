"""DLRM on CUDA: the fused row-wise Adagrad step on the GPU against a float64 re-derivation on the
CPU, a Trainer fit on one GPU (dense layers, metrics and logged values on the device), the
benchmark's raw loops, the on-device synthetic stream against the CPU one, packed ``.npy``
batches from pinning workers unpacked on the GPU, the GPU config end to end through the CLI
(tables still on the GPU after fit and test, one sharded checkpoint), and a two-process NCCL fit
when two GPUs are visible. Run with ``pytest -m gpu``."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules.ctr.synthetic import SyntheticCTR
from models.dlrm.module import DLRMModule
from models.dlrm.network import build_dlrm, fold_ids

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = dict(embedding_dim=4, num_embeddings=100, dense_arch_layer_sizes=[6],
            over_arch_layer_sizes=[5])
SYN = dict(cardinalities=[30, 200, 5], num_dense=3, val_samples=512, test_samples=512)
CUDA = torch.device("cuda", 0)


def test_fused_rowwise_adagrad_on_cuda_matches_float64_cpu_rederivation():
    """Three steps on the GPU (fused TBE update in backward + dense Adagrad); after each, the
    touched table rows equal row-wise Adagrad re-derived by hand in float64 on the CPU from the
    GPU model's own weights before the step, and untouched rows are bit-identical."""
    from models.dlrm.sharded import to_plain

    torch.cuda.set_device(CUDA)
    dm = SyntheticCTR(batch_size=256, train_samples=256 * 3, **SYN)
    lr, eps = 0.1, 1e-8
    module = DLRMModule(**TINY, embedding_lr=lr, embedding_eps=eps, num_dense_features=3,
                        sparse_feature_names=list(dm.schema.sparse_names),
                        sparse_cardinalities=list(dm.schema.cardinalities))
    module.build(CUDA)
    assert all(p.device == CUDA for p in module.model.parameters())  # dense layers included
    optimizer = module.configure_optimizers()
    state = {name: torch.zeros(rows, 1, dtype=torch.float64)   # row-wise Adagrad accumulators
             for name, rows in zip(dm.schema.sparse_names, module.shape.rows)}
    first_step = True
    for batch in dm.train_dataloader():
        before = {k: v.cpu() for k, v in to_plain(module.model.state_dict()).items()}
        ref = build_dlrm(module.shape, dm.schema.sparse_names, embedding_device="cpu").double()
        ref.load_state_dict({k: v.double() for k, v in before.items()})
        sparse = fold_ids(batch.sparse_features, torch.tensor(module.shape.rows))
        ref_logits = ref(batch.dense_features.double(), sparse).squeeze(-1)
        F.binary_cross_entropy_with_logits(ref_logits, batch.labels.double()).backward()

        on_gpu = batch.to(CUDA)
        logits = module(on_gpu)
        assert logits.device == CUDA
        assert torch.allclose(logits.double().cpu(), ref_logits.detach(), atol=1e-4)
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(logits, on_gpu.labels).backward()
        optimizer.step()
        after = {k: v.cpu() for k, v in to_plain(module.model.state_dict()).items()}
        grads = dict(ref.named_parameters())
        for name in dm.schema.sparse_names:
            key = f"sparse_arch.embedding_bag_collection.embedding_bags.t_{name}.weight"
            grad = grads[key].grad
            touched = grad.abs().sum(dim=1) > 0
            state[name] += (grad ** 2).mean(dim=1, keepdim=True) * touched[:, None]
            expected = before[key].double() - lr * grad / (state[name].sqrt() + eps)
            assert torch.allclose(after[key][touched].double(), expected[touched], atol=1e-4)
            assert torch.equal(after[key][~touched], before[key][~touched])
        # Dense Adagrad (lr 0.01, first-step update lr * g / (|g| + 1e-10)): checked where the
        # gradient is not tiny (the ratio is ill-conditioned near 0), on the first step only.
        if first_step:
            first_step = False
            for key, param in grads.items():
                if "embedding_bags" in key or param.grad is None:
                    continue
                g = param.grad
                big = g.abs() > 1e-4
                expected = before[key].double() - 0.01 * g / (g.abs() + 1e-10)
                assert torch.allclose(after[key].double()[big], expected[big], atol=1e-5), key


class _DevicesDuringFit(L.Callback):
    """Names of the parameters not on the GPU, looked at while training runs:
    after ``fit`` returns, Lightning's strategy teardown has moved the module to the CPU
    (``Strategy.teardown`` calls ``lightning_module.cpu()``), so checking then is meaningless."""

    def __init__(self) -> None:
        self.off_device: dict[str, list[str]] = {}
        self.checked: list[str] = []

    def _check(self, hook: str, module) -> None:
        self.off_device[hook] = [f"{name} ({p.device})" for name, p
                                 in module.model.named_parameters() if p.device.type != "cuda"]
        self.checked.append(hook)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx in (0, trainer.num_training_batches - 1):
            self._check(f"train batch {batch_idx}", module)

    def on_train_end(self, trainer, module):
        self._check("train end", module)


def test_fit_on_one_gpu_keeps_everything_on_the_device(tmp_path):
    dm = SyntheticCTR(batch_size=128, train_samples=128 * 8, **SYN)
    model = DLRMModule(**TINY)
    devices = _DevicesDuringFit()
    trainer = L.Trainer(max_epochs=1, accelerator="gpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        log_every_n_steps=2, callbacks=[devices])
    trainer.fit(model, dm)
    assert devices.checked == ["train batch 0", "train batch 7", "train end"], devices.checked
    for hook, names in devices.off_device.items():
        assert not names, f"{hook}: not on the GPU: {names}"
    metrics = trainer.callback_metrics
    for name in ("val/logloss", "val/auroc", "val/ne", "val/base_rate", "train/progressive_loss"):
        assert np.isfinite(float(metrics[name])), name
    assert 0.2 < float(metrics["val/logloss"]) < 1.5  # 8 steps of a tiny model: near chance
    assert model.samples_seen == 128 * 8


@pytest.mark.parametrize("loop", ["raw_fused", "raw_pipeline", "lightning_loop"])
def test_benchmark_loops_run_on_cuda(loop):
    from benchmarks import bench_dlrm

    kwargs = dict(embedding_dim=8, num_embeddings=1000, dense_arch_layer_sizes=[16],
                  over_arch_layer_sizes=[16])
    dm, batches = bench_dlrm.make_batches(1000, 512, 6, CUDA)
    if loop == "raw_pipeline":
        batches = [b.to("cpu").pin_memory() for b in batches]
    rate = getattr(bench_dlrm, loop)(kwargs, dm.schema, batches, 2, CUDA)
    assert rate > 0


def test_synthetic_stream_on_cuda_matches_cpu():
    """Same seed, same samples on the GPU and on the CPU: ids and dense features exactly, the
    teacher's click probabilities within float32 tolerance, and so (but for ties at the
    threshold) the same labels."""
    cpu = SyntheticCTR(batch_size=1024, train_samples=4096, device="cpu", **SYN)
    gpu = SyntheticCTR(batch_size=1024, train_samples=4096, device="cuda", **SYN)
    for a, b in zip(cpu.train_dataloader(), gpu.train_dataloader()):
        assert b.dense_features.device.type == "cuda"
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values().cpu())
        assert torch.allclose(a.dense_features, b.dense_features.cpu(), atol=1e-5)
        assert torch.equal(a.indices, b.indices.cpu())
        assert (a.labels != b.labels.cpu()).float().mean() < 1e-3
    p_cpu = cpu.source("val").probability(np.arange(2048))
    p_gpu = gpu.source("val").probability(np.arange(2048))
    assert np.allclose(p_cpu, p_gpu, atol=1e-5)


def test_packed_npy_batches_from_pinning_workers_unpack_on_the_gpu(tmp_path):
    """Two workers, pinned memory, one copy per batch: on the GPU the batch holds the rows'
    values (dense as stored, ids modulo the hash size, labels, indices)."""
    from datamodules.ctr.criteo import CriteoTSV

    rng = np.random.default_rng(0)
    n = 700
    np.save(tmp_path / "day_0_dense.npy", rng.random((n, 13), dtype=np.float32))
    np.save(tmp_path / "day_0_sparse.npy", rng.integers(0, 2**32, (n, 26)))
    np.save(tmp_path / "day_0_labels.npy", rng.integers(0, 2, (n, 1)).astype(np.int32))
    dense = np.load(tmp_path / "day_0_dense.npy")
    sparse = np.load(tmp_path / "day_0_sparse.npy")
    labels = np.load(tmp_path / "day_0_labels.npy")[:, 0]
    dm = CriteoTSV(train_files=[str(tmp_path / "day_0_dense.npy")], batch_size=64,
                   hash_size=997, num_workers=2)
    module = DLRMModule(**TINY)
    seen = []
    for packed in dm.train_dataloader():
        assert packed.data.is_pinned()
        batch = module.transfer_batch_to_device(packed, CUDA, 0)
        rows = batch.indices.cpu().numpy()
        assert batch.dense_features.device == CUDA
        assert np.array_equal(batch.dense_features.cpu().numpy(), dense[rows])
        ids = batch.sparse_features.values().view(26, -1).T.cpu().numpy()
        assert np.array_equal(ids, sparse[rows] % 997)
        assert np.array_equal(batch.labels.cpu().numpy(), labels[rows].astype(np.float32))
        seen += rows.tolist()
    assert sorted(seen) == list(range(64 * (n // 64)))


def test_gpu_config_end_to_end_keeps_tables_on_the_gpu(tmp_path):
    """configs/dlrm/synthetic_gpu.yaml, shrunk, through ``python -m lit fit`` with the phase timer
    of the benchmark: the direct step path, the tables on the GPU after fit and after test, one
    sharded checkpoint that last.ckpt links to."""
    import json

    from lit.checkpoints import is_sharded_checkpoint
    from tests.conftest import cli_args, run_lit

    phases = tmp_path / "phases.json"
    proc = run_lit(cli_args(
        "fit", "--config", "configs/dlrm/synthetic_gpu.yaml", "--trainer.accelerator=gpu",
        "--trainer.devices=1", "--model.init_args.num_embeddings=10000",
        "--data.init_args.train_samples=131072", "--data.init_args.val_samples=65536",
        "--data.init_args.test_samples=65536",
        "--trainer.callbacks=[{class_path: callbacks.EvalAtSamples, "
        "init_args: {at_samples: [65536, 131072]}}, {class_path: "
        f"benchmarks.dlrm_phases.PhaseTimer, init_args: {{path: {phases}}}}}]",
        tmp_path=tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads(phases.read_text())["info"]
    assert info["step_path"] == "direct", info
    assert info["module_device_after_fit"].startswith("cuda"), info
    assert info["module_device_after_test"].startswith("cuda"), info
    links = list(tmp_path.rglob("last.ckpt"))
    assert len(links) == 1 and links[0].is_symlink() and is_sharded_checkpoint(links[0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_nccl_fit_validates_and_tests_each_sample_once(tmp_path):
    import yaml

    from tests.conftest import cli_args, run_lit

    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "gpu", "devices": 2,
                    "strategy": {"class_path": "models.dlrm.strategy.TorchrecDDPStrategy"},
                    "enable_progress_bar": False, "num_sanity_val_steps": 0,
                    "log_every_n_steps": 2,
                    "callbacks": [{"class_path": "tests.models.dlrm.test_dlrm_ddp.DumpIndices",
                                   "init_args": {"out_dir": str(tmp_path)}}]},
        "model": {"class_path": "models.DLRMModule",
                  "init_args": {"embedding_dim": 8, "num_embeddings": 64,
                                "dense_arch_layer_sizes": [16], "over_arch_layer_sizes": [16]}},
        "data": {"class_path": "datamodules.SyntheticCTR",
                 "init_args": {"batch_size": 64, "train_samples": 64 * 10, "val_samples": 256,
                               "test_samples": 256, "cardinalities": [100, 50, 7, 300],
                               "num_dense": 3, "device": "auto"}},
        "test_after_fit": True,
    }
    path = tmp_path / "nccl.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_lit(cli_args("fit", "--config", str(path), tmp_path=tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test/auroc" in proc.stdout + proc.stderr
    # Generated on each rank's GPU, still each sample exactly once over both ranks.
    ranks = [list(map(int, (tmp_path / f"rank{r}.txt").read_text().split())) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 64 * 5
    assert sorted(ranks[0] + ranks[1]) == list(range(64 * 10))
