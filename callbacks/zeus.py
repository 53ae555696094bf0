"""Zeus's GPU power-limit optimizer (You, Chung, Chowdhury, NSDI'23) as a Lightning callback.

The method, its state machine and the decisions where the paper is silent are in
:mod:`lit.energy.power_limit`; this file wires it to Lightning's hooks, to NVML
(:mod:`lit.energy.nvml`), to the processes of a distributed run
(:func:`lit.energy.aggregate.reduce_over_ranks`), to checkpoints (the profile's progress is
callback state) and to the ways a run can end (fit end, exception, SIGINT / SIGTERM,
interpreter exit), each of which puts the original limit back.
"""

from __future__ import annotations

import atexit
import os
import signal
from functools import partial
from types import FrameType
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override

from lit.energy.aggregate import reduce_over_ranks
from lit.energy.meter import open_device
from lit.energy.nvml import NVML
from lit.energy.power_limit import PowerLimitOptimizer, check_settings

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ZeusCallback(Callback):
    """Pick the GPU power limit that minimises ``eta * Energy + (1 - eta) * MaxPower * Time``,
    or the lowest one within a slowdown factor of the fastest.

    During the first epoch each candidate limit (maximum down to minimum in ``pl_step_watts``
    steps) runs ``warmup_steps`` steps, then ``profile_steps`` measured steps; the best one per
    sample is kept for the rest of training and re-applied at each epoch's start. Setting a
    limit needs root or ``CAP_SYS_ADMIN``; without it ``apply`` warns once and observes.
    The original limit comes back at fit end, on exceptions, on SIGINT / SIGTERM and at exit.
    Checkpoints hold the profile's progress: a resumed run profiles on from the next unmeasured
    limit, or trains on at the chosen one (a checkpoint of another limit range or candidate list
    is dropped with a warning and the profile starts again). Without a CUDA device (or NVML) it
    says so once and does nothing.

    Args:
        eta_knob: weight of energy against time in [0, 1] (1: energy only, 0: time only).
        max_slowdown: ``null``: choose by the ``eta_knob`` cost. A factor >= 1.0 (zeus's
            ``MaxSlowdownConstraint``, e.g. 1.1): choose the lowest limit whose time per sample is
            at most this times the fastest measured one; ``eta_knob`` is then unused.
        warmup_steps: steps at a new limit before measuring it.
        profile_steps: measured steps per limit.
        pl_step_watts: spacing of the candidate limits in W.
        mode: ``apply`` sets limits; ``observe`` never sets anything: it profiles the limit in
            force and recommends the optimum of a saved profile.
        profile_path: JSON profile. If the file exists its measurements are reused (no
            profiling); else the profile is written there when done, for the next run of the job.
        reprofile_every_n_epochs: profile again every this many epochs (``null``: never).
    """

    def __init__(self, eta_knob: float = 0.5, warmup_steps: int = 10, profile_steps: int = 40,
                 pl_step_watts: int = 25, mode: Literal["apply", "observe"] = "apply",
                 profile_path: str | None = None, reprofile_every_n_epochs: int | None = None,
                 max_slowdown: float | None = None) -> None:
        check_settings(eta_knob, warmup_steps, profile_steps, pl_step_watts, mode, reprofile_every_n_epochs,
                       max_slowdown)
        self.eta_knob = eta_knob
        self.max_slowdown = max_slowdown
        self.warmup_steps = warmup_steps
        self.profile_steps = profile_steps
        self.pl_step_watts = pl_step_watts
        self.mode = mode
        self.profile_path = profile_path
        self.reprofile_every_n_epochs = reprofile_every_n_epochs
        # The GPU interface; None opens the real one on a CUDA run. Set it before fit to run
        # against another implementation (lit.energy.fake.FakeNVML, callbacks.SimulatedGPU).
        self.nvml: NVML | None = None
        self.optimizer: PowerLimitOptimizer | None = None
        self._resume: dict[str, Any] | None = None  # checkpoint state, applied at fit start
        self._previous_handlers: dict[int, object] = {}
        self._trainer: Trainer | None = None

    # ------------------------------------------------------------------------- set-up

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        opened = open_device(pl_module.device, self.nvml, "ZeusCallback", rank_zero_warn)
        if opened is None:
            return
        nvml, device, sync = opened
        strategy = trainer.strategy
        self.optimizer = PowerLimitOptimizer(
            nvml, device, eta_knob=self.eta_knob, max_slowdown=self.max_slowdown,
            warmup_steps=self.warmup_steps, profile_steps=self.profile_steps,
            pl_step_watts=self.pl_step_watts, mode=self.mode, profile_path=self.profile_path,
            reprofile_every_n_epochs=self.reprofile_every_n_epochs, world_size=trainer.world_size,
            sync=sync, aggregate=partial(reduce_over_ranks, strategy),
            broadcast=lambda limit: strategy.broadcast(limit, src=0), is_main=trainer.is_global_zero,
            info=rank_zero_info, warn=rank_zero_warn)
        if self._resume is not None:  # Lightning loads callback state before on_fit_start
            self.optimizer.load_state_dict(self._resume)
            self._resume = None
        self._trainer = trainer
        self._install_signal_handlers()
        atexit.register(self._restore)

    def _install_signal_handlers(self) -> None:
        # Lightning composes its own SIGTERM handler with the one in place when fit starts its
        # loops, so ours runs inside Lightning's graceful stop as well as on its own.
        for signum in _SIGNALS:
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: rely on on_exception / atexit
                pass

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._restore()
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            trainer = self._trainer
            if signum == signal.SIGTERM and trainer is not None and trainer.state.status == TrainerStatus.RUNNING:
                return  # Lightning's handler noted it and stops the loop at the next batch end
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _restore(self) -> None:
        if self.optimizer is not None:
            self.optimizer.restore()

    def _uninstall(self) -> None:
        for signum, previous in self._previous_handlers.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous_handlers = {}
        atexit.unregister(self._restore)

    # ------------------------------------------------------------------------- checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is not None:
            return self.optimizer.state_dict()
        return dict(self._resume or {})  # a run that measured nothing passes the saved state on

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict) or None

    # ------------------------------------------------------------------------- training

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.optimizer is not None:
            self.optimizer.on_epoch_begin(trainer.current_epoch)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch,
                             batch_idx: int) -> None:
        if self.optimizer is not None:
            self.optimizer.on_step_begin()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.optimizer is not None:
            self.optimizer.on_step_end(extract_batch_size(batch))

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.optimizer is not None and not trainer.sanity_checking:
            self.optimizer.interrupt()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.optimizer is not None:
            self.optimizer.interrupt()
            for logger in trainer.loggers if trainer.is_global_zero else []:
                logger.log_metrics({"zeus/power_limit_W": float(self.optimizer.nvml.power_limit(
                    self.optimizer.device))}, step=trainer.global_step)

    # ------------------------------------------------------------------------- the end

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore()
            self._uninstall()
