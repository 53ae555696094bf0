"""The steps shared by :class:`models.ImageClassifier` and :class:`models.BertClassifier`:
label-smoothed cross-entropy, torchmetrics accuracy per stage, argmax predictions. Subclasses
split batches (:meth:`ClassifierModule.split_batch`), may replace the training loss (mixup) and
set ``example_input_array`` so that the model summary shows FLOPs.

Evaluation variants (:meth:`ClassifierModule.add_eval_variant`) are the one way to evaluate a
transformed model (int8 layers, 2:4 weights, CUDA-graphed runners): a callback registers another
forward when a validation or test loop starts, and the module scores it on the same batches, in
the same loop, with the same loss and accuracy code as its own pass (``{prefix}/loss``,
``{prefix}/acc``). Transformed models are usually copies of the network that share its tensors
(:func:`shared_copy`), so nothing of the module itself changes.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import re
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.utils.flop_counter import flop_registry
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lit.module import LitModule, default_optimizer, eval_mode

# The model summary counts FLOPs with torch's FlopCounterMode, which knows the CUDA attention
# kernels but not the CPU one: without this, a summary on the CPU leaves attention out.
flop_registry.setdefault(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                         flop_registry[torch.ops.aten._scaled_dot_product_flash_attention])

STAGES = ("train", "val", "test", "predict")


def shared_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with new modules but ``net``'s own parameters and buffers (no memory).

    Replacing a layer of the copy (``set_submodule``) or assigning a layer's weight
    (``layer.weight = ...``) leaves ``net`` as it is; changing a shared tensor in place would not.
    """
    memo = {id(t): t for t in itertools.chain(net.parameters(), net.buffers())}
    return copy.deepcopy(net, memo)


class ClassifierModule(LitModule):
    """Base class of the classifiers: steps, loss and accuracy (``{train,val,test}/{loss,acc}``).

    Args:
        num_classes: classes of the accuracy metrics.
        label_smoothing: cross-entropy label smoothing at train time, in [0, 1).
        optimizer, lr_scheduler, lr_scheduler_interval: see :class:`lit.module.LitModule`.
    """

    def __init__(
        self,
        num_classes: int,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval, monitor="val/loss")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.train_acc = self.accuracy_metric()
        self.val_acc = self.accuracy_metric()
        self.test_acc = self.accuracy_metric()
        # Evaluation variants: prefix -> forward (not a submodule: a variant's network is not
        # part of this module's state), and their accuracies (submodules, so that Lightning
        # finds, syncs and resets them like the module's own).
        self._eval_variants: dict[str, Callable[..., torch.Tensor]] = {}
        self.eval_variant_acc = nn.ModuleDict()

    def accuracy_metric(self) -> MulticlassAccuracy:
        """A new accuracy metric like the module's own (micro-averaged over ``num_classes``)."""
        return MulticlassAccuracy(self.num_classes, average="micro")

    def split_batch(self, batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """``(forward inputs, labels)`` of a batch; labels ``None`` for unlabelled predict batches."""
        raise NotImplementedError

    def training_loss(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, loss)`` of a training batch: label-smoothed cross-entropy."""
        logits = self(*inputs)
        return logits, F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    @override
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, labels = self.split_batch(batch)
        logits, loss = self.training_loss(inputs, labels)
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    @override
    def validation_step(self, batch, batch_idx: int) -> None:
        self.evaluate(batch, "val", self.val_acc)

    @override
    def test_step(self, batch, batch_idx: int) -> None:
        self.evaluate(batch, "test", self.test_acc)

    @override
    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self(*self.split_batch(batch)[0]).argmax(dim=-1)

    def score_batch(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, metric: MulticlassAccuracy,
                    forward: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """Run ``forward`` (default: the module) on a held-out batch, add it to ``metric`` and
        return its plain cross-entropy (no smoothing). The one scoring code of every evaluation:
        the validation / test step, its variants, and callbacks that evaluate between training
        steps (:class:`callbacks.BudgetEvaluator`)."""
        logits = (self if forward is None else forward)(*inputs)
        metric(logits, labels)
        return F.cross_entropy(logits, labels)

    def held_out_accuracy(self, batches: Iterable, move: Callable[[object], object],
                          context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                          ) -> float:
        """Accuracy over ``batches`` in eval mode, between training steps (what
        :class:`callbacks.BudgetEvaluator` asks at its clock points): each batch moved by
        ``move`` (e.g. the strategy's ``batch_to_device``) and scored by :meth:`score_batch`
        inside ``context()`` (the Trainer's precision context); training mode comes back after."""
        metric = self.accuracy_metric().to(self.device)
        with eval_mode(self), context():
            for batch in batches:
                inputs, labels = self.split_batch(move(batch))
                self.score_batch(inputs, labels, metric)
        return float(metric.compute())

    def evaluate(self, batch, stage: str, metric: MulticlassAccuracy) -> None:
        """Loss and accuracy of an evaluation batch, for the module and every evaluation variant."""
        inputs, labels = self.split_batch(batch)
        n = len(labels)
        loss = self.score_batch(inputs, labels, metric)
        self.log(f"{stage}/loss", loss, sync_dist=True, prog_bar=stage == "val", batch_size=n)
        self.log(f"{stage}/acc", metric, prog_bar=True, batch_size=n)
        for prefix, forward in self._eval_variants.items():
            variant_metric = self.eval_variant_acc[prefix]
            loss = self.score_batch(inputs, labels, variant_metric, forward)
            self.log(f"{prefix}/loss", loss, sync_dist=True, batch_size=n)
            self.log(f"{prefix}/acc", variant_metric, batch_size=n, metric_attribute=f"eval_variant_acc.{prefix}")

    # -- evaluation variants -------------------------------------------------------------------

    @property
    def eval_variants(self) -> list[str]:
        """Prefixes of the registered evaluation variants, in the order they are scored."""
        return list(self._eval_variants)

    def add_eval_variant(self, prefix: str, forward: Callable[..., torch.Tensor]) -> None:
        """Score ``forward`` on every validation / test batch too, as ``{prefix}/loss`` and ``{prefix}/acc``.

        ``forward`` takes the inputs the module's own forward takes (:meth:`split_batch`'s) and
        returns logits. It runs right after the module's pass on the same batch, inside the
        Trainer's loop (its device, precision context and no-grad mode), and is scored by
        :meth:`score_batch`; its accuracy is a metric of its own, reset every epoch and synced
        across ranks like the module's. Register a variant when the loop starts (e.g.
        ``on_test_start``) and remove it (:meth:`remove_eval_variant`) when it ends: a variant
        scores whatever evaluation loop runs while it is registered. A network the variant runs
        is not a submodule, so the loop does not set its mode: put it in eval mode.
        """
        if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", prefix) or prefix in STAGES:
            raise ValueError(f"prefix: a metric prefix (letters, digits, '_' or '-', not one of {STAGES}), "
                             f"e.g. 'test_int8'; got {prefix!r}")
        if prefix in self._eval_variants:
            raise ValueError(f"prefix: an evaluation variant {prefix!r} is already registered; remove it "
                             f"first or choose another prefix")
        if not callable(forward):
            raise ValueError(f"forward: must be callable (inputs -> logits), got {type(forward).__name__}")
        self._eval_variants[prefix] = forward
        self.eval_variant_acc[prefix] = self.accuracy_metric().to(self.device)

    def remove_eval_variant(self, prefix: str) -> None:
        """Stop scoring the variant ``prefix`` (and drop its accuracy metric)."""
        if prefix not in self._eval_variants:
            raise ValueError(f"prefix: no evaluation variant {prefix!r} (registered: {self.eval_variants})")
        del self._eval_variants[prefix]
        del self.eval_variant_acc[prefix]
