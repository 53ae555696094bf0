"""Zeus's power-limit optimizer (You, Chung, Chowdhury, NSDI'23; reference: ml-energy/zeus,
``GlobalPowerLimitOptimizer``): profile candidate GPU power limits just in time during the first
epoch, then train at the best one. Best is either the lowest :func:`lit.energy.cost.zeus_cost`

    Cost = eta * Energy + (1 - eta) * MaxPower * Time        (per training sample)

(MaxPower: the highest limit times the number of GPUs; eta 1 minimises energy, 0 time), or,
with ``max_slowdown``, zeus's ``MaxSlowdownConstraint``: the lowest limit whose time per sample
is within ``max_slowdown`` x the fastest measured one. :func:`candidate_limits`,
:func:`choose_power_limit` and :func:`lowest_limit_within_slowdown` are the pure parts;
:class:`PowerLimitOptimizer` is the state machine, usable from any training loop
(``on_epoch_begin`` / ``on_step_begin`` / ``on_step_end(samples)`` / ``interrupt`` /
``restore``, ``state_dict`` / ``load_state_dict`` to resume); :class:`callbacks.ZeusCallback` is
its Lightning adapter.

Where the paper and the reference leave room, this module decides:

* Candidates run from the maximum down in ``pl_step_watts`` steps and always end at the minimum
  (the reference's ``range`` can step below the minimum when the range is not a multiple).
* Cost is per sample (energy and time divided by the samples of the window), so a short last
  batch in a window does not bias the choice; ties go to the higher limit (it is faster).
* The slowdown bound is relative to the fastest measured limit; the reference takes the time at
  the maximum limit, which noise can make slower than another one. Among the limits within the
  bound the lowest wins (the reference's rule).
* A window (warm-up or profiling) cut by the epoch's end or by a validation run is discarded,
  the GPU returns to the maximum limit, and the same limit is profiled again from its warm-up at
  the next training step: the profile resumes where it stopped.
* A saved state (a checkpoint) holds an open window as ``Ready(limit)``: a window cannot span a
  restart. Loaded under another limit range or candidate list, it is dropped with a warning and
  profiling starts again; loaded under another ``eta_knob`` or ``max_slowdown``, its measurements
  are kept and the choice is made by this run's rule (as with a reused profile file).
* With several GPUs each process measures its own; energy is summed and time maxed over
  processes (``aggregate``), process 0's choice is broadcast (``broadcast``) and every process
  sets its own GPU.
* ``observe`` mode never sets a limit: it profiles only the limit in force and, given a saved
  profile, recommends that profile's optimum. ``apply`` without permission warns once and falls
  back to ``observe``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from lit.energy.cost import check_eta, zeus_cost
from lit.energy.meter import EnergyMeter, Reading
from lit.energy.nvml import NVML

Mode = Literal["apply", "observe"]
STATE_FORMAT = "lit.energy.power_limit.state/1"


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


def lowest_limit_within_slowdown(measurements: list[LimitMeasurement], factor: float) -> int:
    """zeus's ``MaxSlowdownConstraint``: the lowest limit whose time per sample is at most
    ``factor`` x the fastest one measured (equal up to rounding, relative 1e-9, counts as within)."""
    if not measurements:
        raise ValueError("lowest_limit_within_slowdown needs at least one measurement")
    bound = factor * min(m.time_per_sample for m in measurements) * (1 + 1e-9)
    return min(m.power_limit for m in measurements if m.time_per_sample <= bound)


def choose_power_limit(measurements: list[LimitMeasurement], eta_knob: float, max_power_w: float,
                       max_slowdown: float | None = None) -> int:
    """The limit with the lowest per-sample Zeus cost; ties (within a relative 1e-9, i.e. equal up
    to rounding) go to the higher limit. With ``max_slowdown`` the rule is
    :func:`lowest_limit_within_slowdown` instead (``eta_knob`` is then unused)."""
    if not measurements:
        raise ValueError("choose_power_limit needs at least one measurement")
    if max_slowdown is not None:
        return lowest_limit_within_slowdown(measurements, max_slowdown)
    costs = {m.power_limit: zeus_cost(m.energy_per_sample, m.time_per_sample, eta_knob, max_power_w)
             for m in measurements}
    lowest = min(costs.values())
    return max(limit for limit, cost in costs.items() if cost <= lowest + 1e-9 * abs(lowest))


def check_settings(eta_knob: float, warmup_steps: int, profile_steps: int, pl_step_watts: int,
                   mode: str, reprofile_every_n_epochs: int | None,
                   max_slowdown: float | None = None) -> None:
    """Reject bad optimizer settings with a message naming the field."""
    check_eta(eta_knob)
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
    if max_slowdown is not None and not (math.isfinite(max_slowdown) and max_slowdown >= 1.0):
        raise ValueError(f"max_slowdown must be a factor >= 1.0 (1.1: at most 10% slower than the "
                         f"fastest limit) or null for the eta_knob cost, got {max_slowdown!r}")


# ------------------------------------------------------------------------------- the states

@dataclass
class Ready:
    """About to profile ``next_limit``. Initial state without a saved profile; the saved form
    of every unfinished profile.

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
        nvml: the GPU interface (:class:`lit.energy.nvml.PynvmlNVML` or a fake).
        device: this process's device index in ``nvml``.
        eta_knob, max_slowdown, warmup_steps, profile_steps, pl_step_watts, mode, profile_path,
            reprofile_every_n_epochs: see :class:`callbacks.ZeusCallback`.
        world_size: number of GPUs in the job (MaxPower = max limit x world_size).
        sync: waits for the device's queued work (``torch.cuda.synchronize``) before a reading.
        aggregate: ``(energy_j, time_s, samples) -> (sum of energies, max of times, sum of
            samples)`` over processes (:func:`lit.energy.aggregate.reduce_over_ranks`);
            identity by default.
        broadcast: process 0's value to every process; identity by default.
        is_main: whether this process writes the profile file.
        info, warn: where messages go.
    """

    def __init__(self, nvml: NVML, device: int, *, eta_knob: float = 0.5,
                 max_slowdown: float | None = None, warmup_steps: int = 10, profile_steps: int = 40,
                 pl_step_watts: int = 25, mode: Mode = "apply",
                 profile_path: str | Path | None = None, reprofile_every_n_epochs: int | None = None,
                 world_size: int = 1, sync: Callable[[], None] | None = None,
                 aggregate: Callable[[float, float, int], tuple[float, float, int]] | None = None,
                 broadcast: Callable[[int], int] | None = None, is_main: bool = True,
                 info: Callable[[str], None] = print,
                 warn: Callable[[str], None] = warnings.warn) -> None:
        check_settings(eta_knob, warmup_steps, profile_steps, pl_step_watts, mode,
                       reprofile_every_n_epochs, max_slowdown)
        self.nvml, self.device = nvml, device
        self.eta_knob, self.max_slowdown = eta_knob, max_slowdown
        self.warmup_steps, self.profile_steps = warmup_steps, profile_steps
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
        self.profile_epoch = 0  # the epoch whose begin started the current profile
        self.closed = False  # after restore(): no more sets
        self.state: State = Ready(self.candidates[0])
        if self.profile_path is not None and self.profile_path.is_file():
            self._load_profile()

    # ---------------------------------------------------------------------------- hooks

    def on_epoch_begin(self, epoch: int) -> None:
        if not isinstance(self.state, Done):
            return
        n = self.reprofile_every_n_epochs
        # A resumed run enters its epoch a second time: that epoch's profile is not started again.
        due = n is not None and epoch > 0 and epoch % n == 0 and epoch != self.profile_epoch
        if due and self.mode == "apply":
            self.info(f"[zeus] epoch {epoch}: re-profiling power limits")
            self.measurements, self.profile_epoch = [], epoch
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

    def choose(self) -> int:
        """This optimizer's rule (cost or max slowdown) applied to the measurements so far."""
        return choose_power_limit(self.measurements, self.eta_knob, self.max_power_w, self.max_slowdown)

    # ---------------------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        """The profile's progress as plain data (JSON-safe): an open window is saved as
        ``Ready(its limit)``, since a window cannot span a restart."""
        state = self.state
        if isinstance(state, Done):
            saved: dict[str, Any] = {"state": "Done", "limit": state.limit}
        else:
            limit = state.next_limit if isinstance(state, Ready) else state.limit
            saved = {"state": "Ready", "limit": limit}
        return {"format": STATE_FORMAT, "mode": self.mode, "limit_range": [self.min_limit, self.max_limit],
                "candidates": list(self.candidates), "eta_knob": self.eta_knob,
                "max_slowdown": self.max_slowdown, "profile_epoch": self.profile_epoch,
                "measurements": [asdict(m) for m in self.measurements], **saved}

    def load_state_dict(self, doc: dict[str, Any]) -> None:
        """Continue a saved profile: from its next unmeasured limit, or at its chosen limit
        (chosen again by this run's rule). A profile of another limit range or candidate list is
        dropped with a warning, and profiling starts again."""
        if doc.get("format") != STATE_FORMAT:
            raise ValueError(f"not a saved power-limit optimizer state (format {doc.get('format')!r}, "
                             f"expected {STATE_FORMAT!r})")
        ours = {"limit_range": [self.min_limit, self.max_limit], "candidates": list(self.candidates)}
        differ = [f"{key} {list(doc[key])!r} (now {value!r})" for key, value in ours.items()
                  if list(doc[key]) != value]
        if differ:
            self.warn(f"[zeus] the checkpoint's power-limit profile does not fit this run: "
                      f"{'; '.join(differ)}; profiling again from {self.candidates[0]} W")
            return
        measurements = [LimitMeasurement(int(m["power_limit"]), float(m["energy_j"]), float(m["time_s"]),
                                         int(m["samples"])) for m in doc["measurements"]]
        limit = int(doc["limit"])
        if limit not in self.candidates and doc["state"] != "Done":
            raise ValueError(f"saved power-limit state: limit {limit!r} W is not a candidate {self.candidates!r}")
        self.measurements, self.profile_epoch = measurements, int(doc["profile_epoch"])
        if doc["state"] == "Done":
            self.state = Done(self.choose() if measurements else limit)
            self.info(f"[zeus] resumed: training at {self.state.limit} W")
        else:
            self.state = Ready(limit)
            self.info(f"[zeus] resumed: {len(measurements)} limits measured, profiling on from {limit} W")

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
        limit = int(self.broadcast(self.choose()))
        self.state = Done(limit)
        verb = "training at" if self.mode == "apply" else "recommended (not applied, observe mode):"
        self.info(f"[zeus] {verb} {limit} W ({self._rule()})\n{self.table()}")
        self._set(limit)
        if self.is_main and self.profile_path is not None:
            self._save_profile()

    def _rule(self) -> str:
        if self.max_slowdown is not None:
            return f"lowest limit within {self.max_slowdown} x the fastest time"
        return f"lowest cost at eta_knob {self.eta_knob}"

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
        fastest = min((m.time_per_sample for m in self.measurements), default=0.0)
        rows = ["limit W | J/sample | ms/sample | x fastest | cost/sample"]
        for m in self.measurements:
            cost = zeus_cost(m.energy_per_sample, m.time_per_sample, self.eta_knob, self.max_power_w)
            rows.append(f"{m.power_limit:7d} | {m.energy_per_sample:8.4f} | {1e3 * m.time_per_sample:9.4f} | "
                        f"{m.time_per_sample / fastest if fastest else 0.0:9.4f} | {cost:.4f}")
        return "\n".join(rows)

    def _save_profile(self) -> None:
        assert self.profile_path is not None
        self.profile_path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": "lit.energy.power_limit/1", "mode": self.mode, "eta_knob": self.eta_knob,
               "max_slowdown": self.max_slowdown, "limit_range": [self.min_limit, self.max_limit],
               "max_power_w": self.max_power_w, "measurements": [asdict(m) for m in self.measurements]}
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
        limit = self.choose()
        self.state = Done(limit)
        self.info(f"[zeus] reusing the profile in {path}: {limit} W ({self._rule()})\n{self.table()}")
