"""Zeus's power-limit optimizer: the cost and candidates by hand, the state machine driven step by
step against a fake GPU, the choice against a brute-force minimum, and bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit.nvml import FakeNVML, h200_like_profile
from lit.power_limit import (Done, LimitMeasurement, PowerLimitOptimizer, Profiling, Ready, Warmup,
                             candidate_limits, check_settings, choose_power_limit, zeus_cost)
from tests.callbacks.energy_helpers import PROFILE, brute_force_limit

BATCH = 8


def test_zeus_cost_by_hand() -> None:
    assert zeus_cost(energy_j=100.0, time_s=2.0, eta_knob=0.25, max_power_w=300.0) == 0.25 * 100 + 0.75 * 600


def test_candidates_run_from_max_down_to_min() -> None:
    assert candidate_limits(200, 700, 25) == list(range(700, 199, -25))
    assert candidate_limits(200, 700, 30)[-2:] == [220, 200]  # the minimum is always tried
    assert candidate_limits(250, 250, 25) == [250]


def test_choice_per_sample_and_ties_to_the_higher_limit() -> None:
    ms = [LimitMeasurement(300, energy_j=80.0, time_s=2.0, samples=8),  # 10 J, 0.25 s per sample
          LimitMeasurement(200, energy_j=30.0, time_s=1.5, samples=4)]  # 7.5 J, 0.375 s per sample
    # eta 1: energy only -> 200; eta 0: time only -> 300; cost(300) = cost(200) at eta = 2/3 with P=30.
    assert choose_power_limit(ms, 1.0, 30.0) == 200
    assert choose_power_limit(ms, 0.0, 30.0) == 300
    assert choose_power_limit(ms, 0.5, 30.0) == 300  # 0.5*10+0.5*7.5=8.75 vs 3.75+5.625=9.375
    tie = [LimitMeasurement(300, 10.0, 1.0, 1), LimitMeasurement(200, 10.0, 1.0, 1)]
    assert choose_power_limit(tie, 0.5, 1.0) == 300


@pytest.mark.parametrize("kwargs, field", [
    ({"eta_knob": -0.1}, "eta_knob"), ({"eta_knob": 1.5}, "eta_knob"),
    ({"warmup_steps": -1}, "warmup_steps"), ({"profile_steps": 0}, "profile_steps"),
    ({"pl_step_watts": 0}, "pl_step_watts"), ({"pl_step_watts": -25}, "pl_step_watts"),
    ({"mode": "set"}, "mode"), ({"reprofile_every_n_epochs": 0}, "reprofile_every_n_epochs")])
def test_bad_settings_are_rejected_by_name(kwargs: dict, field: str) -> None:
    settings = {"eta_knob": 0.5, "warmup_steps": 10, "profile_steps": 40, "pl_step_watts": 25,
                "mode": "apply", "reprofile_every_n_epochs": None, **kwargs}
    with pytest.raises(ValueError, match=field):
        check_settings(**settings)


def run_steps(opt: PowerLimitOptimizer, fake: FakeNVML, n: int, log: list | None = None) -> None:
    for _ in range(n):
        opt.on_step_begin()
        if log is not None:
            log.append((type(opt.state).__name__, fake.power_limit(0)))
        fake.step()
        opt.on_step_end(BATCH)


def make(fake: FakeNVML, **kwargs) -> PowerLimitOptimizer:
    settings = {"eta_knob": 0.5, "warmup_steps": 2, "profile_steps": 3, "pl_step_watts": 100,
                "info": lambda s: None, **kwargs}
    return PowerLimitOptimizer(fake, 0, **settings)


def test_state_machine_walks_every_limit_then_settles() -> None:
    fake = FakeNVML(PROFILE)
    opt = make(fake)
    assert opt.candidates == [300, 200, 100] and opt.state == Ready(300)
    opt.on_epoch_begin(0)
    log: list = []
    run_steps(opt, fake, 15, log)
    # Each limit: 2 warm-up steps then 3 profiled ones, at that limit.
    expected = [(s, w) for w in (300, 200, 100) for s in ["Warmup"] * 2 + ["Profiling"] * 3]
    assert log == expected
    assert [m.power_limit for m in opt.measurements] == [300, 200, 100]
    for m in opt.measurements:  # exactly the 3 profiled steps
        assert m.samples == 3 * BATCH
        assert m.time_s == pytest.approx(3 * PROFILE.step_time(m.power_limit))
        assert m.energy_j == pytest.approx(3 * PROFILE.step_time(m.power_limit) * PROFILE.power(m.power_limit))
    best = brute_force_limit(PROFILE, [300, 200, 100], 0.5, 300.0, BATCH)
    assert best == 200  # by hand: cost per step 50.15 (300 W), 48.5 (200 W), 78 (100 W)
    assert opt.state == Done(best) and fake.power_limit(0) == best
    run_steps(opt, fake, 4)
    assert opt.state == Done(best)
    fake.set_power_limit(0, 300)  # someone else changes it: re-applied at the next epoch
    opt.on_epoch_begin(1)
    assert fake.power_limit(0) == best
    opt.restore()
    assert fake.power_limit(0) == 300 and opt.closed
    opt.on_epoch_begin(2)  # nothing is set after restore
    assert fake.power_limit(0) == 300


def test_epoch_end_mid_profile_discards_the_window_and_resumes_there() -> None:
    fake = FakeNVML(PROFILE)
    opt = make(fake)
    run_steps(opt, fake, 5 + 3)  # 300 done; 200: warm-up done, one profiled step
    assert isinstance(opt.state, Profiling) and opt.state.limit == 200
    opt.interrupt()
    assert opt.state == Ready(200) and fake.power_limit(0) == 300  # back at the maximum
    opt.interrupt()  # a second end (validation, then epoch end) changes nothing
    assert opt.state == Ready(200)
    log: list = []
    opt.on_epoch_begin(1)
    run_steps(opt, fake, 10, log)
    assert log[0] == ("Warmup", 200)  # the interrupted limit starts again from its warm-up
    assert [m.power_limit for m in opt.measurements] == [300, 200, 100]
    assert all(m.samples == 3 * BATCH for m in opt.measurements)
    assert isinstance(opt.state, Done)


def test_warmup_cut_and_zero_warmup() -> None:
    fake = FakeNVML(PROFILE)
    opt = make(fake, warmup_steps=0, profile_steps=2)
    log: list = []
    run_steps(opt, fake, 1, log)
    assert log == [("Profiling", 300)]
    opt2 = make(FakeNVML(PROFILE))
    run_steps(opt2, opt2.nvml, 1)
    assert isinstance(opt2.state, Warmup)
    opt2.interrupt()
    assert opt2.state == Ready(300)


@pytest.mark.parametrize("eta", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_choice_equals_brute_force_on_the_h200_like_profile(eta: float) -> None:
    profile = h200_like_profile()
    fake = FakeNVML(profile)
    opt = make(fake, eta_knob=eta, pl_step_watts=25, warmup_steps=1, profile_steps=2)
    run_steps(opt, fake, 21 * 3)
    assert opt.chosen == brute_force_limit(profile, candidate_limits(200, 700, 25), eta, 700.0, BATCH)


def test_reprofile_every_n_epochs() -> None:
    fake = FakeNVML(PROFILE)
    opt = make(fake, reprofile_every_n_epochs=2)
    opt.on_epoch_begin(0)
    run_steps(opt, fake, 15)
    assert isinstance(opt.state, Done)
    opt.on_epoch_begin(1)
    assert isinstance(opt.state, Done)
    opt.on_epoch_begin(2)
    assert opt.state == Ready(300) and opt.measurements == []


def test_profile_saved_then_reused_without_profiling(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "profile.json"
    fake = FakeNVML(PROFILE)
    opt = make(fake, profile_path=path)
    run_steps(opt, fake, 15)
    assert opt.chosen == 200  # at eta 0.5 (brute force: test_state_machine_walks_every_limit...)
    saved = json.loads(path.read_text())
    assert [m["power_limit"] for m in saved["measurements"]] == [300, 200, 100]
    fresh = FakeNVML(PROFILE)
    again = make(fresh, profile_path=path)
    assert again.state == Done(opt.chosen)
    again.on_epoch_begin(0)
    run_steps(again, fresh, 5)
    assert fresh.set_calls == [(0, opt.chosen)]  # straight to the optimum
    # The same profile under another eta gives that eta's optimum.
    energy_only = make(FakeNVML(PROFILE), profile_path=path, eta_knob=1.0)
    assert energy_only.chosen == brute_force_limit(PROFILE, [300, 200, 100], 1.0, 300.0, BATCH) == 100


def test_bad_profile_files_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("{\"measurements\": [{\"power_limit\": 900, \"energy_j\": 1, \"time_s\": 1, \"samples\": 1}]}")
    with pytest.raises(ValueError, match="outside"):
        make(FakeNVML(PROFILE), profile_path=path)
    path.write_text("not json")
    with pytest.raises(ValueError, match="profile_path"):
        make(FakeNVML(PROFILE), profile_path=path)


def test_observe_never_sets_and_recommends_from_a_saved_profile(tmp_path: Path) -> None:
    fake = FakeNVML(PROFILE, power_limit=250)
    opt = make(fake, mode="observe")
    assert opt.candidates == [250]
    opt.on_epoch_begin(0)
    run_steps(opt, fake, 6)
    opt.interrupt()
    opt.restore()
    assert fake.set_calls == [] and opt.state == Done(250)
    assert opt.measurements[0].energy_j == pytest.approx(3 * PROFILE.power(250) * PROFILE.step_time(250))
    path = tmp_path / "profile.json"
    applied = make(FakeNVML(PROFILE), profile_path=path)
    run_steps(applied, applied.nvml, 15)
    watcher = FakeNVML(PROFILE, power_limit=250)
    observer = make(watcher, mode="observe", profile_path=path)
    observer.on_epoch_begin(0)
    run_steps(observer, watcher, 5)
    assert observer.chosen == applied.chosen and watcher.set_calls == []


def test_apply_without_permission_warns_once_and_observes() -> None:
    fake = FakeNVML(PROFILE, can_set=False)
    warnings: list[str] = []
    opt = make(fake, warn=warnings.append)
    run_steps(opt, fake, 10)
    opt.interrupt()
    opt.restore()
    assert len(warnings) == 1 and "observing instead" in warnings[0]
    assert opt.mode == "observe" and opt.state == Done(300) and fake.power_limit(0) == 300
