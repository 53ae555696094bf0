"""The real NVML interface against a stand-in ``pynvml`` module: the device numbering of
``CUDA_VISIBLE_DEVICES`` (indices and ``GPU-`` UUIDs), the mW / mJ to W / J conversions, a
missing energy counter, a refused setter, no driver, no package. The stand-in is a real Python
module with pynvml's function and error names (checked against the installed nvidia-ml-py);
it replaces the hardware, which these tests must never touch."""

from __future__ import annotations

import sys
import types

import pytest

from lit.energy.nvml import NVML, NVMLUnavailable, PynvmlNVML

FUNCTIONS = ["nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetHandleByUUID",
             "nvmlDeviceGetPowerManagementLimitConstraints", "nvmlDeviceGetPowerManagementLimit",
             "nvmlDeviceSetPowerManagementLimit", "nvmlDeviceGetTotalEnergyConsumption",
             "nvmlDeviceGetPowerUsage"]
ERRORS = ["NVMLError", "NVMLError_NoPermission", "NVMLError_NotSupported"]


class Board:
    """Three GPUs as NVML numbers them: uuid, range (mW), limit (mW), energy (mJ or None), power (mW)."""

    def __init__(self) -> None:
        self.gpus = [
            {"uuid": "GPU-aaaa", "range": (100_000, 300_000), "limit": 300_000, "energy": 1_000_500, "power": 90_250},
            {"uuid": "GPU-bbbb", "range": (150_000, 400_000), "limit": 350_000, "energy": None, "power": 120_000},
            {"uuid": "GPU-cccc", "range": (200_000, 700_000), "limit": 700_000, "energy": 7_250, "power": 650_999},
        ]
        self.init_fails = False
        self.may_set = True
        self.sets: list[tuple[int, int]] = []


def fake_pynvml(board: Board) -> types.ModuleType:
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NoPermission(NVMLError):  # noqa: N801 (pynvml's names)
        pass

    class NVMLError_NotSupported(NVMLError):  # noqa: N801
        pass

    def init() -> None:
        if board.init_fails:
            raise NVMLError("Driver Not Loaded")

    def by_index(i: int) -> int:
        if not 0 <= i < len(board.gpus):
            raise NVMLError("Invalid Argument")
        return i

    def by_uuid(uuid: str) -> int:
        for i, g in enumerate(board.gpus):
            if g["uuid"] == uuid:
                return i
        raise NVMLError("Not Found")

    def energy(h: int) -> int:
        if board.gpus[h]["energy"] is None:
            raise NVMLError_NotSupported("Not Supported")
        return board.gpus[h]["energy"]

    def set_limit(h: int, mw: int) -> None:
        if not board.may_set:
            raise NVMLError_NoPermission("Insufficient Permissions")
        board.sets.append((h, mw))
        board.gpus[h]["limit"] = mw

    nv.NVMLError, nv.NVMLError_NoPermission, nv.NVMLError_NotSupported = (
        NVMLError, NVMLError_NoPermission, NVMLError_NotSupported)
    nv.nvmlInit = init
    nv.nvmlDeviceGetCount = lambda: len(board.gpus)
    nv.nvmlDeviceGetHandleByIndex = by_index
    nv.nvmlDeviceGetHandleByUUID = by_uuid
    nv.nvmlDeviceGetPowerManagementLimitConstraints = lambda h: list(board.gpus[h]["range"])
    nv.nvmlDeviceGetPowerManagementLimit = lambda h: board.gpus[h]["limit"]
    nv.nvmlDeviceSetPowerManagementLimit = set_limit
    nv.nvmlDeviceGetTotalEnergyConsumption = energy
    nv.nvmlDeviceGetPowerUsage = lambda h: board.gpus[h]["power"]
    return nv


@pytest.fixture
def board(monkeypatch: pytest.MonkeyPatch) -> Board:
    b = Board()
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(b))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return b


def test_the_stand_in_has_pynvml_names() -> None:
    real = pytest.importorskip("pynvml")  # nvidia-ml-py is a project dependency
    for name in FUNCTIONS + ERRORS:
        assert hasattr(real, name), name
    assert issubclass(real.NVMLError_NoPermission, real.NVMLError)
    assert issubclass(real.NVMLError_NotSupported, real.NVMLError)
    stand_in = fake_pynvml(Board())
    assert all(hasattr(stand_in, name) for name in FUNCTIONS + ERRORS)


def test_nvml_numbering_and_units_without_cuda_visible_devices(board: Board) -> None:
    nvml = PynvmlNVML()
    assert isinstance(nvml, NVML) and nvml.device_count() == 3
    assert nvml.power_limit_range(2) == (200, 700) and nvml.power_limit(1) == 350
    assert nvml.total_energy(0) == 1000.5 and nvml.total_energy(2) == 7.25  # mJ -> J
    assert nvml.power_usage(2) == 650.999  # mW -> W
    assert nvml.total_energy(1) is None  # NotSupported: no counter (pre-Volta)
    nvml.set_power_limit(2, 425)
    assert board.sets == [(2, 425_000)] and nvml.power_limit(2) == 425  # W -> mW


def test_cuda_visible_devices_indices_map_to_nvml_handles(board: Board, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 0")
    nvml = PynvmlNVML()
    assert nvml.device_count() == 2
    assert nvml.power_limit_range(0) == (200, 700)  # torch's cuda:0 is NVML's GPU 2
    assert nvml.power_limit_range(1) == (100, 300)
    nvml.set_power_limit(1, 150)
    assert board.sets == [(0, 150_000)]
    with pytest.raises(NVMLUnavailable, match="no GPU with index 2"):
        nvml.power_limit(2)


def test_cuda_visible_devices_uuids_map_to_nvml_handles(board: Board, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,GPU-aaaa")
    nvml = PynvmlNVML()
    assert nvml.device_count() == 2
    assert nvml.power_limit(0) == 350 and nvml.total_energy(0) is None
    assert nvml.total_energy(1) == 1000.5
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-zzzz")
    with pytest.raises(NVMLUnavailable, match="GPU-zzzz"):
        PynvmlNVML().power_limit(0)


def test_refused_setter_is_a_permission_error_naming_the_fix(board: Board) -> None:
    board.may_set = False
    with pytest.raises(PermissionError, match="SYS_ADMIN"):
        PynvmlNVML().set_power_limit(0, 200)
    assert board.gpus[0]["limit"] == 300_000


def test_no_driver_and_no_package_are_unavailable(board: Board, monkeypatch) -> None:
    board.init_fails = True
    with pytest.raises(NVMLUnavailable, match="driver"):
        PynvmlNVML()
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with pytest.raises(NVMLUnavailable, match="pip install nvidia-ml-py"):
        PynvmlNVML()


def test_real_nvml_without_driver_is_a_clear_error() -> None:
    try:
        nvml = PynvmlNVML()
    except NVMLUnavailable as err:
        assert "driver" in str(err) or "pynvml" in str(err)
    else:  # a machine with a GPU: the read-only calls work
        if nvml.device_count():
            lo, hi = nvml.power_limit_range(0)
            assert 0 < lo <= nvml.power_limit(0) <= hi
