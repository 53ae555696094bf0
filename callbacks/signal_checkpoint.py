"""Stop cleanly on SIGINT / SIGTERM: a checkpoint at the current step, then a non-zero exit.

A cluster scheduler sends SIGTERM before it kills a job; a user presses Ctrl-C. Either way the
work since the last checkpoint should not be lost. :class:`SignalCheckpoint` replaces the
handlers of both signals while ``fit`` runs. The first signal only records itself: the current
optimizer step finishes, a checkpoint of that step is written (``last.ckpt`` in the checkpoint
folder, so resuming is the usual ``--ckpt_path .../last.ckpt``) and :class:`StopRequested` ends
the run; ``python -m lit`` prints the checkpoint and the resume command and exits with
128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second signal exits at once.

Under DDP every rank stops at the same step: the ranks agree (one all-reduce of a flag per
step, only when several processes run) and all write their part of the checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class StopRequested(Exception):
    """Raised at a step boundary after a signal; carries the signal and the checkpoint path."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint: {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def checkpoint_path(trainer: Trainer) -> Path:
    """Where the stop checkpoint goes: ``last.ckpt`` in the checkpoint callback's folder, or in
    ``<log dir>/checkpoints`` when checkpointing is off."""
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None)
    if not folder:
        base = trainer.log_dir or trainer.default_root_dir
        folder = os.path.join(base, "checkpoints")
    return Path(folder) / "last.ckpt"


class SignalCheckpoint(Callback):
    """Checkpoint at the current step on SIGINT / SIGTERM and stop (see the module docstring).

    Args:
        signals: names of the signals to handle.
    """

    def __init__(self, signals: list[str] = ["SIGINT", "SIGTERM"]) -> None:  # noqa: B006
        for name in signals:
            if name not in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2"):
                raise ValueError(f"signals: {name!r} is not one of SIGINT, SIGTERM, SIGUSR1, SIGUSR2")
        self.signals = [signal.Signals[name] for name in signals]
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # the second signal: no more waiting
            sys.stderr.write(f"\n[lit] second {signal.Signals(signum).name}: exiting now, "
                             "without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.received = signum
        sys.stderr.write(f"\n[lit] {signal.Signals(signum).name} received: saving a checkpoint "
                         "after the current step (send it again to exit at once)\n")
        sys.stderr.flush()

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.received = None
        # Lightning registers its own SIGTERM handler before this hook; ours replaces it for the
        # duration of fit and the previous ones come back at the end.
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self.received if self.received is not None else int(signal.SIGTERM)
        path = checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"[lit] {signal.Signals(signum).name}: checkpoint of step "
                       f"{trainer.global_step} (epoch {trainer.current_epoch}, batch "
                       f"{batch_idx + 1}) saved to {path}")
        raise StopRequested(signum, str(path))
