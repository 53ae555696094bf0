"""NMPruning inside a real Trainer on a tiny random-init BERT and the real Rotten Tomatoes data."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.nm_pruning import NMPruning
from datamodules.text_classification import TextClassification
from lit.schedulers import WarmupDecay
from models.nm_sparsity import is_nm_sparse, nm_mask, select_linears
from models.bert_classifier import BertClassifier

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64}
INCLUDE = [r"encoder\.layer\.\d+\."]


@pytest.fixture(scope="module")
def data():
    dm = TextClassification(max_samples=120, max_length=24, batch_size=16, val_fraction=0.1)
    dm.setup("fit")
    return dm


def tiny_model(lr: float = 1e-3, schedule: bool = False) -> BertClassifier:
    torch.manual_seed(0)
    return BertClassifier(
        pretrained=None, config=TINY,
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
        lr_scheduler=partial(WarmupDecay, warmup_steps=0, decay="linear") if schedule else None,
    )


def make_trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    args = dict(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0)
    args.update(kwargs)
    return L.Trainer(callbacks=callbacks, **args)


def pruned(model) -> dict:
    return select_linears(model, INCLUDE)


class Probe(Callback):
    """Records weights and lr at each epoch start (after NMPruning's hook) and masks per step."""

    def __init__(self, pruning: NMPruning) -> None:
        self.pruning = pruning
        self.epoch_weights, self.epoch_lr, self.step_masks = [], [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_weights.append({k: v.weight.detach().clone() for k, v in pruned(pl_module).items()})
        self.epoch_lr.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.step_masks.append({k: v.clone() for k, v in self.pruning.masks.items()})


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning",
                            "ignore:You're resuming from a checkpoint that ended before:UserWarning")
def test_one_shot_prunes_at_start_step_keeps_mask_and_survives_reload(tmp_path, data):
    model = tiny_model()
    callback = NMPruning(schedule="one_shot", patterns=["2:4"], start_step=2)
    probe = Probe(callback)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [callback, probe, ckpt], max_steps=5).fit(model, data)
    layers = pruned(model)
    assert len(layers) == 12  # 2 layers x (Q, K, V, attention out, FFN in, FFN out)
    assert probe.step_masks[0] == {}  # dense before start_step
    assert all(torch.equal(probe.step_masks[2][k], probe.step_masks[-1][k]) for k in layers)  # fixed
    for name, layer in layers.items():
        assert is_nm_sparse(layer.weight, 2, 4), name
        assert float((layer.weight == 0).float().mean()) == 0.5  # random init has no zeros
    assert model.net.classifier.weight.ne(0).all() and model.net.bert.pooler.dense.weight.ne(0).all()

    # The checkpoint holds N:M weights and the masks; a resumed fit restores and keeps them.
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    weights = {k.removeprefix("net."): v for k, v in state["state_dict"].items()}
    for name in layers:
        assert is_nm_sparse(weights[name.removeprefix("net.") + ".weight"], 2, 4)
    saved_masks = state["callbacks"][callback.state_key]["masks"]
    resumed_cb = NMPruning(schedule="one_shot", patterns=["2:4"], start_step=2)
    resumed = tiny_model()
    make_trainer(tmp_path, [resumed_cb], max_steps=7, enable_checkpointing=False).fit(resumed, data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for name, layer in pruned(resumed).items():
        assert torch.equal(resumed_cb.masks[name].cpu(), saved_masks[name])
        assert torch.equal(layer.weight != 0, saved_masks[name])


def test_dynamic_masks_follow_the_dense_shadow(tmp_path, data):
    model = tiny_model(lr=3e-2)
    callback = NMPruning(schedule="dynamic", patterns=["2:4"], update_every=1)
    probe = Probe(callback)
    make_trainer(tmp_path, [callback, probe], max_steps=4).fit(model, data)
    first, last = probe.step_masks[0], probe.step_masks[-1]
    assert any(not torch.equal(first[k], last[k]) for k in first)  # masks moved
    for name, layer in pruned(model).items():
        dense = callback.dense[name]
        # Weights are the shadow under the mask; at the last recompute the mask was the shadow's.
        assert torch.equal(layer.weight, dense * callback.masks[name])
        assert is_nm_sparse(layer.weight, 2, 4)
        assert (dense[~callback.masks[name]] != 0).any()  # pruned weights keep learning


def test_inherited_stages_start_from_the_previous_stage(tmp_path, data):
    model = tiny_model(schedule=True)
    patterns = ["4:8", "2:4", "1:4"]
    callback = NMPruning(schedule="inherited", patterns=patterns, update_every=0, stage_dir=str(tmp_path / "st"))
    probe = Probe(callback)
    make_trainer(tmp_path, [callback, probe], max_epochs=3, limit_train_batches=3).fit(model, data)
    stages = json.loads((tmp_path / "st" / "nm_stages.json").read_text())
    assert [s["pattern"] for s in stages] == patterns and all("val/acc" in s for s in stages)
    previous = None
    for i, (stage, pattern) in enumerate(zip(stages, patterns)):
        n, m = (int(x) for x in pattern.split(":"))
        weights = torch.load(stage["checkpoint"], weights_only=False)["state_dict"]
        weights = {k: v for k, v in weights.items() if k in {f"{name}.weight" for name in pruned(model)}}
        assert weights and all(is_nm_sparse(w, n, m) for w in weights.values()), pattern
        if previous is not None:
            for key, prev in previous.items():
                start = probe.epoch_weights[i][key.removesuffix(".weight")]
                # Stage i starts from stage i-1's final weights under the new pattern's mask ...
                assert torch.equal(start, prev * nm_mask(prev, n, m))
                # ... so it only keeps weights the previous stage kept.
                assert not (start.ne(0) & prev.eq(0)).any()
        previous = weights
    # WarmupDecay restarts at each stage (warm-up 0: the lr is back at its peak).
    assert probe.epoch_lr == pytest.approx([1e-3] * 3)


def test_phases_under_gradient_accumulation(tmp_path, data):
    """Two batches per optimizer step: the batch without a step masks nothing, so the dense
    shadow is never overwritten by masked weights (random init has no zeros)."""
    callback = NMPruning(schedule="dynamic", patterns=["2:4"], start_step=1, update_every=1)

    class Phases(Callback):  # runs after NMPruning's hooks
        def __init__(self) -> None:
            self.seen, self.shadow_zeros = [], []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.seen.append(("step", callback.phase.value))

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.seen.append(("end", callback.phase.value))
            self.shadow_zeros.append(sum(int((d == 0).sum()) for d in callback.dense.values()))

    phases = Phases()
    make_trainer(tmp_path, [callback, phases], max_steps=3, accumulate_grad_batches=2).fit(tiny_model(), data)
    assert phases.seen == [("end", "dense"), ("step", "dense"), ("end", "dense"),  # step 0: dense
                           ("end", "masked"), ("step", "stepped"), ("end", "masked"),  # step 1
                           ("end", "masked"), ("step", "stepped"), ("end", "masked")]  # step 2
    assert phases.shadow_zeros[2:] == [0, 0, 0, 0]
    reloaded = NMPruning(schedule="dynamic", patterns=["2:4"], start_step=1, update_every=1)
    reloaded.load_state_dict(callback.state_dict())  # a checkpoint with masks resumes MASKED
    assert reloaded.phase.value == "masked"
    assert NMPruning().phase.value == "dense"


def test_bad_configurations_are_rejected(tmp_path, data):
    with pytest.raises(ValueError, match="1 <= N < M"):
        NMPruning(patterns=["4:4"])
    with pytest.raises(ValueError, match="exactly one pattern"):
        NMPruning(schedule="one_shot", patterns=["2:4", "1:4"])
    with pytest.raises(ValueError, match="update_every must be > 0"):
        NMPruning(schedule="dynamic", update_every=0)
    with pytest.raises(ValueError, match="does not divide the input dimension 32"):
        make_trainer(tmp_path, [NMPruning(patterns=["2:6"])], max_steps=1).fit(tiny_model(), data)
    with pytest.raises(ValueError, match="include: no nn.Linear matches"):
        make_trainer(tmp_path, [NMPruning(include=["decoder"])], max_steps=1).fit(tiny_model(), data)
    with pytest.raises(ValueError, match="max_epochs >= 3"):
        callback = NMPruning(schedule="inherited", patterns=["4:8", "2:4", "1:4"])
        make_trainer(tmp_path, [callback], max_epochs=2).fit(tiny_model(), data)
