"""Energy over a window of work: counter differences, or power x time where that fails.

The measurement Zeus (You, Chung, Chowdhury, NSDI'23) builds on: synchronise the device, read
NVML's total-energy counter at both ends of a window and take the difference. Two cases need
the fallback, average power x elapsed time: a GPU without the counter (pre-Volta), and a window
shorter than the counter's update period, which reads a difference of 0.

Usage in any loop (one sync per read, none in between)::

    meter = EnergyMeter(nvml, devices=[0], sync=torch.cuda.synchronize)
    start = meter.read()
    ...  # work
    m = meter.since(start)   # m.time_s, m.energy_j (all devices), m.per_device_j, m.method
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from lit.energy.nvml import NVML, NVMLUnavailable, PynvmlNVML

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Reading:
    """One synchronised read of the devices: clock (s), counters (J or None), power (W)."""

    time_s: float
    energy_j: tuple[float | None, ...]
    power_w: tuple[float, ...]


@dataclass(frozen=True)
class Measurement:
    """Time and energy of one window. ``method`` per device: ``"counter"`` or ``"power"``."""

    time_s: float
    per_device_j: tuple[float, ...]
    method: tuple[str, ...]

    @property
    def energy_j(self) -> float:
        return float(sum(self.per_device_j))

    @property
    def avg_power_w(self) -> float:
        return self.energy_j / self.time_s if self.time_s > 0 else 0.0


def energy_between(start: Reading, end: Reading) -> Measurement:
    """Energy per device from ``start`` to ``end``: counter difference when it is positive,
    else the mean of the two power readings times the elapsed time."""
    dt = end.time_s - start.time_s
    energies, methods = [], []
    for e0, e1, p0, p1 in zip(start.energy_j, end.energy_j, start.power_w, end.power_w):
        if e0 is not None and e1 is not None and e1 > e0:
            energies.append(e1 - e0)
            methods.append("counter")
        else:
            energies.append(0.5 * (p0 + p1) * max(dt, 0.0))
            methods.append("power")
    return Measurement(dt, tuple(energies), tuple(methods))


class EnergyMeter:
    """Reads ``devices`` of ``nvml`` after ``sync()`` (e.g. ``torch.cuda.synchronize``), so that a
    reading includes all work queued before it."""

    def __init__(self, nvml: NVML, devices: list[int], sync: Callable[[], None] | None = None) -> None:
        if not devices:
            raise ValueError(f"EnergyMeter needs at least one device index, got {devices!r}")
        self.nvml = nvml
        self.devices = list(devices)
        self.sync = sync

    def read(self) -> Reading:
        if self.sync is not None:
            self.sync()
        nv = self.nvml
        return Reading(nv.clock(), tuple(nv.total_energy(i) for i in self.devices),
                       tuple(nv.power_usage(i) for i in self.devices))

    def since(self, start: Reading) -> Measurement:
        return energy_between(start, self.read())


def open_device(device: "torch.device", nvml: NVML | None, owner: str,
                warn: Callable[[str], None]) -> tuple[NVML, int, Callable[[], None] | None] | None:
    """The NVML, device index and sync function for a module on ``device``, or ``None`` (after
    one warning) when there is nothing to measure: no CUDA device, or NVML unavailable.

    A given ``nvml`` (e.g. a :class:`lit.energy.fake.FakeNVML`) is used as is, device 0 off CUDA.
    """
    import torch  # only here: the meter and the optimizer work in any loop, without torch

    on_cuda = device.type == "cuda"
    index = (device.index or 0) if on_cuda else 0
    sync = (lambda: torch.cuda.synchronize(device)) if on_cuda else None
    if nvml is not None:
        return nvml, index, sync
    if not on_cuda:
        warn(f"{owner}: no CUDA device in this run, so no GPU energy to measure: doing nothing")
        return None
    try:
        return PynvmlNVML(), index, sync
    except NVMLUnavailable as err:
        warn(f"{owner}: {err}: doing nothing")
        return None
