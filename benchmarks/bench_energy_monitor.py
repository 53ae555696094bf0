"""EnergyMonitor on a real GPU (read-only NVML): J per image, average power, overhead.

DeiT-S/16 at 224 (timm), batch 256, bf16-mixed, AdamW, images generated on the GPU (the
energy of the step, not of a data pipeline). Rounds alternate a fit without any callback and a
fit with ``EnergyMonitor(log_every_n_steps=N)``; each times ``--steps`` steps after ``--warmup``
with one device sync at each end. A final fit runs ``ZeusCallback(mode="observe")`` to record
the profile at the limit in force. Nothing is ever set on the GPU: the NVML used here refuses
to set. Prints a table and writes ``--out`` (JSON).

    python benchmarks/bench_energy_monitor.py --rounds 3 --steps 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.energy_monitor import EnergyMonitor  # noqa: E402
from callbacks.zeus import ZeusCallback  # noqa: E402
from lit.energy.meter import EnergyMeter  # noqa: E402
from lit.energy.nvml import PynvmlNVML  # noqa: E402


class ReadOnlyNVML(PynvmlNVML):
    """The real NVML with its setter disabled: this benchmark must never change the GPU."""

    def set_power_limit(self, index: int, watts: int) -> None:
        raise RuntimeError("read-only benchmark: refusing to set a power limit")


class Labels(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i % 1000


class DeiT(LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        import timm

        self.net = timm.create_model(name, num_classes=1000)

    def training_step(self, batch, batch_idx):
        x = torch.randn(batch.shape[0], 3, 224, 224, device=self.device)
        return F.cross_entropy(self.net(x), batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4, fused=True)


class StepTimer(Callback):
    """Seconds per step over steps ``warmup .. warmup + steps`` (sync at both ends only)."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.t0 = self.seconds = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup - 1:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        elif batch_idx == self.warmup + self.steps - 1:
            torch.cuda.synchronize()
            self.seconds = (time.perf_counter() - self.t0) / self.steps


def fit(model: DeiT, batch: int, warmup: int, steps: int, callbacks: list[Callback]) -> StepTimer:
    timer = StepTimer(warmup, steps)
    loader = DataLoader(Labels(batch * (warmup + steps)), batch_size=batch, drop_last=True)
    trainer = Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[timer, *callbacks])
    trainer.fit(model, loader)
    return timer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", default="energy_monitor.json")
    args = p.parse_args()

    nvml = ReadOnlyNVML()
    info = {"gpu": torch.cuda.get_device_name(0), "limit_W": nvml.power_limit(0),
            "limit_range_W": nvml.power_limit_range(0), "idle_power_W": nvml.power_usage(0)}
    print(info, flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = DeiT(args.model)
    meter = EnergyMeter(nvml, [0], torch.cuda.synchronize)
    rows: dict[str, list[float]] = {"none": [], "monitor": []}
    monitor_rows, whole_fit = [], []
    fit(model, args.batch, 10, 10, [])  # compile kernels, allocator warm-up
    for r in range(args.rounds):
        for variant in ("none", "monitor") if r % 2 == 0 else ("monitor", "none"):
            cbs: list[Callback] = []
            if variant == "monitor":
                mon = EnergyMonitor(log_every_n_steps=args.log_every)
                mon.nvml = nvml
                cbs = [mon]
            start = meter.read()
            timer = fit(model, args.batch, args.warmup, args.steps, cbs)
            whole = meter.since(start)
            rows[variant].append(timer.seconds)
            if variant == "monitor":
                monitor_rows.append(mon.history[-1])
                whole_fit.append({"J": whole.energy_j, "s": whole.time_s, "method": whole.method})
            print(f"round {r} {variant:8s} {1e3 * timer.seconds:.2f} ms/step", flush=True)

    zeus = ZeusCallback(mode="observe", warmup_steps=args.warmup, profile_steps=args.steps)
    zeus.nvml = nvml
    fit(model, args.batch, args.warmup, args.steps + 5, [zeus])
    profile = [m.__dict__ for m in zeus.optimizer.measurements]

    base, mon = statistics.median(rows["none"]), statistics.median(rows["monitor"])
    epoch = monitor_rows[-1]
    print(f"\n| run | ms/step (median of {args.rounds}) | img/s | ratio |")
    print("|---|---|---|---|")
    print(f"| no callback | {1e3 * base:.2f} | {args.batch / base:.0f} | 1.000 |")
    print(f"| EnergyMonitor(log_every_n_steps={args.log_every}) | {1e3 * mon:.2f} | "
          f"{args.batch / mon:.0f} | {mon / base:.3f} |")
    print(f"\nEnergyMonitor last epoch: {epoch['energy/epoch_J_per_sample']:.4f} J/image, "
          f"{epoch['energy/epoch_power_W']:.1f} W average, {epoch['energy/epoch_J']:.0f} J over "
          f"{epoch['samples']:.0f} images")
    for m in profile:
        print(f"observe profile at {m['power_limit']} W: {m['energy_j'] / m['samples']:.4f} J/image, "
              f"{1e3 * m['time_s'] / m['samples']:.4f} ms/image, {m['energy_j'] / m['time_s']:.1f} W")
    Path(args.out).write_text(json.dumps({"args": vars(args), "info": info, "step_s": rows,
                                          "monitor": monitor_rows, "whole_fit": whole_fit,
                                          "observe_profile": profile}, indent=1))


if __name__ == "__main__":
    main()
