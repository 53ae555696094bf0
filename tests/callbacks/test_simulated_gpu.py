"""SimulatedGPU: it hands its fake GPU to the energy callbacks and runs one simulated step per
training step; listed after them it is an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from callbacks.energy_monitor import EnergyMonitor
from callbacks.simulated_gpu import SimulatedGPU
from callbacks.zeus import ZeusCallback
from tests.callbacks.energy_helpers import PROFILE, Tiny, loader, trainer


def test_drives_the_energy_callbacks_from_a_profile_file(tmp_path: Path) -> None:
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps({"rows": [[w, t, p] for w, t, p in
                                         zip(PROFILE.limits, PROFILE.step_time_s, PROFILE.power_w)]}))
    sim = SimulatedGPU(profile_path=str(rows), state_path=str(tmp_path / "limits.json"))
    mon = EnergyMonitor(log_every_n_steps=None)
    zeus = ZeusCallback(warmup_steps=1, profile_steps=2, pl_step_watts=100)
    trainer([sim, mon, zeus]).fit(Tiny(), loader(12))
    assert mon.nvml is sim.fake and zeus.nvml is sim.fake
    assert [m.power_limit for m in zeus.optimizer.measurements] == [300, 200, 100]
    assert mon.history[0]["energy/epoch_J"] == pytest.approx(sum(sim.fake.energy_j))
    assert json.loads((tmp_path / "limits.json").read_text())["limits"] == [300]  # restored


def test_must_come_first() -> None:
    with pytest.raises(ValueError, match="before EnergyMonitor"):
        trainer([EnergyMonitor(), SimulatedGPU()]).fit(Tiny(), loader(2))
