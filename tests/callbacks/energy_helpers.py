"""Shared pieces of the energy callback tests: a tiny model, a loader, and a callback that runs
one simulated GPU step of a :class:`lit.energy.fake.FakeNVML` per training (and validation) step,
and the brute-force references the power-limit choices are tested against."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lit.energy.fake import FakeNVML, PowerProfile

# A hand-made profile: 100-300 W, time falls and power rises with the limit.
PROFILE = PowerProfile(limits=(100, 150, 200, 250, 300), step_time_s=(0.40, 0.25, 0.20, 0.18, 0.17),
                       power_w=(90.0, 140.0, 185.0, 240.0, 290.0))


class Tiny(LightningModule):
    """Linear classifier; ``fail_at`` raises in that global step (exception paths)."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(batches: int, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = batches * batch_size
    data = TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)


class StepFake(Callback):
    """Advance ``fake`` by one step per training batch (and per validation batch if asked)."""

    def __init__(self, fake: FakeNVML, on_validation: bool = False) -> None:
        self.fake = fake
        self.on_validation = on_validation

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.fake.step()

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx: int = 0) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self.fake.step()


def trainer(callbacks: list[Callback], max_epochs: int = 1, **kwargs) -> Trainer:
    kwargs.setdefault("logger", False)
    return Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, **kwargs)


def brute_force_limit(profile: PowerProfile, candidates: list[int], eta: float, max_power: float,
                      batch: int, ranks: list[PowerProfile] | None = None) -> int:
    """argmin over ``candidates`` of the per-sample Zeus cost, straight from the profile(s) in
    float64: energy = sum over ranks of power x step time, time = the slowest rank's step time."""
    profiles = ranks or [profile]
    best, best_cost = None, None
    for limit in candidates:  # max -> min: strict '<' keeps the higher limit on ties
        energy = sum(p.power(limit) * p.step_time(limit) for p in profiles) / (batch * len(profiles))
        time_s = max(p.step_time(limit) for p in profiles) / (batch * len(profiles))
        cost = eta * energy + (1 - eta) * max_power * time_s
        if best_cost is None or cost < best_cost * (1 - 1e-9):
            best, best_cost = limit, cost
    return best


def brute_force_within_slowdown(profile: PowerProfile, candidates: list[int], factor: float,
                                ranks: list[PowerProfile] | None = None) -> int:
    """The lowest of ``candidates`` whose step time (the slowest rank's, straight from the
    profile(s)) is at most ``factor`` x the fastest candidate's. Fails when a candidate sits on
    the bound (within a relative 1e-6): there rounding, not the rule, would decide."""
    profiles = ranks or [profile]
    times = {limit: max(p.step_time(limit) for p in profiles) for limit in candidates}
    bound = factor * min(times.values())
    assert all(abs(t - bound) > 1e-6 * bound for t in times.values() if t != min(times.values())), \
        f"a candidate sits on the slowdown bound {bound!r}: pick another factor"
    return min(limit for limit, t in times.items() if t <= bound)
