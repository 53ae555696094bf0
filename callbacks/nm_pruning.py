"""N:M structured pruning during training: one-shot (ASP), dynamic, and inherited (IDP).

Fang, Zhou and Wang, "An Algorithm-Hardware Co-Optimized Framework for Accelerating N:M Sparse
Transformers" (IEEE TVLSI 2022) obtain a SERIES of N:M sparse BERTs with Inherited Dynamic
Pruning (IDP): masks are recomputed from weight magnitude while training (dynamic) and each
sparser pattern starts from the previous, less sparse model (inherited). The paper has no public
code; this is our reading of it:

* ``one_shot`` (NVIDIA ASP, Mishra et al. arXiv 2104.08378): at ``start_step`` the N:M mask is
  taken from the current weights' magnitude and never changes; training fine-tunes the rest.
* ``dynamic``: from ``start_step``, the mask is recomputed every ``update_every`` optimizer steps
  from DENSE shadow weights. The forward and backward passes see the masked weights; the
  optimizer updates the dense shadow with that gradient (a straight-through estimator, as in
  SR-STE, Zhou et al. arXiv 2102.04010), so pruned weights keep learning and can come back.
  Without the shadow, weights zeroed after each step could never regain magnitude and the
  mask would never change.
* ``inherited``: ``patterns`` (e.g. ``["4:8", "2:4", "1:4"]``) are trained one after the other in
  one ``fit``, ``epochs_per_stage`` epochs each. A stage starts from the previous stage's pruned
  weights: its mask is the new pattern's mask of those weights (so it keeps only weights the
  previous mask kept, unless a group has fewer survivors than N). With ``update_every > 0`` the
  masks are dynamic within each stage (IDP); with 0 they stay fixed per stage. At the end of
  each stage a checkpoint ``nm-stage{i}-{N}of{M}.ckpt`` is written and the stage's validation
  metrics are logged under ``nm_{N}of{M}/...`` and stored in ``nm_stages.json`` beside it; test
  each stage with ``python -m lit test --config ... --ckpt_path <stage checkpoint>``. A
  :class:`lit.schedulers.WarmupDecay` learning rate restarts (warm-up and decay) at each stage
  when ``restart_schedule`` is true.

Masks are applied after every optimizer step, so checkpoints hold exactly N:M weights; masks and
dense shadow are saved with the callback's state. Zeros per layer are logged at every epoch end
(``nm/sparsity/<layer>``). The callback is a state machine over :class:`Phase`.
"""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lit.schedulers import plans_run_length
from models.nm_sparsity import check_nm, nm_mask, parse_pattern, select_linears, sparsity_report

# Every nn.Linear inside a BERT encoder layer: Q, K, V, attention output, FFN in and FFN out.
# Embeddings, the pooler and the classifier are outside ``encoder.layer.<i>`` and stay dense.
DEFAULT_INCLUDE = r"encoder\.layer\.\d+\."


class Phase(Enum):
    """Where the pruned weights stand (``NMPruning.phase``). Transitions, each in one hook::

        DENSE   -> MASKED   batch start at global_step >= start_step: first pattern's masks
        MASKED  -> MASKED   batch start, update_every steps on: masks from the dense shadow;
                            epoch start of an inherited stage: next masks of the pruned weights
        MASKED  -> STEPPED  before the optimizer step: the dense shadow goes into the weights
        STEPPED -> MASKED   batch end: the shadow keeps the stepped weights, which are masked

    A batch without an optimizer step (gradient accumulation) stays MASKED and changes nothing.
    A checkpoint resumes MASKED when it holds masks, else DENSE.
    """

    DENSE = "dense"  # before start_step: no masks
    MASKED = "masked"  # the weights are exactly N:M
    STEPPED = "stepped"  # the optimizer stepped the weights; they are masked at batch end


class NMPruning(Callback):
    """Prune selected ``nn.Linear`` layers to N:M sparsity while training (see module docstring).

    Args:
        schedule: ``"one_shot"``, ``"dynamic"`` or ``"inherited"``.
        patterns: ``"N:M"`` strings; one for ``one_shot``/``dynamic``, the sequence of stages
            for ``inherited`` (e.g. ``["4:8", "2:4", "1:4"]``).
        start_step: optimizer step at which pruning starts (steps before it train dense).
        update_every: optimizer steps between mask recomputations for ``dynamic`` (> 0) and
            ``inherited`` (0 = fixed mask per stage); ignored by ``one_shot``.
        epochs_per_stage: epochs of each ``inherited`` stage; ``trainer.max_epochs`` must be at
            least ``len(patterns) * epochs_per_stage`` (further epochs continue the last stage).
        include: regexes (``re.search``) over module names selecting the Linear layers to prune.
        exclude: regexes removing layers from the selection.
        restart_schedule: ``inherited`` only: restart a ``WarmupDecay`` schedule at each stage.
        stage_dir: folder of the stage checkpoints; default the ModelCheckpoint folder.
    """

    def __init__(
        self,
        schedule: Literal["one_shot", "dynamic", "inherited"] = "one_shot",
        patterns: list[str] = ["2:4"],  # noqa: B006 (YAML default, never mutated)
        start_step: int = 0,
        update_every: int = 100,
        epochs_per_stage: int = 1,
        include: list[str] = [DEFAULT_INCLUDE],  # noqa: B006
        exclude: list[str] = [],  # noqa: B006
        restart_schedule: bool = True,
        stage_dir: str | None = None,
    ) -> None:
        if schedule not in ("one_shot", "dynamic", "inherited"):
            raise ValueError(f"schedule: expected 'one_shot', 'dynamic' or 'inherited', got {schedule!r}")
        if not patterns:
            raise ValueError(f"patterns: need at least one 'N:M' pattern, got {patterns!r}")
        if schedule != "inherited" and len(patterns) != 1:
            raise ValueError(f"patterns: schedule {schedule!r} takes exactly one pattern, got {patterns!r}; "
                             f"use schedule: inherited for a sequence")
        self.nm = [parse_pattern(p, field="patterns") for p in patterns]
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step!r}")
        if update_every < 0 or (schedule == "dynamic" and update_every == 0):
            raise ValueError(f"update_every must be > 0 for dynamic (>= 0 for inherited), got {update_every!r}")
        if epochs_per_stage < 1:
            raise ValueError(f"epochs_per_stage must be >= 1, got {epochs_per_stage!r}")
        if not include:
            raise ValueError("include: need at least one regex selecting layers, e.g. 'encoder\\.layer'")
        self.schedule, self.patterns = schedule, [f"{n}:{m}" for n, m in self.nm]
        self.start_step, self.epochs_per_stage = start_step, epochs_per_stage
        self.update_every = 0 if schedule == "one_shot" else update_every
        self.include, self.exclude = list(include), list(exclude)
        self.restart_schedule, self.stage_dir = restart_schedule, stage_dir
        self.layers: dict[str, nn.Linear] = {}
        self.phase = Phase.DENSE
        # State saved in checkpoints (see state_dict); ``dense``: shadow weights of dynamic masks.
        self.stage, self.last_update_step, self.stage_results = 0, -1, []
        self.masks: dict[str, torch.Tensor] = {}
        self.dense: dict[str, torch.Tensor] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(schedule=self.schedule, patterns=self.patterns)

    @property
    def pattern(self) -> tuple[int, int]:
        return self.nm[self.stage]

    # ---------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.layers = select_linears(pl_module, self.include, self.exclude)
        if not self.layers:
            names = [n for n, mod in pl_module.named_modules() if isinstance(mod, nn.Linear)][:6]
            raise ValueError(f"include: no nn.Linear matches {self.include!r} (minus {self.exclude!r}); "
                             f"Linear layers are named like {names}")
        for name, layer in self.layers.items():
            for n, m in self.nm:
                check_nm(n, m, layer.in_features, field=f"patterns ({n}:{m}) for layer {name!r}")
        needed, max_epochs = len(self.nm) * self.epochs_per_stage, trainer.max_epochs
        if stage == "fit" and self.schedule == "inherited" and max_epochs is not None and 0 < max_epochs < needed:
            raise ValueError(f"trainer.max_epochs: {self.patterns} x {self.epochs_per_stage} epoch(s) per "
                             f"stage need max_epochs >= {needed}, got {max_epochs}")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule == "inherited" and self.restart_schedule:
            self._set_schedule(trainer, restart=False)
        if self.phase is Phase.MASKED:  # resumed: bring the saved state to the weights' device
            for name, layer in self.layers.items():
                self.masks[name] = self.masks[name].to(layer.weight.device)
                if name in self.dense:
                    self.dense[name] = self.dense[name].to(layer.weight.device)
            self._apply(recompute=False)

    # ---------------------------------------------------------------- steps
    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule != "inherited" or self.phase is Phase.DENSE:
            return
        stage = min(trainer.current_epoch // self.epochs_per_stage, len(self.nm) - 1)
        if stage != self.stage:
            self.stage = stage
            # Inherit: the new mask is taken from the previous stage's pruned weights, and the
            # dense shadow restarts from them too.
            self.dense = {}
            self._start_masks(trainer, pl_module)
            if self.restart_schedule:
                self._set_schedule(trainer, restart=True)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.phase is Phase.DENSE:
            if step >= self.start_step:
                if self.schedule == "inherited":
                    self.stage = min(trainer.current_epoch // self.epochs_per_stage, len(self.nm) - 1)
                self._start_masks(trainer, pl_module)
                self.phase = Phase.MASKED
            return
        if self.update_every and step - self.last_update_step >= self.update_every:
            flips = self._apply(recompute=True)
            self.last_update_step = step
            pl_module.log("nm/mask_flips", flips, on_step=True, on_epoch=False)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self.phase is not Phase.MASKED:
            return
        if self.dense:  # dynamic masks: the gradient was taken at the masked weights; step the shadow
            with torch.no_grad():
                for name, layer in self.layers.items():
                    layer.weight.copy_(self.dense[name])
        self.phase = Phase.STEPPED

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.phase is not Phase.STEPPED:
            return
        self.phase = Phase.MASKED
        with torch.no_grad():
            for name, layer in self.layers.items():
                if self.dense:
                    self.dense[name].copy_(layer.weight)
                layer.weight.mul_(self.masks[name].to(layer.weight.device))

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.phase is Phase.DENSE:
            return
        report = sparsity_report(self.layers)
        pl_module.log_dict({f"nm/sparsity/{name}": value for name, value in report.items()})
        pl_module.log("nm/sparsity", sum(report.values()) / len(report))
        last_epoch_of_stage = (trainer.current_epoch + 1) % self.epochs_per_stage == 0
        if self.schedule == "inherited" and last_epoch_of_stage and self.stage == trainer.current_epoch // self.epochs_per_stage:
            self._finish_stage(trainer, pl_module)

    # ---------------------------------------------------------------- masks
    def _start_masks(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n, m = self.pattern
        self.masks = {name: torch.ones_like(layer.weight, dtype=torch.bool) for name, layer in self.layers.items()}
        if self.update_every:
            self.dense = {name: layer.weight.detach().clone() for name, layer in self.layers.items()}
        self._apply(recompute=True)
        self.last_update_step = trainer.global_step
        rank_zero_info(f"[NMPruning] {self.schedule}: {n}:{m} on {len(self.layers)} Linear layers from step "
                       f"{trainer.global_step} (epoch {trainer.current_epoch})")

    def _apply(self, recompute: bool) -> float:
        """(Re)compute masks from the dense shadow (or the weights) and mask the weights.

        Returns the fraction of mask entries that changed.
        """
        n, m = self.pattern
        changed = total = 0
        with torch.no_grad():
            for name, layer in self.layers.items():
                source = self.dense.get(name, layer.weight)
                mask = self.masks[name].to(layer.weight.device)
                if recompute:
                    new = nm_mask(source, n, m)
                    changed += int((new != mask).sum())
                    total += new.numel()
                    mask = new
                self.masks[name] = mask
                layer.weight.copy_(source * mask)
        return changed / max(total, 1)

    def _set_schedule(self, trainer: Trainer, restart: bool) -> None:
        """Give run-length-aware schedules the length of one stage; restart them when asked."""
        max_epochs = trainer.max_epochs or 1
        per_epoch = int(trainer.estimated_stepping_batches) / max_epochs
        steps = max(1, math.ceil(per_epoch * self.epochs_per_stage))
        for config in trainer.lr_scheduler_configs:
            if plans_run_length(config.scheduler):
                config.scheduler.plan(steps, restart=restart)

    def _finish_stage(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n, m = self.pattern
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        for key, value in metrics.items():
            pl_module.log(f"nm_{n}of{m}/{key}", value)
        directory = Path(self.stage_dir or getattr(trainer.checkpoint_callback, "dirpath", None)
                         or Path(trainer.default_root_dir) / "checkpoints")
        path = directory / f"nm-stage{self.stage}-{n}of{m}.ckpt"
        result = {"stage": self.stage, "pattern": f"{n}:{m}", "epoch": trainer.current_epoch,
                  "step": trainer.global_step, "checkpoint": str(path), **metrics}
        self.stage_results = [r for r in self.stage_results if r["stage"] != self.stage] + [result]
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            (directory / "nm_stages.json").write_text(json.dumps(self.stage_results, indent=2))
        rank_zero_info(f"[NMPruning] stage {self.stage} ({n}:{m}) done: {metrics} -> {path}")

    # ---------------------------------------------------------------- checkpoint state
    @override
    def state_dict(self) -> dict:
        return {"stage": self.stage, "masks": {k: v.cpu() for k, v in self.masks.items()},
                "dense": {k: v.cpu() for k, v in self.dense.items()},
                "last_update_step": self.last_update_step, "stage_results": list(self.stage_results)}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.stage, self.last_update_step = state_dict["stage"], state_dict["last_update_step"]
        self.masks, self.dense = dict(state_dict["masks"]), dict(state_dict["dense"])
        self.stage_results = list(state_dict["stage_results"])
        self.phase = Phase.MASKED if self.masks else Phase.DENSE
