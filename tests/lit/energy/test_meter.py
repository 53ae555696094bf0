"""Energy windows: counter differences, and power x time where the counter fails."""

from __future__ import annotations

import pytest
import torch

from lit.energy.fake import FakeNVML, PowerProfile
from lit.energy.meter import EnergyMeter, Reading, energy_between, open_device

PROFILE = PowerProfile((100, 300), (0.2, 0.1), (150.0, 250.0))


def test_counter_difference_per_device() -> None:
    m = energy_between(Reading(1.0, (10.0, 5.0), (100.0, 100.0)), Reading(3.0, (30.0, 45.0), (100.0, 100.0)))
    assert m.per_device_j == (20.0, 40.0) and m.method == ("counter", "counter")
    assert m.energy_j == 60.0 and m.time_s == 2.0 and m.avg_power_w == 30.0


def test_fallback_to_power_times_time() -> None:
    # Device 0 has no counter; device 1's counter has not ticked (difference 0).
    m = energy_between(Reading(0.0, (None, 7.0), (100.0, 200.0)), Reading(0.5, (None, 7.0), (300.0, 200.0)))
    assert m.per_device_j == (100.0, 100.0) and m.method == ("power", "power")


def test_meter_syncs_once_per_read_and_measures_the_fake() -> None:
    fake = FakeNVML(PROFILE, num_devices=2)
    syncs = []
    meter = EnergyMeter(fake, [0, 1], sync=lambda: syncs.append(1))
    start = meter.read()
    fake.set_power_limit(1, 100)
    for _ in range(3):
        fake.step()
    m = meter.since(start)
    assert len(syncs) == 2
    assert m.time_s == pytest.approx(0.6)
    assert m.per_device_j == pytest.approx((250 * 0.1 * 3, 150 * 0.2 * 3))
    with pytest.raises(ValueError, match="device"):
        EnergyMeter(fake, [])


def test_open_device_without_cuda_warns_and_gives_nothing() -> None:
    said = []
    assert open_device(torch.device("cpu"), None, "X", said.append) is None
    assert len(said) == 1 and "no CUDA device" in said[0]
    fake = FakeNVML(PROFILE)
    assert open_device(torch.device("cpu"), fake, "X", said.append) == (fake, 0, None)
