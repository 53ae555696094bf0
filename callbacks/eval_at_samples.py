"""Single-epoch training's evaluation schedule: held-out metrics at fixed sample counts.

Data-scaling curves (Ardalani et al., arXiv 2208.08489) need the held-out loss after N samples
for several N within one pass over the data. :func:`crossed` is the schedule (which eval points a
step passed); :class:`EvalAtSamples` scores the datamodule's validation loader at those points,
logs ``eval_at/<metric>`` against the sample count, and keeps the points in ``history``. The
training budget itself is the datamodule's ``train_samples`` with ``max_epochs: 1``; the train loss
the model logs is progressive (each batch scored before its own update).

The held-out numbers are the module's own (:meth:`models.DLRMModule.held_out_metrics`: the
scoring of its validation and test steps over the validation loader, in metrics built like its
own, batches moved by its own transfer, under the Trainer's precision context): a point at the
last sample count reads what the Trainer's epoch-end validation (``val/*``) reads. Why not run the Trainer's validation loop
itself at each point: the points must not depend on ``limit_val_batches`` (runs turn the
epoch-end validation off with 0), and a validation run fires ``on_validation_end``, where
``ModelCheckpoint`` saves whenever it does not save at epoch ends (``val_check_interval`` below
1, ``check_val_every_n_epoch`` above 1): a checkpoint per point, and DLRM tables can be many GB.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


def crossed(points: list[int], before: int, after: int) -> list[int]:
    """Eval points in ``(before, after]``: the ones a step from ``before`` to ``after`` samples passed."""
    return [p for p in points if before < p <= after]


class EvalAtSamples(Callback):
    """Evaluate on the held-out split when the samples seen cross each of ``at_samples``.

    Args:
        at_samples: sample counts (all ranks together) at which to evaluate, e.g.
            ``[65536, 262144, 1048576]``; log-spaced points suit power-law fits.
        every_samples: also evaluate every this many samples (``None``: only ``at_samples``).
    """

    def __init__(self, at_samples: list[int] | None = None, every_samples: int | None = None) -> None:
        if every_samples is not None and every_samples < 1:
            raise ValueError(f"every_samples must be >= 1 or null, got {every_samples!r}")
        if any(p < 1 for p in at_samples or []):
            raise ValueError(f"at_samples must be positive sample counts, got {at_samples!r}")
        self.at_samples = sorted(set(at_samples or []))
        self.every_samples = every_samples
        self.history: list[dict[str, float]] = []
        self._before = 0

    def _points(self, before: int, after: int) -> list[int]:
        points = crossed(self.at_samples, before, after)
        if self.every_samples:
            points += [p for p in range(self.every_samples * (before // self.every_samples + 1),
                                        after + 1, self.every_samples) if p not in points]
        return sorted(points)

    @override
    def state_dict(self) -> dict:
        return {"history": [dict(point) for point in self.history]}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        """A resumed run keeps the points evaluated before the interruption."""
        self.history = [dict(point) for point in state_dict.get("history", [])]

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch,
                             batch_idx: int) -> None:
        self._before = int(pl_module.samples_seen)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        after = int(pl_module.samples_seen)
        if not self._points(self._before, after):
            return
        loader = trainer.datamodule.val_dataloader()
        scores = pl_module.held_out_metrics(loader, trainer.precision_plugin.forward_context)
        result = {"samples": float(after), **scores}
        self.history.append(result)
        for logger in trainer.loggers:
            logger.log_metrics({f"eval_at/{k}": v for k, v in result.items() if k != "samples"},
                               step=after)
