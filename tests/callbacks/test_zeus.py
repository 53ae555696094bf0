"""ZeusCallback inside a real Trainer on the CPU against a fake GPU: the choice equals a
brute-force minimum, a cut epoch resumes the profile, the original limit comes back at the end,
on exceptions and on SIGTERM (a real subprocess), profiles are reused, observe mode never sets,
2-process DDP aggregates, and the YAML recipes run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from callbacks.zeus import ZeusCallback
from lit.nvml import FakeNVML
from lit.power_limit import Done, candidate_limits
from tests.callbacks.energy_helpers import PROFILE, StepFake, Tiny, brute_force_limit, loader, trainer
from tests.conftest import CONFIGS, ROOT, needs_fmnist

HERE = Path(__file__).resolve().parent


def zeus(fake: FakeNVML, **kwargs) -> ZeusCallback:
    settings = {"warmup_steps": 2, "profile_steps": 3, "pl_step_watts": 50, **kwargs}
    cb = ZeusCallback(**settings)
    cb.nvml = fake
    return cb


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_choice_equals_brute_force_in_a_trainer(eta: float) -> None:
    fake = FakeNVML(PROFILE)
    cb = zeus(fake, eta_knob=eta)
    t = trainer([StepFake(fake), cb], max_epochs=2)
    t.fit(Tiny(), loader(40))
    best = brute_force_limit(PROFILE, candidate_limits(100, 300, 50), eta, 300.0, batch=8)
    assert cb.optimizer.chosen == best
    assert [m.power_limit for m in cb.optimizer.measurements] == [300, 250, 200, 150, 100]
    # Applied for the rest of training, then the original limit restored at fit end.
    assert fake.set_calls[-2:] == ([(0, best), (0, 300)] if best != 300 else fake.set_calls[-2:])
    assert fake.power_limit(0) == 300


def test_epoch_end_mid_profile_resumes_next_epoch() -> None:
    fake = FakeNVML(PROFILE)
    cb = zeus(fake)
    # 12-step epochs: 5 steps per limit, so the third limit (200 W) is cut at 2 of its steps.
    t = trainer([StepFake(fake), cb], max_epochs=3)
    t.fit(Tiny(), loader(12))
    ms = cb.optimizer.measurements
    assert [m.power_limit for m in ms] == [300, 250, 200, 150, 100]
    assert all(m.samples == 3 * 8 for m in ms)
    for m in ms:  # every window measured its own limit only
        assert m.time_s == pytest.approx(3 * PROFILE.step_time(m.power_limit))
    limits_set = [w for _, w in fake.set_calls]
    assert limits_set[:4] == [250, 200, 300, 200]  # cut at 200 W -> max -> 200 W again
    assert isinstance(cb.optimizer.state, Done)


def test_restores_on_exception() -> None:
    fake = FakeNVML(PROFILE)
    cb = zeus(fake)
    t = trainer([StepFake(fake), cb], max_epochs=1)
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(Tiny(fail_at=7), loader(20))
    assert fake.set_calls[-1] == (0, 300) and fake.power_limit(0) == 300
    assert len(fake.set_calls) >= 2  # it had moved off the original limit


@pytest.mark.slow  # a fresh interpreter importing Lightning: about 20 s on 2 busy cores
def test_restores_on_sigterm_in_a_subprocess(tmp_path: Path) -> None:
    state = tmp_path / "limits.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(HERE / "zeus_sigterm_job.py"), str(state)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until the job runs below the original limit
            if state.is_file() and json.loads(state.read_text())["limits"][0] < 300:
                break
            if proc.poll() is not None:
                pytest.fail(f"job ended early:\n{proc.stdout.read()}")
            time.sleep(0.05)
        else:
            pytest.fail("the job never changed the limit")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(state.read_text())["limits"] == [300], out
    assert "Received SIGTERM" in out, out  # Lightning stopped gracefully, our handler restored


def test_profile_is_reused_by_the_next_run(tmp_path: Path) -> None:
    path = tmp_path / "zeus.json"
    first = FakeNVML(PROFILE)
    trainer([StepFake(first), zeus(first, profile_path=str(path))]).fit(Tiny(), loader(30))
    chosen = json.loads(path.read_text())
    assert len(chosen["measurements"]) == 5
    second = FakeNVML(PROFILE)
    cb = zeus(second, profile_path=str(path))
    trainer([StepFake(second), cb]).fit(Tiny(), loader(30))
    best = brute_force_limit(PROFILE, candidate_limits(100, 300, 50), 0.5, 300.0, batch=8)
    assert second.set_calls == [(0, best), (0, 300)]  # no profiling: optimum, then restore


def test_observe_mode_never_sets() -> None:
    fake = FakeNVML(PROFILE, power_limit=250)
    cb = zeus(fake, mode="observe")
    trainer([StepFake(fake), cb], max_epochs=2).fit(Tiny(), loader(12))
    assert fake.set_calls == [] and cb.optimizer.chosen == 250
    assert [m.power_limit for m in cb.optimizer.measurements] == [250]


def test_apply_without_permission_warns_once_and_falls_back() -> None:
    fake = FakeNVML(PROFILE, can_set=False)
    cb = zeus(fake)
    with pytest.warns(UserWarning, match="observing instead") as record:
        trainer([StepFake(fake), cb], max_epochs=2).fit(Tiny(), loader(12))
    assert len([w for w in record if "observing" in str(w.message)]) == 1
    assert cb.optimizer.mode == "observe" and cb.optimizer.chosen == 300


def test_no_gpu_says_so_once_and_does_nothing() -> None:
    cb = ZeusCallback()
    with pytest.warns(UserWarning, match="no CUDA device") as record:
        trainer([cb], max_epochs=2).fit(Tiny(), loader(4))
    assert len([w for w in record if "no CUDA device" in str(w.message)]) == 1
    assert cb.optimizer is None


@pytest.mark.parametrize("kwargs, field", [({"eta_knob": 1.2}, "eta_knob"), ({"eta_knob": -1.0}, "eta_knob"),
                                           ({"pl_step_watts": 0}, "pl_step_watts"),
                                           ({"profile_steps": 0}, "profile_steps")])
def test_bad_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ZeusCallback(**kwargs)


@pytest.mark.slow
def test_ddp_two_processes_sum_energy_max_time(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(HERE / "zeus_ddp_job.py"), str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    from tests.callbacks.zeus_ddp_job import BATCH, PROFILES, PROFILE_STEPS

    for r in results:
        assert r["measurements"] == results[0]["measurements"]  # identical aggregates on both
        assert r["chosen"] == results[0]["chosen"]
        assert r["final_limit"] == 300  # each restored its own GPU
    for m in results[0]["measurements"]:
        limit = m["power_limit"]
        assert m["samples"] == 2 * PROFILE_STEPS * BATCH
        assert m["energy_j"] == pytest.approx(sum(PROFILE_STEPS * p.power(limit) * p.step_time(limit)
                                                  for p in PROFILES))
        assert m["time_s"] == pytest.approx(max(PROFILE_STEPS * p.step_time(limit) for p in PROFILES))
    best = brute_force_limit(PROFILE, candidate_limits(100, 300, 50), 0.5, 600.0, BATCH, ranks=PROFILES)
    assert results[0]["chosen"] == best
    assert all(r["set_calls"] and r["set_calls"][-2] == best for r in results)
    # EnergyMonitor in the same job: both epochs together hold both GPUs' energy, and the time
    # of the slower process; its samples are both ranks'.
    epochs = results[0]["monitor"]
    assert epochs == results[1]["monitor"] and len(epochs) == 2
    assert sum(h["energy/epoch_J"] for h in epochs) == pytest.approx(sum(r["fake_energy_j"] for r in results))
    assert sum(h["energy/epoch_time_s"] for h in epochs) == pytest.approx(max(r["fake_time_s"] for r in results))
    assert all(h["samples"] == 40 * BATCH for h in epochs)  # 20 steps per rank and epoch


@pytest.mark.slow  # the real quickstart model and data through the CLI
@needs_fmnist
def test_yaml_simulated_quickstart_runs(tmp_path: Path) -> None:
    from lit.cli import main

    override = tmp_path / "small.yaml"
    cfg = yaml.safe_load((CONFIGS / "quickstart_zeus_simulated.yaml").read_text())
    callbacks = cfg["trainer"]["callbacks"]
    for cb in callbacks:
        if cb["class_path"] == "callbacks.ZeusCallback":
            cb["init_args"].update(warmup_steps=1, profile_steps=2, pl_step_watts=100,
                                   profile_path=str(tmp_path / "zeus.json"))
        if cb["class_path"] == "callbacks.SimulatedGPU":
            cb["init_args"] = {"state_path": str(tmp_path / "limits.json")}
    override.write_text(yaml.safe_dump({"trainer": {"max_epochs": 1, "limit_train_batches": 20,
                                                    "limit_val_batches": 2, "callbacks": callbacks},
                                        "test_after_fit": False}))
    main(["fit", "--config", str(CONFIGS / "quickstart_zeus_simulated.yaml"), "--config", str(override),
          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    profile = json.loads((tmp_path / "zeus.json").read_text())
    assert [m["power_limit"] for m in profile["measurements"]] == [700, 600, 500, 400, 300, 200]
    assert json.loads((tmp_path / "limits.json").read_text())["limits"] == [700]  # restored
