"""EnergyMonitor inside a real Trainer on the CPU against a fake GPU: energy, power and J per
sample equal the fake's power model summed by hand; validation is left out; the counter-less
fallback agrees; TensorBoard-style logging; bad arguments; no GPU."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger

from callbacks.energy_monitor import EnergyMonitor
from lit.energy.fake import FakeNVML
from tests.callbacks.energy_helpers import PROFILE, StepFake, Tiny, loader, trainer

BATCH = 8


def monitor(fake: FakeNVML, **kwargs) -> EnergyMonitor:
    cb = EnergyMonitor(**kwargs)
    cb.nvml = fake
    return cb


@pytest.mark.parametrize("counter", [True, False])
def test_epoch_and_interval_figures_match_the_power_model(counter: bool) -> None:
    fake = FakeNVML(PROFILE, power_limit=200, energy_counter=counter)
    cb = monitor(fake, log_every_n_steps=4)
    # Validation steps also run on the fake GPU; they must not count as training energy.
    t = trainer([StepFake(fake, on_validation=True), cb], max_epochs=2, val_check_interval=5)
    t.fit(Tiny(), loader(10), loader(3))
    step_t, power = PROFILE.step_time(200), PROFILE.power(200)
    epochs = [h for h in cb.history if "energy/epoch_J" in h]
    intervals = [h for h in cb.history if "energy/J_per_sample" in h]
    assert len(epochs) == 2 and len(intervals) == 4  # steps 4 and 8 of each 10-step epoch
    for h in epochs:
        assert h["samples"] == 10 * BATCH
        assert h["energy/epoch_J"] == pytest.approx(10 * step_t * power)
        assert h["energy/epoch_time_s"] == pytest.approx(10 * step_t)
        assert h["energy/epoch_power_W"] == pytest.approx(power)
        assert h["energy/epoch_J_per_sample"] == pytest.approx(step_t * power / BATCH)
    for h in intervals:  # intervals 1-4 and 5-8 each span a validation run at step 5
        assert h["samples"] == 4 * BATCH
        assert h["energy/J_per_sample"] == pytest.approx(step_t * power / BATCH)
        assert h["energy/power_W"] == pytest.approx(power)


def test_limit_change_mid_epoch_is_integrated() -> None:
    fake = FakeNVML(PROFILE)

    class Lower(StepFake):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if batch_idx == 2:
                self.fake.set_power_limit(0, 100)

    cb = monitor(fake, log_every_n_steps=None)
    trainer([Lower(fake), cb]).fit(Tiny(), loader(5))
    (h,) = cb.history
    expected = 3 * PROFILE.step_time(300) * PROFILE.power(300) + 2 * PROFILE.step_time(100) * PROFILE.power(100)
    assert h["energy/epoch_J"] == pytest.approx(expected)


def test_logged_to_the_trainer_logger(tmp_path: Path) -> None:
    fake = FakeNVML(PROFILE)
    cb = monitor(fake, log_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="e")
    trainer([StepFake(fake), cb], logger=logger).fit(Tiny(), loader(6))
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    keys = {k for r in rows for k, v in r.items() if v}
    assert {"energy/J_per_sample", "energy/power_W", "energy/epoch_J", "energy/epoch_J_per_sample",
            "energy/epoch_power_W", "energy/epoch_time_s"} <= keys


def test_bad_argument() -> None:
    with pytest.raises(ValueError, match="log_every_n_steps"):
        EnergyMonitor(log_every_n_steps=0)


def test_no_gpu_says_so_once_and_does_nothing() -> None:
    cb = EnergyMonitor()
    with pytest.warns(UserWarning, match="no CUDA device") as record:
        trainer([cb], max_epochs=2).fit(Tiny(), loader(3))
    assert len([w for w in record if "no CUDA device" in str(w.message)]) == 1
    assert cb.history == []
