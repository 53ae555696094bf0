"""A 2-process (gloo, CPU) job for the DDP test: each rank has its own fake GPU with a different
profile; each writes what its ZeusCallback measured and chose to DIR/rank{r}.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lightning.pytorch import Trainer

from callbacks.energy_monitor import EnergyMonitor
from callbacks.zeus import ZeusCallback
from lit.nvml import FakeNVML, PowerProfile
from tests.callbacks.energy_helpers import PROFILE, StepFake, Tiny, loader

BATCH, PROFILE_STEPS = 8, 3
# Rank 1's GPU is slower and draws more: time is its, energy both together.
PROFILES = [PROFILE, PowerProfile(PROFILE.limits, tuple(1.5 * t for t in PROFILE.step_time_s),
                                  tuple(0.9 * p for p in PROFILE.power_w))]

if __name__ == "__main__":
    out = Path(sys.argv[1])
    cb = ZeusCallback(warmup_steps=2, profile_steps=PROFILE_STEPS, pl_step_watts=50)
    monitor = EnergyMonitor(log_every_n_steps=None)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[monitor, cb])
    fake = FakeNVML(PROFILES[trainer.global_rank])
    cb.nvml = monitor.nvml = fake
    trainer.callbacks.insert(0, StepFake(fake))
    trainer.fit(Tiny(), loader(40, BATCH))
    opt = cb.optimizer
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "measurements": [m.__dict__ for m in opt.measurements], "chosen": opt.chosen,
        "set_calls": [w for _, w in fake.set_calls], "final_limit": fake.power_limit(0),
        "fake_energy_j": fake.energy_j[0], "fake_time_s": fake.clock(), "monitor": monitor.history}))
