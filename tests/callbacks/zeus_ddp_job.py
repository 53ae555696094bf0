"""A 2-process (gloo, CPU) job for the DDP test: each rank has its own fake GPU with a different
profile; each writes what its ZeusCallback measured and chose, what its EnergyMonitor logged and
what :func:`lit.energy.aggregate.reduce_over_ranks` gave for rank-specific numbers to
DIR/rank{r}.json; rank 0's BatchSizeTarget writes DIR/batch_size_target.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lightning.pytorch import Callback, Trainer

from callbacks.batch_size_target import BatchSizeTarget
from callbacks.energy_monitor import EnergyMonitor
from callbacks.zeus import ZeusCallback
from lit.energy.aggregate import reduce_over_ranks
from lit.energy.fake import FakeNVML, PowerProfile
from tests.callbacks.energy_helpers import PROFILE, StepFake, Tiny, loader

BATCH, PROFILE_STEPS = 8, 3
# Rank 1's GPU is slower and draws more: time is its, energy both together.
PROFILES = [PROFILE, PowerProfile(PROFILE.limits, tuple(1.5 * t for t in PROFILE.step_time_s),
                                  tuple(0.9 * p for p in PROFILE.power_w))]


def probe_values(rank: int) -> tuple[float, float, int]:
    """What each rank feeds the reduction: sums and maxima differ from rank 0's own values."""
    return 1.5 + rank, 10.0 * rank + 1.0, 3 + rank


class ReduceProbe(Callback):
    """Calls the reduction once at the end of training, on every rank at the same point."""

    result: tuple[float, float, int] | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.result = reduce_over_ranks(trainer.strategy, *probe_values(trainer.global_rank))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    cb = ZeusCallback(warmup_steps=2, profile_steps=PROFILE_STEPS, pl_step_watts=50)
    monitor = EnergyMonitor(log_every_n_steps=None)
    target = BatchSizeTarget(result_path=str(out / "batch_size_target.json"))  # no validation: never met
    probe = ReduceProbe()
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[monitor, cb, target, probe])
    fake = FakeNVML(PROFILES[trainer.global_rank])
    cb.nvml = monitor.nvml = target.nvml = fake
    trainer.callbacks.insert(0, StepFake(fake))
    trainer.fit(Tiny(), loader(40, BATCH))
    opt = cb.optimizer
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "measurements": [m.__dict__ for m in opt.measurements], "chosen": opt.chosen,
        "set_calls": [w for _, w in fake.set_calls], "final_limit": fake.power_limit(0),
        "fake_energy_j": fake.energy_j[0], "fake_time_s": fake.clock(), "monitor": monitor.history,
        "reduced": probe.result}))
