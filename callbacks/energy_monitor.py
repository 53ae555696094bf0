"""GPU energy of training, per epoch and every N steps, from NVML's energy counter.

The measurement Zeus (You, Chung, Chowdhury, NSDI'23) builds on (:mod:`lit.energy.meter`): the
device is synchronised and NVML read only at window boundaries (every ``log_every_n_steps``
steps, at validation's start and end, at the epoch's end), never per step. Validation inside an
epoch is left out, so the figures are per *training* sample. Where the counter is missing or a
window is shorter than its update period, energy is average power x time. Over the processes
of a distributed run energy and samples are summed, time maxed
(:func:`lit.energy.aggregate.reduce_over_ranks`).
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override

from lit.energy.aggregate import reduce_over_ranks
from lit.energy.meter import EnergyMeter, Reading, energy_between, open_device
from lit.energy.nvml import NVML


class _Totals:
    """Energy (J, this process's GPU), time (s) and samples of the training parts of a window."""

    def __init__(self) -> None:
        self.energy_j = 0.0
        self.time_s = 0.0
        self.samples = 0


class EnergyMonitor(Callback):
    """Log GPU energy, average power and J per sample of training.

    Logged (summed over GPUs; time is the slowest process's):
    ``energy/epoch_J``, ``energy/epoch_J_per_sample``, ``energy/epoch_power_W``,
    ``energy/epoch_time_s`` at each epoch's end, and ``energy/J_per_sample``, ``energy/power_W``
    every ``log_every_n_steps`` training steps. ``history`` keeps every logged row.
    Without a CUDA device (or NVML) it says so once and does nothing.

    Args:
        log_every_n_steps: also log every this many steps (``null``: per epoch only). Each such
            point costs one device synchronisation.
    """

    def __init__(self, log_every_n_steps: int | None = 50) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1 or null, got {log_every_n_steps!r}")
        self.log_every_n_steps = log_every_n_steps
        # The GPU interface; None opens the real one on a CUDA run. Set it before fit to
        # measure through another implementation (lit.energy.fake.FakeNVML, callbacks.SimulatedGPU).
        self.nvml: NVML | None = None
        self.history: list[dict[str, float]] = []
        self._meter: EnergyMeter | None = None
        self._mark: Reading | None = None  # last boundary inside a training segment
        self._epoch = _Totals()
        self._interval = _Totals()
        self._steps = 0
        self._paused = False  # inside a validation run during an epoch

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        opened = open_device(pl_module.device, self.nvml, "EnergyMonitor", rank_zero_warn)
        self._meter = None if opened is None else EnergyMeter(opened[0], [opened[1]], opened[2])

    def _boundary(self) -> None:
        """Close the current training segment: add its energy and time to both windows."""
        assert self._meter is not None and self._mark is not None
        now = self._meter.read()
        m = energy_between(self._mark, now)
        for totals in (self._epoch, self._interval):
            totals.energy_j += m.energy_j
            totals.time_s += m.time_s
        self._mark = now

    def _emit(self, trainer: Trainer, totals: _Totals, prefix: str) -> None:
        # Every process reaches the same boundaries, so this collective lines up.
        energy, time_s, samples = reduce_over_ranks(trainer.strategy, totals.energy_j, totals.time_s,
                                                    totals.samples)
        row = {f"energy/{prefix}J_per_sample": energy / samples if samples else 0.0,
               f"energy/{prefix}power_W": energy / time_s if time_s > 0 else 0.0}
        if prefix:
            row.update({"energy/epoch_J": energy, "energy/epoch_time_s": time_s})
        self.history.append({"epoch": float(trainer.current_epoch), "step": float(trainer.global_step),
                             "samples": float(samples), **row})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(row, step=trainer.global_step)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._meter is None:
            return
        self._epoch, self._interval, self._steps = _Totals(), _Totals(), 0
        self._mark = self._meter.read()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._meter is None or self._mark is None:
            return
        n = extract_batch_size(batch)
        self._epoch.samples += n
        self._interval.samples += n
        self._steps += 1
        if self.log_every_n_steps and self._steps % self.log_every_n_steps == 0:
            self._boundary()
            self._emit(trainer, self._interval, "")
            self._interval = _Totals()

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._meter is not None and self._mark is not None and not trainer.sanity_checking:
            self._boundary()
            self._mark, self._paused = None, True  # validation is not training energy

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._meter is not None and self._paused:
            self._mark, self._paused = self._meter.read(), False

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._meter is None:
            return
        if self._mark is not None:
            self._boundary()
        self._emit(trainer, self._epoch, "epoch_")
        self._mark, self._paused = None, False
