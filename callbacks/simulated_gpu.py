"""A simulated GPU for the energy callbacks: Zeus's decisions on a CPU, from YAML.

:class:`SimulatedGPU` gives every :class:`callbacks.EnergyMonitor` and
:class:`callbacks.ZeusCallback` of the run a :class:`lit.energy.fake.FakeNVML` (one GPU per process)
and runs one simulated GPU step per training step, so the power-limit search, the profile file
and the restore paths can be tried end to end without a GPU, and without touching one.
The real training still runs (on the CPU); only power, energy and time come from the profile.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lit.energy.fake import FakeNVML, PowerProfile, h200_like_profile


class SimulatedGPU(Callback):
    """Measure the energy callbacks against a simulated GPU. List it before them.

    Args:
        profile_path: JSON ``{"rows": [[limit W, step time s, power W], ...]}``; ``null``:
            the H200-like model of :func:`lit.energy.fake.h200_like_profile` (200-700 W).
        state_path: a JSON file mirroring the simulated limits on every change (``null``: none).
    """

    def __init__(self, profile_path: str | None = None, state_path: str | None = None) -> None:
        self.profile_path = profile_path
        self.state_path = state_path
        self.fake: FakeNVML | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from callbacks.energy_monitor import EnergyMonitor
        from callbacks.zeus import ZeusCallback

        profile = (h200_like_profile() if self.profile_path is None
                   else PowerProfile.from_json(self.profile_path))
        state_path = self.state_path
        if state_path is not None and trainer.world_size > 1:
            state_path = f"{state_path}.rank{trainer.global_rank}"
        self.fake = FakeNVML(profile, state_path=state_path)
        mine = trainer.callbacks.index(self)
        for i, cb in enumerate(trainer.callbacks):
            if isinstance(cb, (EnergyMonitor, ZeusCallback)):
                if i < mine:
                    raise ValueError(f"list callbacks.SimulatedGPU before {type(cb).__name__} in "
                                     "trainer.callbacks: it must finish a simulated step before they read it")
                cb.nvml = self.fake

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.fake is not None:
            self.fake.step()
