"""ClassifierModule's evaluation variants: other forwards scored in the module's own validation /
test loop against float64 accuracy and cross-entropy by hand; state reset between loops; the
module untouched afterwards; shared_copy shares tensors but not modules; bad arguments."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from models.bert_classifier import BertClassifier
from models.classifier import shared_copy

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)


def tiny_bert(num_labels: int = 3) -> BertClassifier:
    torch.manual_seed(0)
    model = BertClassifier(pretrained=None, num_labels=num_labels, config=TINY)
    with torch.no_grad():
        model.net.classifier.weight.mul_(100.0)  # predictions that differ between rows
    return model


def batches(n: int = 3, size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (size, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[: size // 2, 9:] = 0
        labels = torch.randint(0, 3, (size,), generator=g)
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return out


def by_hand(forward, data) -> tuple[float, float]:
    """(accuracy, mean cross-entropy over samples) of ``forward`` in float64."""
    logits = torch.cat([forward(b["input_ids"], b["attention_mask"]).double() for b in data])
    labels = torch.cat([b["labels"] for b in data])
    return float((logits.argmax(-1) == labels).double().mean()), float(F.cross_entropy(logits, labels))


class Variant(L.Callback):
    """Registers ``forward`` as the variant ``prefix`` for the test (or validation) loop."""

    def __init__(self, prefix: str, forward, stage: str = "test") -> None:
        self.prefix, self.forward, self.stage = prefix, forward, stage
        self.modes: list[tuple[bool, bool]] = []  # (autograd on, module training) per call

    def _forward(self, module):
        def run(ids, mask):
            self.modes.append((torch.is_grad_enabled(), module.training))
            return self.forward(ids, mask)
        return run

    def on_test_start(self, trainer, pl_module) -> None:
        if self.stage == "test":
            pl_module.add_eval_variant(self.prefix, self._forward(pl_module))

    def on_test_end(self, trainer, pl_module) -> None:
        if self.stage == "test":
            pl_module.remove_eval_variant(self.prefix)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.stage == "val":
            pl_module.add_eval_variant(self.prefix, self._forward(pl_module))

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.stage == "val":
            pl_module.remove_eval_variant(self.prefix)


def trainer(*callbacks) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=list(callbacks))


def test_variants_are_scored_in_the_same_test_loop_as_the_module():
    model, data = tiny_bert(), batches()
    other = tiny_bert()
    with torch.no_grad():
        other.net.classifier.weight.copy_(torch.randn_like(other.net.classifier.weight) * 3.0)
    copy_net = shared_copy(model.net).eval()  # not a submodule: the loop does not set its mode
    copy_net.classifier = other.net.classifier  # another head on the same (shared) encoder
    variants = [Variant("test_other", lambda i, m: copy_net(input_ids=i, attention_mask=m).logits),
                Variant("test_neg", lambda i, m: -model.net(input_ids=i, attention_mask=m).logits)]
    metrics = trainer(*variants).test(model, dataloaders=DataLoader(data, batch_size=None), verbose=False)[0]

    model.eval()
    with torch.no_grad():
        own = by_hand(model, data)
        head = by_hand(lambda i, m: copy_net(input_ids=i, attention_mask=m).logits, data)
        neg = by_hand(lambda i, m: -model(i, m), data)
    for prefix, (acc, loss) in (("test", own), ("test_other", head), ("test_neg", neg)):
        assert metrics[f"{prefix}/acc"] == pytest.approx(acc, abs=1e-6), prefix  # float32: equal
        assert metrics[f"{prefix}/loss"] == pytest.approx(loss, rel=1e-5), prefix
    assert len({own[0], head[0], neg[0]}) == 3  # three different models, three different numbers
    # Each variant ran once per batch, without autograd (the loop's inference mode, or no_grad once a
    # gloo process group exists), with the module in eval mode.
    assert all(v.modes == [(False, False)] * len(data) for v in variants)
    assert model.eval_variants == [] and len(model.eval_variant_acc) == 0
    assert model.net.classifier is not other.net.classifier  # the module's own head is untouched


def test_a_second_loop_starts_from_fresh_metrics_and_validation_has_variants_too():
    model = tiny_bert()
    first, second = batches(seed=0), batches(n=2, seed=1)
    neg = Variant("test_neg", lambda i, m: -model.net(input_ids=i, attention_mask=m).logits)
    run = trainer(neg)
    run.test(model, dataloaders=DataLoader(first, batch_size=None), verbose=False)
    metrics = run.test(model, dataloaders=DataLoader(second, batch_size=None), verbose=False)[0]
    model.eval()
    with torch.no_grad():
        acc, loss = by_hand(lambda i, m: -model(i, m), second)  # the second loop's batches only
    assert metrics["test_neg/acc"] == pytest.approx(acc, abs=1e-6)
    assert metrics["test_neg/loss"] == pytest.approx(loss, rel=1e-5)

    val = Variant("val_neg", lambda i, m: -model.net(input_ids=i, attention_mask=m).logits, stage="val")
    metrics = trainer(val).validate(model, dataloaders=DataLoader(second, batch_size=None), verbose=False)[0]
    assert metrics["val_neg/acc"] == pytest.approx(acc, abs=1e-6)
    with torch.no_grad():
        own_acc, own_loss = by_hand(model, second)
    assert metrics["val/acc"] == pytest.approx(own_acc, abs=1e-6) and own_acc != acc
    assert metrics["val/loss"] == pytest.approx(own_loss, rel=1e-5)


def test_shared_copy_shares_tensors_not_modules():
    net = tiny_bert().net
    twin = shared_copy(net)
    pairs = list(zip(net.state_dict(keep_vars=True).values(), twin.state_dict(keep_vars=True).values()))
    assert pairs and all(a is b for a, b in pairs)  # no memory: the same tensors
    query = "bert.encoder.layer.0.attention.self.query"
    original = net.get_submodule(query)
    assert twin.get_submodule(query) is not original
    twin.set_submodule(query, nn.Identity())
    twin.get_submodule("bert.encoder.layer.1.attention.self.key").weight = nn.Parameter(torch.zeros(32, 32))
    assert net.get_submodule(query) is original
    assert net.get_submodule("bert.encoder.layer.1.attention.self.key").weight.abs().sum() > 0


def test_bad_variants_are_rejected():
    model = tiny_bert()
    for prefix in ("test", "val", "", "a.b", "a/b", "1x", None):
        with pytest.raises(ValueError, match="prefix"):
            model.add_eval_variant(prefix, model)
    with pytest.raises(ValueError, match="forward: must be callable"):
        model.add_eval_variant("test_x", 3)
    model.add_eval_variant("test_x", model)
    with pytest.raises(ValueError, match="already registered"):
        model.add_eval_variant("test_x", model)
    model.remove_eval_variant("test_x")
    with pytest.raises(ValueError, match=r"no evaluation variant 'test_x' \(registered: \[\]\)"):
        model.remove_eval_variant("test_x")
