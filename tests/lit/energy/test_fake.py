"""The simulated GPU: its power model and counter against hand-worked numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit.energy.fake import FakeNVML, PowerProfile, h200_like_profile
from lit.energy.nvml import NVML

PROFILE = PowerProfile((100, 200, 300), (0.4, 0.2, 0.1), (100.0, 180.0, 250.0))


def test_profile_interpolates_linearly_and_clamps() -> None:
    assert PROFILE.step_time(150) == pytest.approx(0.3)
    assert PROFILE.power(250) == pytest.approx(215.0)
    assert PROFILE.step_time(50) == 0.4 and PROFILE.power(400) == 250.0


@pytest.mark.parametrize("rows", [((100, 100), (1.0, 1.0), (1.0, 1.0)), ((200, 100), (1.0, 1.0), (1.0, 1.0)),
                                  ((100,), (1.0, 2.0), (1.0,)), ((), (), ())])
def test_profile_rejects_bad_rows(rows) -> None:
    with pytest.raises(ValueError, match="PowerProfile"):
        PowerProfile(*rows)


def test_profile_from_json(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"rows": [[300, 0.1, 250], [100, 0.4, 100], [200, 0.2, 180]]}))
    assert PowerProfile.from_json(path) == PROFILE


def test_h200_like_profile_by_hand() -> None:
    p = h200_like_profile(demand_w=600.0, idle_w=100.0, step_time_s=0.1, memory_bound=0.5)
    assert p.limits[0] == 200 and p.limits[-1] == 700
    assert p.power(650) == 600.0 and p.step_time(650) == pytest.approx(0.1)
    # At 225 W: f^3 = (225 - 100) / 500 = 1/4, time = 0.1 (0.5 + 0.5 / f).
    f = 0.25 ** (1 / 3)
    assert p.power(225) == 225.0 and p.step_time(225) == pytest.approx(0.1 * (0.5 + 0.5 / f))


def test_fake_steps_advance_clock_and_counter_by_the_profile() -> None:
    fake = FakeNVML(PROFILE, num_devices=2)
    assert isinstance(fake, NVML)
    assert fake.power_limit_range(0) == (100, 300) and fake.power_limit(1) == 300
    fake.set_power_limit(1, 200)
    assert fake.step() == pytest.approx(0.2)  # the slower device sets the step's length
    assert fake.clock() == pytest.approx(0.2)
    assert fake.total_energy(0) == pytest.approx(250 * 0.1)
    assert fake.total_energy(1) == pytest.approx(180 * 0.2)
    assert fake.power_usage(1) == 180.0
    assert fake.set_calls == [(1, 200)]


def test_fake_counter_period_and_missing_counter() -> None:
    fake = FakeNVML(PROFILE, counter_period_s=1.0)
    for _ in range(5):  # 0.5 s: no update tick yet
        fake.step()
    assert fake.total_energy(0) == 0.0
    for _ in range(7):  # 1.2 s: the counter holds its value from t = 1 s
        fake.step()
    assert fake.total_energy(0) == pytest.approx(250.0)
    assert FakeNVML(PROFILE, energy_counter=False).total_energy(0) is None


def test_fake_setter_checks_range_permission_and_mirrors(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    fake = FakeNVML(PROFILE, state_path=state)
    with pytest.raises(ValueError, match="outside"):
        fake.set_power_limit(0, 50)
    fake.set_power_limit(0, 150)
    assert json.loads(state.read_text()) == {"limits": [150], "set_calls": 1}
    with pytest.raises(PermissionError, match="SYS_ADMIN"):
        FakeNVML(PROFILE, can_set=False).set_power_limit(0, 150)

