"""DLRMModule: knobs vs hand counts, fused sparse updates vs a float64 re-derivation, metrics vs
scikit-learn, Trainer runs on every CTR datamodule, single-epoch exactly-once, resume."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from datamodules.ctr.synthetic import SyntheticCTR
from models.dlrm.metrics import CTRMetrics, normalized_entropy
from models.dlrm.sizing import dlrm_shape
from models.dlrm.module import DLRMModule
from models.dlrm.network import build_dlrm, fold_ids

TINY = dict(embedding_dim=4, num_embeddings=8, dense_arch_layer_sizes=[6], over_arch_layer_sizes=[5])
SYN = dict(cardinalities=[30, 200, 5], num_dense=3, val_samples=512, test_samples=512)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_knobs_parameter_counts_by_hand():
    # cards [10, 20, 5], V=8 -> rows [8, 8, 5]; H=4; 3 dense; bottom 3-6-4; F=3 so the
    # interaction gives 4 + (3+1)*3/2 = 10 features; top 10-5-1.
    s = dlrm_shape([10, 20, 5], 3, 8, 4, [6], [5])
    assert s.rows == (8, 8, 5) and s.over_in_features == 10
    assert s.embedding_parameters() == 21 * 4
    assert s.dense_parameters() == (3 * 6 + 6) + (6 * 4 + 4) + (10 * 5 + 5) + (5 + 1)  # 113
    assert s.forward_flops() == 2 * (3 * 6 + 6 * 4) + 2 * (10 * 5 + 5) + 2 * 4 * 4 * 4  # 322
    wide = dlrm_shape([10, 20, 5], 3, 8, 4, [6], [5], width_multiplier=2.0)   # O = 2
    assert wide.dense_parameters() == (3 * 12 + 12) + (12 * 4 + 4) + (10 * 10 + 10) + (10 + 1)
    per_table = dlrm_shape([10, 20, 5], 3, [3, 30, 2], 4, [6], [5])            # V per table
    assert per_table.rows == (3, 20, 2)
    for shape in (s, wide, dlrm_shape([10, 20, 5], 3, 8, 4, [6], [5], interaction="dcn",
                                      dcn_num_layers=2, dcn_low_rank_dim=3)):
        model = build_dlrm(shape, ["a", "b", "c"], embedding_device="cpu")
        assert n_params(model) == shape.embedding_parameters() + shape.dense_parameters()


def test_bad_knobs():
    with pytest.raises(ValueError, match="num_embeddings"):
        dlrm_shape([10, 20], 3, [4], 4, [6], [5])
    with pytest.raises(ValueError, match="width_multiplier"):
        dlrm_shape([10], 3, 4, 4, [6], [5], width_multiplier=0)
    with pytest.raises(ValueError, match="give all three"):
        DLRMModule(num_dense_features=3)
    with pytest.raises(ValueError, match="embedding_optimizer"):
        DLRMModule(embedding_optimizer="lamb")
    with pytest.raises(ValueError, match="embedding_lr must be > 0"):
        DLRMModule(embedding_lr=0.0)
    with pytest.raises(ValueError, match="sparse_cardinalities: 1 values for 2 sparse_feature_names"):
        DLRMModule(num_dense_features=3, sparse_feature_names=["a", "b"], sparse_cardinalities=[5])
    with pytest.raises(ValueError, match="embedding_dim must be >= 1"):
        dlrm_shape([10], 3, 4, 0, [6], [5])
    with pytest.raises(ValueError, match="num_dense_features must be >= 1"):
        dlrm_shape([10], 0, 4, 4, [6], [5])
    with pytest.raises(ValueError, match="over_arch_layer_sizes: give at least one"):
        dlrm_shape([10], 3, 4, 4, [6], [])
    with pytest.raises(ValueError, match="interaction must be 'dot' or 'dcn'"):
        dlrm_shape([10], 3, 4, 4, [6], [5], interaction="cross")
    with pytest.raises(ValueError, match="num_embeddings must be >= 1"):
        dlrm_shape([10], 3, 0, 4, [6], [5])


def test_eval_at_samples_bad_arguments_and_schedule():
    from callbacks.eval_at_samples import EvalAtSamples, crossed

    with pytest.raises(ValueError, match="every_samples must be >= 1"):
        EvalAtSamples(every_samples=0)
    with pytest.raises(ValueError, match="at_samples must be positive"):
        EvalAtSamples(at_samples=[100, 0])
    assert crossed([10, 20, 30], 10, 30) == [20, 30]  # (before, after]
    both = EvalAtSamples(at_samples=[250], every_samples=100)
    assert both._points(0, 99) == [] and both._points(99, 260) == [100, 200, 250]


def test_eval_at_samples_keeps_history_through_state_dict():
    from callbacks.eval_at_samples import EvalAtSamples

    first = EvalAtSamples(at_samples=[10])
    first.history = [{"samples": 10.0, "logloss": 0.5}]
    second = EvalAtSamples(at_samples=[10])
    second.load_state_dict(first.state_dict())
    assert second.history == first.history and second.history is not first.history


def test_fold_ids_is_modulo_per_feature():
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    # Two features, batch of 3; feature a has bags of 1, 2, 0 ids, feature b of 1, 1, 1.
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.tensor([7, 12, 3, 9, 10, 25]),
        lengths=torch.tensor([1, 2, 0, 1, 1, 1], dtype=torch.int32))
    folded = fold_ids(kjt, torch.tensor([5, 10]))
    assert folded.values().tolist() == [7 % 5, 12 % 5, 3 % 5, 9 % 10, 10 % 10, 25 % 10]
    assert folded.lengths().tolist() == [1, 2, 0, 1, 1, 1]


def test_ctr_metrics_against_sklearn():
    from sklearn.metrics import log_loss, roc_auc_score

    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000)
    labels = (rng.random(1000) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    m = CTRMetrics()
    for part in np.array_split(np.arange(1000), 3):
        m.update(torch.tensor(logits[part], dtype=torch.float32), torch.tensor(labels[part]))
    out = m.compute()
    p = 1 / (1 + np.exp(-logits))
    base = labels.mean()
    assert float(out["logloss"]) == pytest.approx(log_loss(labels, p), rel=1e-5)
    assert float(out["auroc"]) == pytest.approx(roc_auc_score(labels, p), rel=1e-5)
    entropy = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    assert float(out["ne"]) == pytest.approx(log_loss(labels, p) / entropy, rel=1e-5)
    assert float(out["calibration"]) == pytest.approx(p.mean() / base, rel=1e-5)
    assert normalized_entropy(0.5, 0.0) == math.inf


def test_fused_rowwise_adagrad_matches_float64_rederivation():
    """One step of the DMP model against the same step re-derived by hand in float64."""
    from models.dlrm.sharded import to_plain

    dm = SyntheticCTR(batch_size=64, train_samples=64, **SYN)
    lr, eps = 0.1, 1e-8
    module = DLRMModule(**{**TINY, "num_embeddings": 100}, embedding_lr=lr, embedding_eps=eps,
                        num_dense_features=3,
                        sparse_feature_names=list(dm.schema.sparse_names),
                        sparse_cardinalities=list(dm.schema.cardinalities))
    module.configure_model()
    optimizer = module.configure_optimizers()
    batch = next(iter(dm.train_dataloader()))
    before = to_plain(module.model.state_dict())
    # Reference: the same network in float64, unsharded, weights copied over.
    ref = build_dlrm(module.shape, dm.schema.sparse_names, embedding_device="cpu").double()
    ref.load_state_dict({k: v.double() for k, v in before.items()})
    sparse = fold_ids(batch.sparse_features, module.table_rows)  # cat_1: 200 ids into 100 rows
    ref_logits = ref(batch.dense_features.double(), sparse).squeeze(-1)
    ref_loss = torch.nn.functional.binary_cross_entropy_with_logits(ref_logits, batch.labels.double())
    ref_loss.backward()

    logits = module(batch)
    assert torch.allclose(logits.double(), ref_logits, atol=1e-5)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = to_plain(module.model.state_dict())
    untouched_rows = 0
    for name in dm.schema.sparse_names:
        key = f"sparse_arch.embedding_bag_collection.embedding_bags.t_{name}.weight"
        w0 = before[key].double()
        grad = dict(ref.named_parameters())[key].grad
        # Row-wise Adagrad: state = mean_d g^2 per row; w -= lr * g / (sqrt(state) + eps).
        state = (grad ** 2).mean(dim=1, keepdim=True)
        expected = w0 - lr * grad / (state.sqrt() + eps)
        touched = grad.abs().sum(dim=1) > 0
        assert touched.any()
        untouched_rows += int((~touched).sum())
        assert torch.allclose(after[key].double(), expected, atol=1e-5)
        # Sparse: rows the batch did not touch are bit-identical.
        assert torch.equal(after[key][~touched], before[key][~touched])
    assert untouched_rows > 0


class RecordIndices(Callback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += batch.indices.tolist()


def tiny_trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=tmp_path, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


def test_single_epoch_sees_each_index_once_and_evaluates_at_sample_counts(tmp_path):
    from callbacks.eval_at_samples import EvalAtSamples

    dm = SyntheticCTR(batch_size=128, train_samples=128 * 12, num_workers=2, **SYN)
    record, evals = RecordIndices(), EvalAtSamples(at_samples=[256, 1000, 1536])
    trainer = tiny_trainer(tmp_path, callbacks=[record, evals], limit_val_batches=0)
    model = DLRMModule(**TINY)
    trainer.fit(model, dm)
    assert sorted(record.seen) == list(range(128 * 12))
    assert [h["samples"] for h in evals.history] == [256, 1024, 1536]
    assert all(0 < h["logloss"] < 2 and 0 <= h["auroc"] <= 1 for h in evals.history)
    assert "train/progressive_loss" in trainer.callback_metrics
    assert model.size_report["embedding_parameters"] == (8 + 8 + 5) * 4


def test_trainer_on_movielens_and_criteo(tmp_path):
    from datamodules.ctr.criteo import CriteoTSV
    from datamodules.ctr.movielens import MovieLens100K
    from tests.datamodules.test_criteo import write_lines

    ml = MovieLens100K(batch_size=256, train_samples=2048)
    trainer = tiny_trainer(tmp_path, limit_val_batches=4, limit_test_batches=2)
    model = DLRMModule(**TINY)
    trainer.fit(model, ml)
    assert 0 < float(trainer.callback_metrics["val/auroc"]) <= 1
    assert trainer.test(model, ml, verbose=False)[0]["test/logloss"] > 0
    path = tmp_path / "day.tsv"
    write_lines(path, 300)
    criteo = CriteoTSV(train_files=[str(path)], val_files=[str(path)], batch_size=64,
                       hash_size=1000)
    trainer = tiny_trainer(tmp_path)
    trainer.fit(DLRMModule(**TINY), criteo)
    assert trainer.global_step == 4
    assert float(trainer.callback_metrics["val/base_rate"]) == pytest.approx(0.5)


def test_checkpoint_resume_restores_fused_optimizer_state(tmp_path):
    """Train 2 epochs straight vs 1 epoch + resume: identical weights only if the fused
    row-wise Adagrad state (and the dense Adam state) came back from the checkpoint."""
    from models.dlrm.sharded import to_plain

    def data():
        return SyntheticCTR(batch_size=64, train_samples=64 * 3, **SYN)

    def model():
        return DLRMModule(**TINY, optimizer=lambda p: torch.optim.Adam(p, lr=0.01))

    L.seed_everything(0)
    straight = model()
    tiny_trainer(tmp_path / "a", max_epochs=2, limit_val_batches=0).fit(straight, data())
    L.seed_everything(0)
    first = model()
    trainer = tiny_trainer(tmp_path / "b", max_epochs=1, limit_val_batches=0)
    trainer.fit(first, data())
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)  # plain tensors only
    momentum = saved["optimizer_states"][0]["fused"]
    assert all(v.abs().sum() > 0 for s in momentum.values() for v in s.values())
    L.seed_everything(1)  # other initial weights: everything must come from the checkpoint
    resumed = model()
    tiny_trainer(tmp_path / "c", max_epochs=2, limit_val_batches=0).fit(resumed, data(), ckpt_path=ckpt)
    a, b = to_plain(straight.model.state_dict()), to_plain(resumed.model.state_dict())
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert resumed.samples_seen == straight.samples_seen == 64 * 6


@pytest.mark.parametrize("config", ["synthetic", "synthetic_gpu", "movielens", "criteo_mlperf"])
def test_configs_parse(config, capsys):
    from lit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", f"configs/dlrm/{config}.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "models.DLRMModule" in out and "embedding_dim" in out


def test_cli_fit_with_logger_and_eval_at_samples(tmp_path):
    """The synthetic config end to end through the CLI, TensorBoard logging on, small sizes."""
    from lit.cli import main

    main(["fit", "--config", "configs/dlrm/synthetic.yaml",
          f"--trainer.default_root_dir={tmp_path}",
          f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
          "--trainer.callbacks=[{class_path: callbacks.EvalAtSamples, "
          "init_args: {at_samples: [256, 512]}}]",
          "--trainer.enable_progress_bar=false",
          "--model.init_args.embedding_dim=8", "--model.init_args.num_embeddings=64",
          "--model.init_args.dense_arch_layer_sizes=[16]",
          "--model.init_args.over_arch_layer_sizes=[16]",
          "--data.init_args.batch_size=128", "--data.init_args.train_samples=512",
          "--data.init_args.val_samples=256", "--data.init_args.test_samples=256",
          "--data.init_args.cardinalities=[100, 50, 7]", "--data.init_args.num_dense=3"])
    events = list((tmp_path / "runs").rglob("events.out.tfevents*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"eval_at/logloss", "train/progressive_loss", "val/auroc", "test/ne"} <= tags
    assert list(tmp_path.rglob("last.ckpt"))


def test_planner_sees_the_gpu_memory_not_torchrec_default_32gb():
    """26 tables x 4M x 128 fp32 = 53.2 GB: more than torchrec's default 32 GB per GPU (minus its
    15% reserve), well within an H200's 141 GB. Planned for one GPU on the CPU (the planner only
    estimates), the tables must fit with the real memory and not with the default."""
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.distributed.sharding_plan import get_default_sharders

    from models.dlrm.sharded import planner_topology

    names = [f"t{i}" for i in range(26)]
    shape = dlrm_shape(embedding_dim=128, num_embeddings=4_000_000, cardinalities=[4_000_000] * 26,
                       num_dense=13, dense_arch_layer_sizes=[512, 256, 128],
                       over_arch_layer_sizes=[1024, 1024, 512, 256, 1])
    assert shape.embedding_parameters() * 4 == 26 * 4_000_000 * 128 * 4  # 53.2 GB in fp32
    constraints = {f"t_{n}": ParameterConstraints(
        sharding_types=["table_wise"], compute_kernels=[EmbeddingComputeKernel.FUSED.value])
        for n in names}

    def plan(topology):
        return EmbeddingShardingPlanner(topology=topology, constraints=constraints).plan(
            build_dlrm(shape, tuple(names)), get_default_sharders())

    h200 = planner_topology(torch.device("cuda"), 1, hbm_bytes=141 * 10**9)
    assert h200.devices[0].storage.hbm == 141 * 10**9
    tables = plan(h200).plan["sparse_arch.embedding_bag_collection"]
    assert len(tables) == 26 and {p.ranks[0] for p in tables.values()} == {0}
    with pytest.raises(PlannerError, match="insufficient storage"):
        plan(Topology(world_size=1, compute_device="cuda"))  # torchrec's 32 GB default


def test_held_out_metrics_evaluate_without_autograd():
    dm = SyntheticCTR(batch_size=64, train_samples=128, val_samples=128, test_samples=64,
                      cardinalities=[50, 20, 7], num_dense=3)
    dm.setup("fit")
    module = DLRMModule(embedding_dim=4, num_embeddings=64, dense_arch_layer_sizes=[8, 4],
                        over_arch_layer_sizes=[8, 1], num_dense_features=3,
                        sparse_feature_names=list(dm.schema.sparse_names),
                        sparse_cardinalities=list(dm.schema.cardinalities))
    module.build("cpu")
    grad_modes = []
    module.register_forward_pre_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    module.train()
    result = module.held_out_metrics(dm.val_dataloader())
    assert grad_modes == [False, False] and module.training  # 2 batches, mode restored
    assert 0.0 <= result["auroc"] <= 1.0 and torch.is_grad_enabled()
