"""The GPU power interface of the energy code, and its real implementation on NVML.

:class:`NVML` is the whole surface: device count, power-limit range, current limit, set limit,
total-energy counter, power draw, and the clock energy windows are timed with. Units are watts,
joules and seconds; devices are numbered like ``torch.cuda`` numbers them in this process.

:class:`PynvmlNVML` reads (and, where allowed, sets) a real GPU through ``pynvml`` (the module
of the ``nvidia-ml-py`` package). A missing driver is :class:`NVMLUnavailable`; setting a limit
without root or ``CAP_SYS_ADMIN`` is a :class:`PermissionError` naming the fix. The simulated
GPU that tests and benchmarks use is :class:`lit.energy.fake.FakeNVML`.
"""

from __future__ import annotations

import os
import time
from typing import Protocol, runtime_checkable


class NVMLUnavailable(RuntimeError):
    """No NVIDIA driver / NVML library, or no such device: nothing can be measured."""


@runtime_checkable
class NVML(Protocol):
    """What the energy callbacks need from a GPU management library."""

    def device_count(self) -> int:
        """Number of GPUs visible to this process."""

    def power_limit_range(self, index: int) -> tuple[int, int]:
        """``(min, max)`` power limit the device accepts, in W."""

    def power_limit(self, index: int) -> int:
        """The power limit in force, in W."""

    def set_power_limit(self, index: int, watts: int) -> None:
        """Set the power limit (needs root or ``CAP_SYS_ADMIN`` on a real GPU)."""

    def total_energy(self, index: int) -> float | None:
        """The device's energy counter in J since driver load; ``None`` where it has none."""

    def power_usage(self, index: int) -> float:
        """Current power draw in W."""

    def clock(self) -> float:
        """Seconds on the clock that energy windows are timed with."""


class PynvmlNVML:
    """:class:`NVML` on a real GPU through ``pynvml``.

    Device ``i`` is the ``i``-th entry of ``CUDA_VISIBLE_DEVICES`` when it is set (indices or
    ``GPU-`` UUIDs), else NVML's device ``i``, so the numbering matches ``torch.cuda``'s.
    Only the setter changes anything on the GPU.
    """

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as err:  # the package is a project dependency; say how to get it
            raise NVMLUnavailable("pynvml is not installed: pip install nvidia-ml-py") from err
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise NVMLUnavailable(f"NVML could not start ({err}): no NVIDIA driver on this machine?"
                                  ) from err
        self._nvml = pynvml
        self._handles: dict[int, object] = {}
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self._visible = None if visible is None else [v.strip() for v in visible.split(",") if v.strip()]

    def _handle(self, index: int) -> object:
        if index not in self._handles:
            nv = self._nvml
            if not 0 <= index < self.device_count():
                raise NVMLUnavailable(f"no GPU with index {index!r}: {self.device_count()} visible")
            key = str(index) if self._visible is None else self._visible[index]
            try:
                if key.isdigit():
                    handle = nv.nvmlDeviceGetHandleByIndex(int(key))
                else:
                    handle = nv.nvmlDeviceGetHandleByUUID(key)
            except nv.NVMLError as err:
                raise NVMLUnavailable(f"NVML cannot open GPU {key!r}: {err}") from err
            self._handles[index] = handle
        return self._handles[index]

    def device_count(self) -> int:
        if self._visible is not None:
            return len(self._visible)
        return int(self._nvml.nvmlDeviceGetCount())

    def power_limit_range(self, index: int) -> tuple[int, int]:
        lo, hi = self._nvml.nvmlDeviceGetPowerManagementLimitConstraints(self._handle(index))
        return int(lo) // 1000, int(hi) // 1000

    def power_limit(self, index: int) -> int:
        return int(self._nvml.nvmlDeviceGetPowerManagementLimit(self._handle(index))) // 1000

    def set_power_limit(self, index: int, watts: int) -> None:
        nv = self._nvml
        try:
            nv.nvmlDeviceSetPowerManagementLimit(self._handle(index), int(watts) * 1000)
        except nv.NVMLError_NoPermission as err:
            raise PermissionError(
                "setting a GPU power limit needs root or the SYS_ADMIN capability "
                "(docker run --cap-add SYS_ADMIN); use mode='observe' to only measure") from err

    def total_energy(self, index: int) -> float | None:
        nv = self._nvml
        try:
            return nv.nvmlDeviceGetTotalEnergyConsumption(self._handle(index)) / 1000.0
        except nv.NVMLError_NotSupported:  # pre-Volta GPUs have no counter
            return None

    def power_usage(self, index: int) -> float:
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle(index)) / 1000.0

    def clock(self) -> float:
        return time.perf_counter()
