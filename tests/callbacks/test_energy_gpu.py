"""The energy callbacks on a real GPU through NVML, read-only: the setter is disabled here, so
nothing on the GPU changes (observe mode would not call it anyway)."""

from __future__ import annotations

import pytest
import torch

from callbacks.energy_monitor import EnergyMonitor
from callbacks.zeus import ZeusCallback
from lit.energy.nvml import PynvmlNVML
from tests.callbacks.energy_helpers import Tiny, loader

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, index: int, watts: int) -> None:
        raise AssertionError("a test tried to set a GPU power limit")

    monkeypatch.setattr(PynvmlNVML, "set_power_limit", refuse)


class Busy(Tiny):
    """Enough matmul work per step for the energy counter to tick."""

    def training_step(self, batch, batch_idx):
        a = torch.randn(4096, 4096, device=self.device)
        for _ in range(20):
            a = torch.tanh(a @ a)
        return super().training_step(batch, batch_idx) + 0 * a.mean()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_monitor_and_observe_on_a_real_gpu() -> None:
    from lightning.pytorch import Trainer

    nvml = PynvmlNVML()
    before = nvml.power_limit(0)
    lo, hi = nvml.power_limit_range(0)
    assert lo <= before <= hi and nvml.total_energy(0) is not None
    mon = EnergyMonitor(log_every_n_steps=20)
    zeus = ZeusCallback(mode="observe", warmup_steps=5, profile_steps=20)
    Trainer(accelerator="gpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, callbacks=[mon, zeus]).fit(Busy(), loader(40))
    epoch = mon.history[-1]
    assert 0.5 * lo < epoch["energy/epoch_power_W"] < 1.2 * hi
    assert epoch["energy/epoch_J"] > 0 and epoch["samples"] == 40 * 8
    (m,) = zeus.optimizer.measurements
    assert m.power_limit == before and m.samples == 20 * 8 and m.energy_j > 0
    assert zeus.optimizer.chosen == before and nvml.power_limit(0) == before
