"""Zeus's power-limit optimizer: candidates by hand, the state machine driven step by step
against a fake GPU, the choice (lowest cost, or lowest limit within a slowdown) against a
brute-force reference, saved state resumed, and bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit.energy.fake import FakeNVML, h200_like_profile
from lit.energy.power_limit import (Done, LimitMeasurement, PowerLimitOptimizer, Profiling, Ready, Warmup,
                                    candidate_limits, check_settings, choose_power_limit,
                                    lowest_limit_within_slowdown)
from tests.callbacks.energy_helpers import PROFILE, brute_force_limit, brute_force_within_slowdown

BATCH = 8


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
    ({"mode": "set"}, "mode"), ({"reprofile_every_n_epochs": 0}, "reprofile_every_n_epochs"),
    ({"max_slowdown": 0.9}, "max_slowdown"), ({"max_slowdown": float("inf")}, "max_slowdown"),
    ({"max_slowdown": float("nan")}, "max_slowdown")])
def test_bad_settings_are_rejected_by_name(kwargs: dict, field: str) -> None:
    settings = {"eta_knob": 0.5, "warmup_steps": 10, "profile_steps": 40, "pl_step_watts": 25,
                "mode": "apply", "reprofile_every_n_epochs": None, "max_slowdown": None, **kwargs}
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


# ------------------------------------------------------------------ max-slowdown constraint

def test_lowest_limit_within_slowdown_by_hand() -> None:
    ms = [LimitMeasurement(300, energy_j=80.0, time_s=2.0, samples=8),   # 0.25 s per sample
          LimitMeasurement(250, energy_j=60.0, time_s=2.2, samples=8),   # 0.275 (1.1 x)
          LimitMeasurement(200, energy_j=30.0, time_s=1.5, samples=4),   # 0.375 (1.5 x)
          LimitMeasurement(150, energy_j=30.0, time_s=2.4, samples=4)]   # 0.6 (2.4 x)
    assert lowest_limit_within_slowdown(ms, 1.0) == 300
    assert lowest_limit_within_slowdown(ms, 1.1) == 250  # on the bound up to rounding: within
    assert lowest_limit_within_slowdown(ms, 1.49) == 250
    assert lowest_limit_within_slowdown(ms, 1.5) == 200
    assert lowest_limit_within_slowdown(ms, 10.0) == 150
    # The bound is relative to the fastest measured limit, not to the maximum limit.
    noisy = [LimitMeasurement(300, 1.0, 1.1, 1), LimitMeasurement(275, 1.0, 1.0, 1),
             LimitMeasurement(250, 1.0, 1.15, 1)]
    assert lowest_limit_within_slowdown(noisy, 1.1) == 275
    assert choose_power_limit(ms, 1.0, 30.0, max_slowdown=1.1) == 250  # eta_knob unused
    assert choose_power_limit(ms[:1], 0.5, 30.0, max_slowdown=1.1) == 300  # observe: one row
    with pytest.raises(ValueError, match="at least one"):
        lowest_limit_within_slowdown([], 1.1)


@pytest.mark.parametrize("factor", [1.0, 1.1, 1.2, 1.5, 3.0])
def test_slowdown_choice_equals_brute_force_on_the_test_profile(factor: float) -> None:
    fake = FakeNVML(PROFILE)
    opt = make(fake, max_slowdown=factor, pl_step_watts=50)
    run_steps(opt, fake, 5 * 5)
    assert opt.chosen == brute_force_within_slowdown(PROFILE, [300, 250, 200, 150, 100], factor)
    assert fake.power_limit(0) == opt.chosen


@pytest.mark.parametrize("factor", [1.0, 1.05, 1.1, 1.25, 1.6])
def test_slowdown_choice_equals_brute_force_on_the_h200_like_profile(factor: float) -> None:
    profile = h200_like_profile()
    fake = FakeNVML(profile)
    opt = make(fake, max_slowdown=factor, pl_step_watts=25, warmup_steps=1, profile_steps=2)
    run_steps(opt, fake, 21 * 3)
    assert opt.chosen == brute_force_within_slowdown(profile, candidate_limits(200, 700, 25), factor)


# ------------------------------------------------------------------ saved state (checkpoints)

def roundtrip(opt: PowerLimitOptimizer) -> dict:
    return json.loads(json.dumps(opt.state_dict()))  # what a checkpoint can hold


def test_saved_mid_window_resumes_at_the_next_unmeasured_limit() -> None:
    straight_fake = FakeNVML(PROFILE)
    straight = make(straight_fake)
    run_steps(straight, straight_fake, 15)
    fake = FakeNVML(PROFILE)
    opt = make(fake)
    run_steps(opt, fake, 5 + 3)  # 300 measured; 200 mid-profile
    assert isinstance(opt.state, Profiling) and opt.state.limit == 200
    saved = roundtrip(opt)
    assert (saved["state"], saved["limit"]) == ("Ready", 200)  # a window cannot span a restart
    fresh = FakeNVML(PROFILE)  # a new process: the GPU is back at its original limit
    resumed = make(fresh)
    resumed.load_state_dict(saved)
    assert resumed.state == Ready(200) and [m.power_limit for m in resumed.measurements] == [300]
    log: list = []
    run_steps(resumed, fresh, 10, log)
    assert log[0] == ("Warmup", 200) and fresh.set_calls[0] == (0, 200)  # 300 W not profiled again
    assert [m.power_limit for m in resumed.measurements] == [300, 200, 100]
    for m in resumed.measurements:  # each the straight run's window, measured once
        assert m.samples == 3 * BATCH and m.time_s == pytest.approx(3 * PROFILE.step_time(m.power_limit))
        assert m.energy_j == pytest.approx(3 * PROFILE.step_time(m.power_limit) * PROFILE.power(m.power_limit))
    assert resumed.chosen == straight.chosen == brute_force_limit(PROFILE, [300, 200, 100], 0.5, 300.0, BATCH)


def test_saved_done_state_is_rechosen_under_the_resumed_rule() -> None:
    fake = FakeNVML(PROFILE)
    opt = make(fake, pl_step_watts=50)
    run_steps(opt, fake, 25)
    saved = roundtrip(opt)
    assert saved["state"] == "Done" and saved["limit"] == opt.chosen
    same = make(FakeNVML(PROFILE), pl_step_watts=50)
    same.load_state_dict(saved)
    assert same.state == Done(opt.chosen) and same.measurements == opt.measurements
    candidates = [300, 250, 200, 150, 100]
    energy_only = make(FakeNVML(PROFILE), pl_step_watts=50, eta_knob=1.0)
    energy_only.load_state_dict(saved)
    assert energy_only.chosen == brute_force_limit(PROFILE, candidates, 1.0, 300.0, BATCH)
    slowdown = make(FakeNVML(PROFILE), pl_step_watts=50, max_slowdown=1.2)
    slowdown.load_state_dict(saved)
    assert slowdown.chosen == brute_force_within_slowdown(PROFILE, candidates, 1.2)


def test_saved_state_of_other_candidates_is_dropped_with_a_warning() -> None:
    fake = FakeNVML(PROFILE)
    opt = make(fake, pl_step_watts=50)
    run_steps(opt, fake, 7)
    warnings: list[str] = []
    other = make(FakeNVML(PROFILE), pl_step_watts=100, warn=warnings.append)
    other.load_state_dict(roundtrip(opt))
    assert len(warnings) == 1 and "candidates" in warnings[0] and "profiling again" in warnings[0]
    assert other.state == Ready(300) and other.measurements == []
    narrower = make(FakeNVML(PROFILE, limit_range=(150, 300)), pl_step_watts=50, warn=warnings.append)
    narrower.load_state_dict(roundtrip(opt))
    assert "limit_range [100, 300]" in warnings[1] and narrower.measurements == []
    with pytest.raises(ValueError, match="format"):
        make(FakeNVML(PROFILE)).load_state_dict({"measurements": []})


def test_resumed_epoch_does_not_start_its_reprofile_twice() -> None:
    fake = FakeNVML(PROFILE)
    opt = make(fake, reprofile_every_n_epochs=2)
    run_steps(opt, fake, 15)
    opt.on_epoch_begin(2)
    assert opt.state == Ready(300)
    run_steps(opt, fake, 15)  # epoch 2's profile, done inside epoch 2
    resumed = make(FakeNVML(PROFILE), reprofile_every_n_epochs=2)
    resumed.load_state_dict(roundtrip(opt))
    resumed.on_epoch_begin(2)  # a run resumed inside epoch 2 enters it again
    assert resumed.state == Done(opt.chosen) and len(resumed.measurements) == 3
    resumed.on_epoch_begin(4)
    assert resumed.state == Ready(300)
