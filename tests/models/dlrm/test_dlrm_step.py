"""The DLRM training step's host-side shortcuts against the paths they replace: the direct step
(``loss.backward()`` and the optimizer's own step) against Lightning's ``manual_backward`` +
``LightningOptimizer.step``, and ``FusedDenseOptimizer``'s lr push against torchrec's own
``CombinedOptimizer``, with a scheduler changing the embedding lr every step."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from datamodules.ctr.synthetic import SyntheticCTR
from models.dlrm.module import DLRMModule, StepPath, step_path
from models.dlrm.sharded import make_fused_dense_optimizer, to_plain

TINY = dict(embedding_dim=4, num_embeddings=50, dense_arch_layer_sizes=[6],
            over_arch_layer_sizes=[5])
SYN = dict(cardinalities=[30, 200, 5], num_dense=3, val_samples=256, test_samples=256)


class CountsBackward(Callback):
    """Listens to a hook the direct path does not call: the module must take Lightning's path."""

    def __init__(self) -> None:
        self.calls = 0

    def on_after_backward(self, trainer, pl_module) -> None:
        self.calls += 1


def fit(tmp_path, callbacks, schedule: bool = False):
    L.seed_everything(0)
    scheduler = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
                 ) if schedule else None
    model = DLRMModule(**TINY, optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
                       lr_scheduler=scheduler)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, SyntheticCTR(batch_size=64, train_samples=64 * 6, **SYN))
    return model, trainer


@pytest.mark.parametrize("schedule", [False, True])
def test_direct_step_trains_exactly_as_lightnings_path(tmp_path, schedule):
    direct, direct_trainer = fit(tmp_path / "direct", [], schedule)
    listener = CountsBackward()
    lightning, lightning_trainer = fit(tmp_path / "lightning", [listener], schedule)
    assert direct.step_path is StepPath.DIRECT
    assert lightning.step_path is StepPath.LIGHTNING
    assert lightning.step_path_reason == "CountsBackward.on_after_backward"
    assert listener.calls == 6  # Lightning's path ran its hooks on every step
    assert direct_trainer.global_step == lightning_trainer.global_step == 6
    a, b = to_plain(direct.model.state_dict()), to_plain(lightning.model.state_dict())
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert direct.samples_seen == lightning.samples_seen == 64 * 6
    assert float(direct_trainer.callback_metrics["train/progressive_loss"]) == \
        float(lightning_trainer.callback_metrics["train/progressive_loss"])


def test_step_path_names_what_needs_lightnings_path(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    def trainer(**kwargs) -> L.Trainer:
        return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, **kwargs)

    model = DLRMModule(**TINY)
    # bf16 has no loss scaling: nothing differs; a GradScaler scales the loss before backward.
    assert step_path(trainer(precision="bf16-mixed"), model)[0] is StepPath.DIRECT
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    assert step_path(trainer(plugins=[scaled]), model) == (
        StepPath.LIGHTNING, "precision plugin MixedPrecision (loss scaling)")
    assert step_path(trainer(callbacks=[CountsBackward()]), model) == (
        StepPath.LIGHTNING, "CountsBackward.on_after_backward")


def test_fused_lr_push_matches_torchrec_combined_optimizer_under_a_schedule():
    """Same steps with torchrec's CombinedOptimizer (its fused part pushes the lr on every
    zero_grad and step) and with FusedDenseOptimizer (pushes when it changed): a LambdaLR that
    changes the lr every step must give bit-identical tables and dense weights."""
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

    from models.dlrm.sharded import dense_named_parameters

    dm = SyntheticCTR(batch_size=64, train_samples=64 * 5, **SYN)
    batches = list(dm.train_dataloader())
    ends = {}
    for kind in ("torchrec", "ours"):
        torch.manual_seed(0)
        module = DLRMModule(**TINY, embedding_lr=0.1, num_dense_features=3,
                            sparse_feature_names=list(dm.schema.sparse_names),
                            sparse_cardinalities=list(dm.schema.cardinalities))
        module.build("cpu")
        named = dense_named_parameters(module.model)
        dense = torch.optim.SGD(list(named.values()), lr=0.05)
        if kind == "ours":
            optimizer = make_fused_dense_optimizer(module.model, dense)
        else:
            optimizer = CombinedOptimizer([
                ("fused", module.model.fused_optimizer),
                ("dense", KeyedOptimizerWrapper(named, lambda _params: dense))])
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
        for batch in batches:
            optimizer.zero_grad()
            F.binary_cross_entropy_with_logits(module(batch), batch.labels).backward()
            optimizer.step()
            schedule.step()
        ends[kind] = to_plain(module.model.state_dict())
    for key, value in ends["torchrec"].items():
        assert torch.equal(ends["ours"][key], value), key
