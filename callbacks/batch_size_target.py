"""Stop a run at its target metric, or early when its cost passes a limit (Zeus, NSDI'23 §4.3).

The batch-size wrapper (``python -m lit.batch_size run``) injects this callback into every run
it launches. It ends the run at the first validation whose ``monitor`` reaches ``target``
(time-to-accuracy), or as soon as the run's cost exceeds ``cost_limit`` (the wrapper passes
beta x the best cost seen so far: such a run is recorded as not converged, whatever it would
have reached), and writes the outcome to ``result_path`` as JSON, atomically (a temporary file
renamed over the target), so a reader sees the whole result or none.

Cost is :func:`lit.energy.cost.run_cost` of the training wall time since ``on_train_start``
(validation included, as in Zeus; process start-up and the final test excluded) and, on a CUDA
device, of the GPU energy over the same span from NVML's energy counter
(:class:`lit.energy.meter.EnergyMeter`, the same measurement as :class:`callbacks.EnergyMonitor`).
The counter is read (with a device sync) only at validation ends and when the run stops; the
per-step check against ``cost_limit`` extrapolates energy at the last measured average power.
MaxPower defaults to the GPU's highest power limit times the number of processes, and in a
multi-process run the energy is the sum of every process's GPU
(:func:`lit.energy.aggregate.reduce_over_ranks`: every process reads at the same points, the
validation ends and the end of training, so the collective lines up). Off CUDA (or with
``measure_energy: false``) the cost is seconds.

States (``self.state``): ``"running"`` -> ``"reached"`` (target met at a validation) |
``"stopped"`` (cost passed ``cost_limit``; checked after every training batch, or with several
processes at every validation, where they decide together) |
``"not_reached"`` (training ended without either: the epoch budget ran out).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit.energy.aggregate import reduce_over_ranks
from lit.energy.cost import check_eta, run_cost
from lit.energy.meter import EnergyMeter, Reading, open_device
from lit.energy.nvml import NVML


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` so that readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def met(value: float, target: float, mode: str) -> bool:
    """Whether ``value`` meets ``target`` (``mode="max"``: >=, ``"min"``: <=)."""
    return value >= target if mode == "max" else value <= target


class BatchSizeTarget(Callback):
    """Time-to-target stopping with Zeus's cost-based early stop and an atomic result file.

    Args:
        monitor: the logged validation metric, e.g. ``"val/acc"``.
        target: the value to reach.
        mode: ``"max"`` (reached when ``monitor >= target``) or ``"min"`` (``<=``).
        result_path: where to write the result JSON at the end of training (``None``: nowhere).
        cost_limit: stop once the cost exceeds this (``None``: never); same unit as the cost.
        eta: Zeus's energy/time weight in [0, 1] (used only when energy is measured).
        max_power_w: ``MaxPower`` in W (default: the GPU's highest power limit x processes).
        measure_energy: measure GPU energy on a CUDA device (``false``: time only everywhere).
    """

    def __init__(self, monitor: str = "val/acc", target: float = 0.85,
                 mode: Literal["max", "min"] = "max", result_path: str | None = None,
                 cost_limit: float | None = None, eta: float = 0.5,
                 max_power_w: float | None = None, measure_energy: bool = True) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if not math.isfinite(target):
            raise ValueError(f"target must be a finite number, got {target!r}")
        if cost_limit is not None and not cost_limit > 0:
            raise ValueError(f"cost_limit must be > 0 or null, got {cost_limit!r}")
        if max_power_w is not None and not max_power_w > 0:
            raise ValueError(f"max_power_w must be > 0 W or null, got {max_power_w!r}")
        self.monitor, self.target, self.mode = monitor, float(target), mode
        self.result_path, self.cost_limit = result_path, cost_limit
        self.eta, self.max_power_w = check_eta(eta, "eta"), max_power_w
        self.measure_energy = measure_energy
        # The GPU interface; None opens the real one on a CUDA run. Set it before fit to
        # measure through another implementation (lit.energy.fake.FakeNVML).
        self.nvml: NVML | None = None
        self._meter: EnergyMeter | None = None
        self._e0: Reading | None = None
        self._power_w = 0.0  # average power at the last counter reading
        self._max_power_w = max_power_w
        self.state = "running"
        self.metric: float | None = None
        self._start: float | None = None
        self._time_s = 0.0
        self._energy_j: float | None = None

    # -- measurement -------------------------------------------------------------------------
    def energy_j(self, trainer: Trainer, exact: bool = True) -> float | None:
        """GPU energy since training started (all processes), or ``None`` when not measured.
        ``exact=False`` extrapolates at the last measured power instead of reading (no sync).
        ``exact=True`` is a collective in a multi-process run: every process calls it together."""
        if self._meter is None or self._e0 is None or self._start is None:
            return None
        if not exact:
            return self._power_w * (time.perf_counter() - self._start)
        m = self._meter.since(self._e0)
        elapsed = time.perf_counter() - self._start
        energy, _, _ = reduce_over_ranks(trainer.strategy, m.energy_j, elapsed, 0)
        self._power_w = energy / elapsed if elapsed > 0 else 0.0
        return energy

    def cost(self, trainer: Trainer) -> float:
        """The run's cost so far (joules with energy and ``max_power_w``, else seconds); fixed
        once the run has reached its target or been stopped."""
        return self._cost(trainer, exact=True)

    def _cost(self, trainer: Trainer, exact: bool) -> float:
        if self._start is None:
            time_s, energy_j = self._time_s, self._energy_j
        else:
            energy_j = self.energy_j(trainer, exact)
            time_s = time.perf_counter() - self._start
        if energy_j is None or self._max_power_w is None:
            return run_cost(None, time_s)
        return run_cost(energy_j, time_s, self.eta, self._max_power_w)

    def _freeze(self, trainer: Trainer) -> None:
        """End the measurement: the cost is taken when the run meets its target or is stopped,
        not after the checkpoint and teardown that follow."""
        if self._start is not None:
            self._energy_j = self.energy_j(trainer)
            self._time_s = time.perf_counter() - self._start
            self._start = None

    # -- hooks -------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.state, self.metric, self._energy_j, self._meter = "running", None, None, None
        if self.measure_energy and (pl_module.device.type == "cuda" or self.nvml is not None):
            opened = open_device(pl_module.device, self.nvml, "BatchSizeTarget", rank_zero_info)
            if opened is not None:
                nvml, index, sync = opened
                self._meter = EnergyMeter(nvml, [index], sync)
                if self.max_power_w is None:
                    self._max_power_w = nvml.power_limit_range(index)[1] * trainer.world_size
        self._e0 = self._meter.read() if self._meter is not None else None
        self._power_w = 0.0
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.world_size == 1:  # several processes decide together, at validation ends
            self._check_cost(trainer)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.state != "running" or self._start is None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ValueError(f"BatchSizeTarget: monitor {self.monitor!r} was not logged in "
                             f"validation; logged: {sorted(trainer.callback_metrics)}")
        self.metric = float(value)
        # every process must stop at the same step: take the decision together
        if trainer.strategy.reduce_boolean_decision(met(self.metric, self.target, self.mode),
                                                    all=False):
            self._freeze(trainer)
            self.state = "reached"
            trainer.should_stop = True
            rank_zero_info(f"[lit] target {self.monitor} {'>=' if self.mode == 'max' else '<='} "
                           f"{self.target} reached ({self.metric:.4f}) after {self._time_s:.1f} s")
        else:
            self._check_cost(trainer, exact=True)

    def _check_cost(self, trainer: Trainer, exact: bool = False) -> None:
        if self.state != "running" or self.cost_limit is None or self._start is None:
            return
        cost = self._cost(trainer, exact=exact)
        if trainer.strategy.reduce_boolean_decision(cost > self.cost_limit, all=False):
            self._freeze(trainer)
            self.state = "stopped"
            trainer.should_stop = True
            rank_zero_info(f"[lit] cost {cost:.1f} passed the limit {self.cost_limit:.1f}: "
                           "stopping early (not converged)")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._freeze(trainer)
        if self.state == "running":
            self.state = "not_reached"
        if self.result_path is None or not trainer.is_global_zero:
            return
        energy = self._energy_j
        batches = trainer.num_training_batches
        epochs = trainer.global_step / batches if batches and math.isfinite(batches) else None
        write_json_atomic(self.result_path, {
            "status": self.state,
            "reached": self.state == "reached",
            "cost": self.cost(trainer),
            "cost_unit": "s" if energy is None or self._max_power_w is None else "J",
            "time_s": self._time_s,
            "energy_j": energy,
            "max_power_w": self._max_power_w if energy is not None else None,
            "eta": self.eta,
            "epochs": epochs,
            "steps": trainer.global_step,
            "metric": self.metric,
            "monitor": self.monitor,
            "target": self.target,
        })
