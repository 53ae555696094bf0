"""A simulated GPU behind the :class:`lit.energy.nvml.NVML` interface; nothing touches hardware.

:class:`FakeNVML` simulates GPUs from a :class:`PowerProfile` (step time and power as functions
of the limit). Its clock and energy counter advance only when :meth:`FakeNVML.step` runs one
training step, so every decision of the energy code runs deterministically on the CPU.
:func:`h200_like_profile` is the power model the simulation benchmark uses.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

@dataclass(frozen=True)
class PowerProfile:
    """Step time and power draw of one training job as functions of the power limit.

    Rows are ``(limit W, step time s, power W)``, one per limit; between rows both are linearly
    interpolated, outside them clamped. A recorded sweep (:meth:`from_json`) or a model
    (:func:`h200_like_profile`) both fit.
    """

    limits: tuple[int, ...]
    step_time_s: tuple[float, ...]
    power_w: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.limits)
        if n == 0 or len(self.step_time_s) != n or len(self.power_w) != n:
            raise ValueError(f"a PowerProfile needs equally many limits, times and powers, got "
                             f"{len(self.limits)!r}, {len(self.step_time_s)!r}, {len(self.power_w)!r}")
        if list(self.limits) != sorted(set(self.limits)):
            raise ValueError(f"PowerProfile limits must be strictly increasing: {self.limits!r}")

    def _interp(self, values: tuple[float, ...], watts: float) -> float:
        xs = self.limits
        if watts <= xs[0]:
            return values[0]
        if watts >= xs[-1]:
            return values[-1]
        for i in range(1, len(xs)):
            if watts <= xs[i]:
                w = (watts - xs[i - 1]) / (xs[i] - xs[i - 1])
                return values[i - 1] + w * (values[i] - values[i - 1])
        raise AssertionError("unreachable")

    def step_time(self, watts: float) -> float:
        return self._interp(self.step_time_s, watts)

    def power(self, watts: float) -> float:
        return self._interp(self.power_w, watts)

    @classmethod
    def from_json(cls, path: str | Path) -> "PowerProfile":
        """Read ``{"rows": [[limit, step_time_s, power_w], ...]}``."""
        rows = sorted(json.loads(Path(path).read_text())["rows"])
        return cls(tuple(int(r[0]) for r in rows), tuple(float(r[1]) for r in rows),
                   tuple(float(r[2]) for r in rows))


def h200_like_profile(demand_w: float = 675.0, idle_w: float = 90.0, step_time_s: float = 0.1,
                      memory_bound: float = 0.3, lo: int = 200, hi: int = 700,
                      step: int = 5) -> PowerProfile:
    """A power model of a busy H200 (limits 200-700 W), used where no recorded sweep exists.

    The job draws ``demand_w`` when unconstrained. Under a lower limit L the GPU runs at the
    clock where ``idle + (demand - idle) f^3 = L`` (dynamic power ~ f V^2 with V ~ f), drawing L;
    the ``memory_bound`` share of the step does not scale with the clock, the rest as ``1/f``.
    Zeus's measured curves (NSDI'23, Fig. 4) have this shape: flat time near the top of the
    range, then a steep rise; energy per step with a minimum inside the range.
    """
    limits, times, powers = [], [], []
    for watts in range(lo, hi + 1, step):
        if watts >= demand_w:
            f, power = 1.0, demand_w
        else:
            f, power = ((watts - idle_w) / (demand_w - idle_w)) ** (1 / 3), float(watts)
        limits.append(watts)
        times.append(step_time_s * (memory_bound + (1 - memory_bound) / f))
        powers.append(power)
    return PowerProfile(tuple(limits), tuple(times), tuple(powers))


class FakeNVML:
    """:class:`lit.energy.nvml.NVML` simulated from a :class:`PowerProfile`; nothing touches hardware.

    Each device has a limit (initially the top of the range), a clock and an energy counter.
    :meth:`step` runs one training step on every device: the clock advances by the profile's
    step time at the device's limit and the counter by power x that time (all devices share
    the clock: a synchronous data-parallel step lasts as long as its slowest GPU).
    ``counter_period_s`` > 0 quantises the counter like a driver that updates it periodically;
    ``energy_counter=False`` models a GPU without one. ``set_calls`` records every set, and
    ``state_path`` (optional) mirrors the limits to a JSON file on every set so that another
    process can check them.

    Args:
        profile: the job's step time and power by limit.
        num_devices: simulated GPUs.
        limit_range: ``(min, max)`` W; default the profile's first and last limit.
        power_limit: initial limit in W; default the maximum.
        energy_counter: whether ``total_energy`` reports a counter.
        counter_period_s: counter update period in s (0: exact).
        state_path: JSON file that mirrors ``{"limits": [...], "set_calls": n}``.
        can_set: ``False`` makes the setter fail like an unprivileged real one.
    """

    def __init__(self, profile: PowerProfile, num_devices: int = 1,
                 limit_range: tuple[int, int] | None = None, power_limit: int | None = None,
                 energy_counter: bool = True, counter_period_s: float = 0.0,
                 state_path: str | Path | None = None, can_set: bool = True) -> None:
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {num_devices!r}")
        self.profile = profile
        self.range = limit_range or (profile.limits[0], profile.limits[-1])
        start = self.range[1] if power_limit is None else power_limit
        self.limits = [int(start)] * num_devices
        self.energy_j = [0.0] * num_devices
        self.time_s = 0.0
        self.energy_counter = energy_counter
        self.counter_period_s = counter_period_s
        self.set_calls: list[tuple[int, int]] = []
        self.can_set = can_set
        self.state_path = None if state_path is None else Path(state_path)
        self._mirror()

    def step(self) -> float:
        """One training step on every device; returns its simulated duration in s."""
        times = [self.profile.step_time(w) for w in self.limits]
        duration = max(times)
        for i, w in enumerate(self.limits):
            # A GPU that finishes early idles at (about) no extra cost until the others finish.
            self.energy_j[i] += self.profile.power(w) * times[i]
        self.time_s += duration
        return duration

    def _mirror(self) -> None:
        if self.state_path is not None:
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"limits": self.limits, "set_calls": len(self.set_calls)}))
            tmp.replace(self.state_path)

    def device_count(self) -> int:
        return len(self.limits)

    def power_limit_range(self, index: int) -> tuple[int, int]:
        return int(self.range[0]), int(self.range[1])

    def power_limit(self, index: int) -> int:
        return self.limits[index]

    def set_power_limit(self, index: int, watts: int) -> None:
        if not self.can_set:
            raise PermissionError("setting a GPU power limit needs root or the SYS_ADMIN capability")
        lo, hi = self.range
        if not lo <= watts <= hi:
            raise ValueError(f"power limit {watts!r} W outside the device's range [{lo}, {hi}]")
        self.set_calls.append((index, int(watts)))
        self.limits[index] = int(watts)
        self._mirror()

    def total_energy(self, index: int) -> float | None:
        if not self.energy_counter:
            return None
        if self.counter_period_s <= 0:
            return self.energy_j[index]
        # The counter holds the value of its last update tick.
        ticks = math.floor(self.time_s / self.counter_period_s + 1e-9)
        if self.time_s == 0:
            return 0.0
        return self.energy_j[index] * (ticks * self.counter_period_s) / self.time_s

    def power_usage(self, index: int) -> float:
        return self.profile.power(self.limits[index])

    def clock(self) -> float:
        return self.time_s
