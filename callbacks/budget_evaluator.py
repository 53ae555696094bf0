"""Training under a time budget, evaluated on a clock: the callback of the PatchDropout
time-accuracy study (Liu et al., arXiv 2208.07220, Sec. 5; the tool is :mod:`lit.tradeoff`).

Training time is the wall clock (or the process's CPU time, which other programs on a shared
machine do not inflate) minus evaluation. A run-length-aware schedule
(:class:`lit.schedulers.WarmupDecay`) is re-planned after each step to end with the run.

Each evaluation is the module's own
(:meth:`models.classifier.ClassifierModule.held_out_accuracy`: its validation step's scoring over
the validation batches, moved to the device by the Trainer's strategy and run under its precision
context), so the points read what ``val/acc`` would. It runs between training steps
rather than as the Trainer's validation loop, which the study keeps off (``limit_val_batches: 0``
in :mod:`lit.tradeoff`: its epoch-end pass would repeat this callback's); the validation split is
loaded once and kept.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit.schedulers import plans_run_length
from models.classifier import ClassifierModule


def expected_steps(max_steps: int, step: int, seconds: float, budget_s: float | None) -> int:
    """Optimizer steps of the whole run: the Trainer's ``max_steps``, or fewer when the budget
    runs out first at the rate so far (``step`` steps in ``seconds``); always more than ``step``."""
    if budget_s is None or step == 0:
        return max_steps
    return min(max_steps, max(step + 1, math.ceil(step * budget_s / max(seconds, 1e-9))))


class BudgetEvaluator(Callback):
    """Stop at a training-time budget, evaluate on a clock, end the LR schedule with the run.

    Validation accuracy (the datamodule's validation split) is taken every ``eval_every_s``
    training seconds, at every epoch end and when the budget runs out; the test after ``fit``
    adds ``test_acc`` to the last point. The points go to ``points_file`` (a JSON list).

    Args:
        points_file: JSON file the evaluations are written to.
        run: name of the run, copied into every point.
        budget_s: training seconds before training stops; ``None``: the Trainer ends the run.
        eval_every_s: training seconds between evaluations.
        clock: ``"wall"`` or ``"cpu"`` (process CPU time of all threads).
    """

    def __init__(self, points_file: str, run: str = "run", budget_s: float | None = None,
                 eval_every_s: float = 30.0, clock: Literal["wall", "cpu"] = "wall") -> None:
        if budget_s is not None and not budget_s > 0:
            raise ValueError(f"budget_s must be > 0 seconds or null, got {budget_s!r}")
        if not eval_every_s > 0:
            raise ValueError(f"eval_every_s must be > 0 seconds, got {eval_every_s!r}")
        if clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
        self.points_file, self.run = Path(points_file), run
        self.budget_s, self.eval_every_s = budget_s, eval_every_s
        self.now = time.perf_counter if clock == "wall" else time.process_time
        self.points: list[dict] = []
        self.start = self.paused = 0.0
        self.next_eval, self.images, self.val_batches = eval_every_s, 0, None

    def seconds(self) -> float:  # training seconds so far, evaluation excluded
        return self.now() - self.start - self.paused

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, ClassifierModule):
            raise ValueError(f"BudgetEvaluator: needs a classifier (models.ImageClassifier or models.BertClassifier, "
                             f"a models.classifier.ClassifierModule), got {type(pl_module).__name__}")
        self.start, self.paused = self.now(), 0.0

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self.images += len(batch[0])
        seconds = self.seconds()
        total = expected_steps(int(trainer.estimated_stepping_batches), trainer.global_step, seconds, self.budget_s)
        for config in trainer.lr_scheduler_configs:
            if plans_run_length(config.scheduler) and config.scheduler.total_steps != total:
                config.scheduler.plan(total)
        if self.budget_s is not None and seconds >= self.budget_s:
            self.evaluate(trainer, pl_module, at_epoch_end=False)
            trainer.should_stop = True
        elif seconds >= self.next_eval:
            self.evaluate(trainer, pl_module, at_epoch_end=False)
            self.next_eval = seconds + self.eval_every_s

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.should_stop:
            self.evaluate(trainer, pl_module, at_epoch_end=True)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.write(trainer)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.points and "test/acc" in trainer.callback_metrics:
            self.points[-1]["test_acc"] = round(float(trainer.callback_metrics["test/acc"]), 4)
            self.write(trainer)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, at_epoch_end: bool) -> None:
        """Validation accuracy now, with the clock paused."""
        paused_at, seconds = self.now(), self.seconds()
        # Loaded once and kept (the split is small): later evaluations time no data loading.
        self.val_batches = self.val_batches or list(trainer.datamodule.val_dataloader())
        acc = pl_module.held_out_accuracy(self.val_batches, trainer.strategy.batch_to_device,
                                          trainer.precision_plugin.forward_context)
        self.points.append({
            "run": self.run, "params": sum(p.numel() for p in pl_module.parameters()),
            "train_s": round(seconds, 2), "epochs": round(trainer.global_step / max(1, trainer.num_training_batches), 3),
            "steps": trainer.global_step, "images_per_s": round(self.images / max(seconds, 1e-9), 1),
            "val_acc": round(acc, 4), "at_epoch_end": at_epoch_end, "test_acc": None})
        rank_zero_info(f"  [{self.run}] {seconds:7.1f}s  epoch {self.points[-1]['epochs']:5.2f}  val_acc {acc:.4f}")
        self.paused += self.now() - paused_at

    def write(self, trainer: Trainer) -> None:
        if trainer.is_global_zero:
            self.points_file.parent.mkdir(parents=True, exist_ok=True)
            self.points_file.write_text(json.dumps(self.points, indent=1))
