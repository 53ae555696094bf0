"""Zeus's power-limit optimizer (You, Chung, Chowdhury, NSDI'23; reference: ml-energy/zeus,
``GlobalPowerLimitOptimizer``): profile candidate GPU power limits just in time during the first
epoch, then train at the one with the lowest cost

    Cost = eta * Energy + (1 - eta) * MaxPower * Time        (per training sample)

where MaxPower is the highest power limit times the number of GPUs: eta = 1 minimises energy,
eta = 0 time. :func:`zeus_cost`, :func:`candidate_limits` and :func:`choose_power_limit` are the
pure parts; :class:`PowerLimitOptimizer` is the state machine, usable from any training loop
(``on_epoch_begin`` / ``on_step_begin`` / ``on_step_end(samples)`` / ``interrupt`` /
``restore``); :class:`callbacks.ZeusCallback` is its Lightning adapter.

Where the paper and the reference leave room, this module decides:

* Candidates run from the maximum down in ``pl_step_watts`` steps and always end at the minimum
  (the reference's ``range`` can step below the minimum when the range is not a multiple).
* Cost is per sample (energy and time divided by the samples of the window), so a short last
  batch in a window does not bias the choice; ties go to the higher limit (it is faster).
* A window (warm-up or profiling) cut by the epoch's end or by a validation run is discarded,
  the GPU returns to the maximum limit, and the same limit is profiled again from its warm-up at
  the next training step: the profile resumes where it stopped.
* With several GPUs each process measures its own; energy is summed and time maxed over
  processes (``aggregate``), process 0's choice is broadcast (``broadcast``) and every process
  sets its own GPU.
* ``observe`` mode never sets a limit: it profiles only the limit in force and, given a saved
  profile, recommends that profile's optimum. ``apply`` without permission warns once and falls
  back to ``observe``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

from lit.energy import EnergyMeter, Reading
from lit.nvml import NVML

Mode = Literal["apply", "observe"]


def zeus_cost(energy_j: float, time_s: float, eta_knob: float, max_power_w: float) -> float:
    """Zeus's cost: ``eta * energy + (1 - eta) * max_power * time`` (J)."""
    return eta_knob * energy_j + (1.0 - eta_knob) * max_power_w * time_s


def candidate_limits(lo: int, hi: int, step: int) -> list[int]:
    """Power limits to profile: ``hi, hi - step, ...`` down to and including ``lo``."""
    if step <= 0:
        raise ValueError(f"pl_step_watts must be > 0, got {step!r}")
    if lo > hi:
        raise ValueError(f"power-limit range is empty: min {lo!r} W > max {hi!r} W")
    limits = list(range(hi, lo - 1, -step))
    if limits[-1] != lo:
        limits.append(lo)
    return limits


@dataclass(frozen=True)
class LimitMeasurement:
    """One profiled limit: energy (J, all GPUs), time (s, slowest GPU) and samples of its window."""

    power_limit: int
    energy_j: float
    time_s: float
    samples: int

    @property
    def energy_per_sample(self) -> float:
        return self.energy_j / self.samples

    @property
    def time_per_sample(self) -> float:
        return self.time_s / self.samples


def choose_power_limit(measurements: list[LimitMeasurement], eta_knob: float,
                       max_power_w: float) -> int:
    """The limit with the lowest per-sample Zeus cost; ties (within a relative 1e-9, i.e. equal up
    to rounding) go to the higher limit."""
    if not measurements:
        raise ValueError("choose_power_limit needs at least one measurement")
    costs = {m.power_limit: zeus_cost(m.energy_per_sample, m.time_per_sample, eta_knob, max_power_w)
             for m in measurements}
    lowest = min(costs.values())
    return max(limit for limit, cost in costs.items() if cost <= lowest + 1e-9 * abs(lowest))


def check_settings(eta_knob: float, warmup_steps: int, profile_steps: int, pl_step_watts: int,
                   mode: str, reprofile_every_n_epochs: int | None) -> None:
    """Reject bad optimizer settings with a message naming the field."""
    if not 0.0 <= eta_knob <= 1.0:
        raise ValueError(f"eta_knob must be in [0, 1] (1: energy only, 0: time only), got {eta_knob!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
    if profile_steps <= 0:
        raise ValueError(f"profile_steps must be > 0, got {profile_steps!r}")
    if pl_step_watts <= 0:
        raise ValueError(f"pl_step_watts must be > 0 (e.g. 25), got {pl_step_watts!r}")
    if mode not in ("apply", "observe"):
        raise ValueError(f"mode must be 'apply' or 'observe', got {mode!r}")
    if reprofile_every_n_epochs is not None and reprofile_every_n_epochs < 1:
        raise ValueError(f"reprofile_every_n_epochs must be >= 1 or null, got {reprofile_every_n_epochs!r}")


# ------------------------------------------------------------------------------- the states

@dataclass
class Ready:
    """About to profile ``next_limit``. Initial state without a saved profile.

    -> ``Warmup(next_limit)`` at the next step's begin (the limit is set then);
    -> ``Profiling`` directly when ``warmup_steps`` is 0.
    """

    next_limit: int


@dataclass
class Warmup:
    """Running ``warmup_steps`` steps at ``limit`` before measuring.

    -> ``Profiling(limit)`` at the end of the last warm-up step;
    -> ``Ready(limit)`` when the epoch ends or validation starts first (back to the maximum).
    """

    limit: int
    steps_left: int


@dataclass
class Profiling:
    """Measuring ``profile_steps`` steps at ``limit`` since ``start``.

    -> ``Warmup(next limit)`` at the end of the last profiling step, if candidates remain;
    -> ``Done(optimum)`` at the end of the last profiling step of the last candidate;
    -> ``Ready(limit)`` when the epoch ends or validation starts first (window discarded).
    """

    limit: int
    steps_left: int
    start: Reading
    samples: int = 0


@dataclass
class Done:
    """Training at ``limit`` (the optimum, or in ``observe`` mode the recommendation).
    Initial state with a saved profile. The limit is re-applied at each epoch's begin.

    -> ``Ready(max limit)`` at an epoch's begin when re-profiling is due.
    """

    limit: int


State = Ready | Warmup | Profiling | Done


class PowerLimitOptimizer:
    """Just-in-time power-limit profiling and selection for one process's GPU.

    Args:
        nvml: the GPU interface (:class:`lit.nvml.PynvmlNVML` or a fake).
        device: this process's device index in ``nvml``.
        eta_knob, warmup_steps, profile_steps, pl_step_watts, mode, profile_path,
            reprofile_every_n_epochs: see :class:`callbacks.ZeusCallback`.
        world_size: number of GPUs in the job (MaxPower = max limit x world_size).
        sync: waits for the device's queued work (``torch.cuda.synchronize``) before a reading.
        aggregate: ``(energy_j, time_s, samples) -> (sum of energies, max of times, sum of
            samples)`` over processes; identity by default.
        broadcast: process 0's value to every process; identity by default.
        is_main: whether this process writes the profile file.
        info, warn: where messages go.
    """

    def __init__(self, nvml: NVML, device: int, *, eta_knob: float = 0.5, warmup_steps: int = 10,
                 profile_steps: int = 40, pl_step_watts: int = 25, mode: Mode = "apply",
                 profile_path: str | Path | None = None, reprofile_every_n_epochs: int | None = None,
                 world_size: int = 1, sync: Callable[[], None] | None = None,
                 aggregate: Callable[[float, float, int], tuple[float, float, int]] | None = None,
                 broadcast: Callable[[int], int] | None = None, is_main: bool = True,
                 info: Callable[[str], None] = print,
                 warn: Callable[[str], None] = warnings.warn) -> None:
        check_settings(eta_knob, warmup_steps, profile_steps, pl_step_watts, mode,
                       reprofile_every_n_epochs)
        self.nvml, self.device = nvml, device
        self.eta_knob, self.warmup_steps, self.profile_steps = eta_knob, warmup_steps, profile_steps
        self.mode: Mode = mode
        self.profile_path = None if profile_path is None else Path(profile_path)
        self.reprofile_every_n_epochs = reprofile_every_n_epochs
        self.meter = EnergyMeter(nvml, [device], sync)
        self.aggregate = aggregate or (lambda e, t, n: (e, t, n))
        self.broadcast = broadcast or (lambda x: x)
        self.is_main, self.info, self.warn = is_main, info, warn

        self.min_limit, self.max_limit = nvml.power_limit_range(device)
        self.original_limit = nvml.power_limit(device)
        self.max_power_w = float(self.max_limit * world_size)
        self.candidates = (candidate_limits(self.min_limit, self.max_limit, pl_step_watts)
                           if mode == "apply" else [self.original_limit])
        self.measurements: list[LimitMeasurement] = []
        self.closed = False  # after restore(): no more sets
        self.state: State = Ready(self.candidates[0])
        if self.profile_path is not None and self.profile_path.is_file():
            self._load_profile()

    # ---------------------------------------------------------------------------- hooks

    def on_epoch_begin(self, epoch: int) -> None:
        if not isinstance(self.state, Done):
            return
        n = self.reprofile_every_n_epochs
        if n is not None and epoch > 0 and epoch % n == 0 and self.mode == "apply":
            self.info(f"[zeus] epoch {epoch}: re-profiling power limits")
            self.measurements = []
            self.state = Ready(self.candidates[0])
        else:
            self._set(self.state.limit)

    def on_step_begin(self) -> None:
        if isinstance(self.state, Ready):
            limit = self.state.next_limit
            if not self._set(limit):
                return
            self._enter_warmup(limit)

    def on_step_end(self, samples: int) -> None:
        state = self.state
        if isinstance(state, Warmup):
            state.steps_left -= 1
            if state.steps_left <= 0:
                self.state = Profiling(state.limit, self.profile_steps, self.meter.read())
        elif isinstance(state, Profiling):
            state.samples += samples
            state.steps_left -= 1
            if state.steps_left <= 0:
                self._record(state)

    def interrupt(self) -> None:
        """The epoch ended (or validation started): discard an open window."""
        if isinstance(self.state, (Warmup, Profiling)):
            limit = self.state.limit
            self.info(f"[zeus] {type(self.state).__name__.lower()} at {limit} W cut by the epoch's "
                      "end: resuming there next epoch")
            self.state = Ready(limit)
            self._set(self.max_limit)

    def restore(self) -> None:
        """Put the original limit back (idempotent; no sets afterwards)."""
        if self.closed:
            return
        self.closed = True
        if self.mode == "apply" and self.nvml.power_limit(self.device) != self.original_limit:
            try:
                self.nvml.set_power_limit(self.device, self.original_limit)
            except Exception as err:  # restoring runs in error paths: never mask the first error
                self.warn(f"[zeus] could not restore the power limit to {self.original_limit} W: {err}")

    @property
    def chosen(self) -> int | None:
        return self.state.limit if isinstance(self.state, Done) else None

    # ---------------------------------------------------------------------------- internals

    def _enter_warmup(self, limit: int) -> None:
        if self.warmup_steps == 0:
            self.state = Profiling(limit, self.profile_steps, self.meter.read())
        else:
            self.state = Warmup(limit, self.warmup_steps)

    def _record(self, state: Profiling) -> None:
        m = self.meter.since(state.start)
        energy, time_s, samples = self.aggregate(m.energy_j, m.time_s, state.samples)
        self.measurements.append(LimitMeasurement(state.limit, float(energy), float(time_s), int(samples)))
        i = self.candidates.index(state.limit)
        if i + 1 < len(self.candidates):
            nxt = self.candidates[i + 1]
            if self._set(nxt):
                self._enter_warmup(nxt)
            return
        self._finish()

    def _finish(self) -> None:
        limit = int(self.broadcast(choose_power_limit(self.measurements, self.eta_knob, self.max_power_w)))
        self.state = Done(limit)
        verb = "training at" if self.mode == "apply" else "recommended (not applied, observe mode):"
        self.info(f"[zeus] {verb} {limit} W\n{self.table()}")
        self._set(limit)
        if self.is_main and self.profile_path is not None:
            self._save_profile()

    def _set(self, watts: int) -> bool:
        """Set this GPU's limit in apply mode; False when permission is missing (now observing)."""
        if self.mode != "apply" or self.closed or self.nvml.power_limit(self.device) == watts:
            return True
        try:
            self.nvml.set_power_limit(self.device, watts)
        except PermissionError as err:
            self.warn(f"[zeus] cannot set power limits ({err}); observing instead: the limit stays at "
                      f"{self.original_limit} W and only it is profiled")
            self.mode = "observe"
            self.candidates = [self.original_limit]
            self.measurements = []
            self.state = Ready(self.original_limit)
            return False
        return True

    def table(self) -> str:
        rows = ["limit W | J/sample | ms/sample | cost/sample"]
        for m in self.measurements:
            cost = zeus_cost(m.energy_per_sample, m.time_per_sample, self.eta_knob, self.max_power_w)
            rows.append(f"{m.power_limit:7d} | {m.energy_per_sample:8.4f} | "
                        f"{1e3 * m.time_per_sample:9.4f} | {cost:.4f}")
        return "\n".join(rows)

    def _save_profile(self) -> None:
        assert self.profile_path is not None
        self.profile_path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": "lit.power_limit/1", "mode": self.mode, "eta_knob": self.eta_knob,
               "limit_range": [self.min_limit, self.max_limit], "max_power_w": self.max_power_w,
               "measurements": [asdict(m) for m in self.measurements]}
        self.profile_path.write_text(json.dumps(doc, indent=1))

    def _load_profile(self) -> None:
        path = self.profile_path
        assert path is not None
        try:
            doc = json.loads(path.read_text())
            measurements = [LimitMeasurement(int(m["power_limit"]), float(m["energy_j"]),
                                             float(m["time_s"]), int(m["samples"]))
                            for m in doc["measurements"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"profile_path {str(path)!r} is not a power-limit profile ({err}); "
                             "delete it to profile again") from err
        if self.mode == "apply" and doc.get("mode") == "observe":
            self.info(f"[zeus] {path} was recorded in observe mode (one limit): profiling again")
            return
        for m in measurements:
            if not self.min_limit <= m.power_limit <= self.max_limit:
                raise ValueError(f"profile_path {str(path)!r}: limit {m.power_limit!r} W is outside this "
                                 f"GPU's range [{self.min_limit}, {self.max_limit}]; delete it to profile again")
        if not measurements:
            raise ValueError(f"profile_path {str(path)!r} holds no measurements; delete it to profile again")
        self.measurements = measurements
        limit = choose_power_limit(measurements, self.eta_knob, self.max_power_w)
        self.state = Done(limit)
        self.info(f"[zeus] reusing the profile in {path}: {limit} W\n{self.table()}")
