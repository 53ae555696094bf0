"""Stop cleanly on SIGINT / SIGTERM: a checkpoint at the current step, then a non-zero exit.

A cluster scheduler sends SIGTERM before it kills a job; a user presses Ctrl-C. Either way the
work since the last checkpoint should not be lost. :class:`SignalCheckpoint` replaces the
handlers of both signals while ``fit`` runs. The first signal only records itself: the current
optimizer step finishes, a checkpoint of that step is written (``last.ckpt`` in the checkpoint
folder, so resuming is the usual ``--ckpt_path .../last.ckpt``) and :class:`StopRequested` ends
the run; ``python -m lit`` prints the checkpoint and the resume command and exits with
128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second signal exits at once (and
takes the processes this one launched with it).

Under DDP the signal often reaches rank 0 only (the process the scheduler or the terminal
knows), yet every rank must stop after the same step: a rank that leaves the loop alone leaves
the others waiting in a collective forever. So the ranks agree at the end of every step (one
all-reduce of the received signal's number, 0 for none, only when several processes run); all
stop for the same signal, write their part of the checkpoint and exit with the same code. The
number is a CPU tensor reduced over a gloo group beside the training one, so under NCCL the
check never waits for the GPU (an NCCL tensor would need a host sync every step).

Lightning's own SIGTERM path is switched off for the run. Lightning installs its handler after
``on_fit_start``, composed of its notifier and the handler it finds (ours, called second). Under
DDP that notifier broadcasts a tensor from inside the signal handler; the broadcast pairs with
whatever collective the other ranks are in at that moment (this callback's all-reduce, the next
gradient all-reduce), so rank 0 hangs in the handler and ours never runs. Where it does return,
rank 0 alone raises Lightning's ``SIGTERMException`` at the end of the step, without a checkpoint,
and the other ranks wait. So SignalCheckpoint replaces the notifier with a no-op on the trainer's
signal connector while ``fit`` runs: the first SIGTERM only records itself here, and
``trainer.received_sigterm`` stays false.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
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


def _lightning_notifier_off(signum, frame) -> None:
    """Stands in for Lightning's SIGTERM notifier while SignalCheckpoint handles the signal."""


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
        self._group = None  # the gloo group of the per-step flag (several processes only)
        self._trainer: Trainer | None = None

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # the second signal: no more waiting
            sys.stderr.write(f"\n[lit] second {signal.Signals(signum).name}: exiting now, "
                             "without a checkpoint\n")
            sys.stderr.flush()
            self._kill_launched()
            os._exit(128 + signum)
        self.received = signum
        sys.stderr.write(f"\n[lit] {signal.Signals(signum).name} received: saving a checkpoint "
                         "after the current step (send it again to exit at once)\n")
        sys.stderr.flush()

    def _kill_launched(self) -> None:
        """The other ranks this process started (DDP's launcher) go with it, none left waiting."""
        launcher = getattr(getattr(self._trainer, "strategy", None), "launcher", None)
        if launcher is not None and getattr(launcher, "procs", None):
            try:
                launcher.kill(signal.SIGKILL)
            except Exception:  # noqa: BLE001 - exiting anyway
                pass

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.received = None
        self._trainer = trainer
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        # Lightning registers its SIGTERM handler after this hook, composed of its notifier and
        # the handler it finds (ours); without the notifier, only ours acts on the signal.
        connector = getattr(trainer, "_signal_connector", None)
        if signal.SIGTERM in self.signals and hasattr(connector, "_sigterm_notifier_fn"):
            connector._sigterm_notifier_fn = _lightning_notifier_off
        if trainer is not None and trainer.world_size > 1 and dist.is_available() \
                and dist.is_initialized() and self._group is None:  # collective: on every rank
            self._group = (dist.group.WORLD if dist.get_backend() == "gloo"
                           else dist.new_group(backend="gloo"))

    def _restore(self, trainer: Trainer) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None:
            if connector.__dict__.get("_sigterm_notifier_fn") is _lightning_notifier_off:
                del connector._sigterm_notifier_fn  # Lightning's own again
            # Lightning's teardown, after this on an exception, puts back what it found when it
            # registered (our handler): make that the handlers from before fit.
            originals = getattr(connector, "_original_handlers", None)
            if isinstance(originals, dict):
                originals.update({sig: h for sig, h in self._previous.items() if sig in originals})
        self._previous = {}
        self._group = None
        self._trainer = None

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore(trainer)

    def _agreed_signal(self, trainer: Trainer) -> int | None:
        """The signal every rank stops for (the largest number any rank received), or None."""
        if self._group is None:  # a strategy without torch.distributed
            stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
            return (self.received or int(signal.SIGTERM)) if stop else None
        flag = torch.tensor([self.received or 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item()) or None

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        connector = trainer._signal_connector
        if connector.received_sigterm and self.received is None:
            # Lightning's own handler ran after all (a signal before this callback's fit start):
            # the stop is ours to agree on, not a SIGTERMException on this rank alone.
            self.received = int(signal.SIGTERM)
        connector.received_sigterm = False
        signum = self._agreed_signal(trainer) if trainer.world_size > 1 else self.received
        if signum is None:
            return
        path = checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"[lit] {signal.Signals(signum).name}: checkpoint of step "
                       f"{trainer.global_step} (epoch {trainer.current_epoch}, batch "
                       f"{batch_idx + 1}) saved to {path}")
        raise StopRequested(signum, str(path))
