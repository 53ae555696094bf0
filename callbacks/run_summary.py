"""One JSON file per run with what a scaling study tabulates (Ardalani et al., arXiv 2208.08489).

:class:`RunSummary` writes, at the end of ``fit`` and again after ``test``: the module's size
report (``embedding_parameters``, ``dense_parameters``, ``forward_flops_per_sample`` of
:class:`models.DLRMModule`), the samples seen, the progressive train loss (each batch scored
before its own update; its mean over the epoch) with its normalized entropy, every ``val/*`` and
``test/*`` metric Lightning holds, the training wall time, and, when an
:class:`callbacks.EvalAtSamples` runs beside it, its held-out points together with the
progressive train loss up to each of them. ``python -m lit.scaling sweep`` reads this file to fill
its results table.

The file is written to a temporary name and renamed, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from models.dlrm.metrics import normalized_entropy


def progressive_at(cumulative: list[tuple[int, float, float]], samples: float) -> tuple[float, float]:
    """Mean progressive loss and base rate over the first ``samples`` samples.

    ``cumulative`` holds ``(samples, loss_sum, label_sum)`` after each batch, in order; the last
    entry at or below ``samples`` is used (``nan`` when none).
    """
    best = None
    for count, loss_sum, label_sum in cumulative:
        if count > samples:
            break
        best = (count, loss_sum, label_sum)
    if best is None or best[0] == 0:
        return math.nan, math.nan
    return best[1] / best[0], best[2] / best[0]


class RunSummary(Callback):
    """Write a run's sizes, losses and timing to ``path`` as JSON (rank zero only).

    Args:
        path: the JSON file to write (its folder is created).
    """

    def __init__(self, path: str) -> None:
        if not path:
            raise ValueError(f"RunSummary.path: give a file name, e.g. runs/x/summary.json, got {path!r}")
        self.path = path
        self._cumulative: list[tuple[int, float, float]] = []
        self._sums = [0, 0.0, 0.0]  # samples, loss sum, label sum (this process)
        self._start = self._train_s = None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        size = int(batch.labels.numel())
        self._sums[0] += size
        self._sums[1] += float(loss) * size
        self._sums[2] += float(batch.labels.sum())
        self._cumulative.append(tuple(self._sums))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._start is not None:
            self._train_s = time.perf_counter() - self._start

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)

    def summary(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """The JSON content (also useful in-process)."""
        samples, loss_sum, label_sum = self._sums
        train_loss = loss_sum / samples if samples else math.nan
        base_rate = label_sum / samples if samples else math.nan
        out: dict = {
            **{k: int(v) for k, v in getattr(pl_module, "size_report", {}).items()},
            "samples_seen": int(getattr(pl_module, "samples_seen", samples)),
            "train_logloss": train_loss,
            "train_ne": normalized_entropy(train_loss, base_rate) if samples else math.nan,
            "train_s": self._train_s,
            "interrupted": bool(trainer.interrupted),
        }
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("val/", "test/")):
                out[key.replace("/", "_")] = float(value)
        from callbacks.eval_at_samples import EvalAtSamples

        points = []
        for callback in trainer.callbacks:
            if isinstance(callback, EvalAtSamples):
                for point in callback.history:
                    loss, rate = progressive_at(self._cumulative, point["samples"])
                    points.append({**point, "train_logloss": loss,
                                   "train_ne": normalized_entropy(loss, rate)
                                   if math.isfinite(loss) else math.nan})
        out["eval_at"] = points
        return out

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.summary(trainer, pl_module), indent=1))
        os.replace(tmp, path)
