"""A training job for the SIGTERM test: ZeusCallback on a fake GPU whose limits are mirrored to
the file given as argument; steps are slowed so that the test can signal it mid-profile."""

from __future__ import annotations

import sys
import time

from lightning.pytorch import Callback

from callbacks.zeus import ZeusCallback
from lit.energy.fake import FakeNVML
from tests.callbacks.energy_helpers import PROFILE, StepFake, Tiny, loader, trainer


class Slow(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(0.02)


if __name__ == "__main__":
    fake = FakeNVML(PROFILE, state_path=sys.argv[1])
    cb = ZeusCallback(warmup_steps=5, profile_steps=20, pl_step_watts=50)
    cb.nvml = fake
    trainer([StepFake(fake), Slow(), cb], max_epochs=100).fit(Tiny(), loader(50))
