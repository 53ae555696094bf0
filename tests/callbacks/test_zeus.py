"""ZeusCallback inside a real Trainer on the CPU against a fake GPU: the choice equals a
brute-force reference (lowest cost, or lowest limit within a slowdown), a cut epoch resumes the
profile, a checkpoint resumes it in a fresh Trainer, the original limit comes back at the end, on
exceptions and on SIGTERM (a real subprocess), profiles are reused, observe mode never sets,
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
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.zeus import ZeusCallback
from lit.energy.fake import FakeNVML
from lit.energy.power_limit import Done, candidate_limits
from tests.callbacks.energy_helpers import (PROFILE, StepFake, Tiny, brute_force_limit,
                                            brute_force_within_slowdown, loader, trainer)
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
    # Every set: the profiled limits (300 W is in force already), the optimum from the last one
    # (100 W), then the original limit back at fit end. Nothing else, in the second epoch neither.
    expected = [250, 200, 150, 100] + ([best] if best != 100 else []) + ([300] if best != 300 else [])
    assert [w for _, w in fake.set_calls] == expected
    assert fake.power_limit(0) == 300
    if eta == 0.0:  # time only: the profile's step time falls with every step up in the limit
        assert best == 300 and expected == [250, 200, 150, 100, 300]
    if eta == 1.0:  # energy only: J per step 36, 35, 37, 43.2, 49.3 at 100 ... 300 W
        assert best == 150


@pytest.mark.parametrize("factor", [1.1, 1.2, 1.5])
def test_max_slowdown_choice_equals_brute_force_in_a_trainer(factor: float) -> None:
    fake = FakeNVML(PROFILE)
    cb = zeus(fake, max_slowdown=factor)
    trainer([StepFake(fake), cb], max_epochs=1).fit(Tiny(), loader(30))
    best = brute_force_within_slowdown(PROFILE, candidate_limits(100, 300, 50), factor)
    assert best == {1.1: 250, 1.2: 200, 1.5: 150}[factor]  # by hand: 0.17 s x factor vs the steps
    assert cb.optimizer.chosen == best
    assert [w for _, w in fake.set_calls][-2:] == [best, 300]  # applied, then restored


class LimitLog(Callback):
    """Appends the limit in force to ``limits`` as each training step starts (listed after Zeus)."""

    def __init__(self, fake: FakeNVML, limits: list[int]) -> None:
        self.fake, self.limits = fake, limits

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.limits.append(self.fake.power_limit(0))


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_checkpoint_resume_continues_the_profile(tmp_path: Path) -> None:
    straight_fake = FakeNVML(PROFILE)
    straight = zeus(straight_fake)
    trainer([StepFake(straight_fake), straight]).fit(Tiny(), loader(40))

    def run(fake: FakeNVML, cb: ZeusCallback, log: list[int], **kwargs) -> Trainer:
        saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=8, save_top_k=-1)
        return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                       callbacks=[StepFake(fake), cb, LimitLog(fake, log), saver], **kwargs)

    first_fake = FakeNVML(PROFILE)
    first = zeus(first_fake)
    # 5 steps per limit: step 8 is the first profiled step of 250 W; the run stops at step 9.
    run(first_fake, first, [], max_steps=9).fit(Tiny(), loader(40))
    assert first_fake.power_limit(0) == 300  # restored when the first run ended
    path = tmp_path / "step=8.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"][first.state_key]
    assert (saved["state"], saved["limit"]) == ("Ready", 250)  # the open window is not kept
    assert [m["power_limit"] for m in saved["measurements"]] == [300]

    second_fake = FakeNVML(PROFILE)  # a fresh process: a fresh GPU handle at the original limit
    second = zeus(second_fake)
    steps: list[int] = []  # the limit each training step of the resumed run ran at
    run(second_fake, second, steps, max_epochs=1).fit(Tiny(), loader(40), ckpt_path=path)
    ms = second.optimizer.measurements
    assert [m.power_limit for m in ms] == [300, 250, 200, 150, 100]  # none profiled twice
    assert steps[:20] == [w for w in (250, 200, 150, 100) for _ in range(5)]  # on from 250 W
    assert steps[20] == second.optimizer.chosen
    for m in ms[1:]:  # the resumed windows measured their own limit only
        assert m.samples == 3 * 8 and m.time_s == pytest.approx(3 * PROFILE.step_time(m.power_limit))
    best = brute_force_limit(PROFILE, candidate_limits(100, 300, 50), 0.5, 300.0, batch=8)
    assert second.optimizer.chosen == straight.optimizer.chosen == best
    assert second_fake.power_limit(0) == 300


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
                                           ({"profile_steps": 0}, "profile_steps"),
                                           ({"max_slowdown": 0.95}, "max_slowdown"),
                                           ({"max_slowdown": -1.1}, "max_slowdown")])
def test_bad_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ZeusCallback(**kwargs)


def test_max_slowdown_from_yaml() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callback", type=Callback)

    def build(init_args: dict) -> Callback:
        doc = {"callback": {"class_path": "callbacks.ZeusCallback", "init_args": init_args}}
        return parser.instantiate_classes(parser.parse_string(yaml.safe_dump(doc))).callback

    cb = build({"max_slowdown": 1.1, "profile_steps": 20})
    assert isinstance(cb, ZeusCallback) and (cb.max_slowdown, cb.profile_steps) == (1.1, 20)
    assert build({}).max_slowdown is None  # the eta_knob cost by default
    with pytest.raises(ValueError, match="max_slowdown must be a factor >= 1.0"):
        build({"max_slowdown": 0.8})


@pytest.mark.slow
def test_ddp_two_processes_sum_energy_max_time(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(HERE / "zeus_ddp_job.py"), str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    from tests.callbacks.zeus_ddp_job import BATCH, PROFILE_STEPS, PROFILES, probe_values

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
    # BatchSizeTarget sums the two GPUs' own energies (not rank 0's times the world size).
    target = json.loads((tmp_path / "batch_size_target.json").read_text())
    assert target["status"] == "not_reached" and target["max_power_w"] == 600
    assert target["energy_j"] == pytest.approx(sum(r["fake_energy_j"] for r in results))
    assert target["energy_j"] != pytest.approx(2 * results[0]["fake_energy_j"])
    # The reduction itself, on rank-specific numbers worked by hand: energy and samples summed
    # (1.5 + 2.5, 3 + 4), time the larger (1 and 11).
    assert [probe_values(0), probe_values(1)] == [(1.5, 1.0, 3), (2.5, 11.0, 4)]
    assert all(r["reduced"] == [4.0, 11.0, 7] for r in results)


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
