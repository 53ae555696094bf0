"""Zeus's power-limit optimizer on a simulated H200: energy and time of a whole training run.

The GPU is :class:`lit.energy.fake.FakeNVML` fed :func:`lit.energy.fake.h200_like_profile`
(limits 200-700 W) anchored at what DeiT-S (batch 256, bf16) measured on one H200 at its 700 W
limit (``benchmarks/bench_energy_monitor.py``): 636 W drawn, 45.3 ms per step, 82 W idle. How
much of the step slows down with the clock (``--memory-bound``: the share that does not) is not
measured, so three values are shown. Each run trains ``--epochs`` x ``--steps-per-epoch`` steps
with :class:`lit.energy.power_limit.PowerLimitOptimizer` (profiling included, exactly what
:class:`callbacks.ZeusCallback` runs), against the same run at the maximum limit and at the
brute-force optimum (best fixed limit over the 21 candidates, no profiling cost). ``--noise``
adds relative Gaussian noise to every step time (the measurements then see noise, the totals
too).

    python benchmarks/zeus_simulate.py
"""

from __future__ import annotations

import argparse
import random

from lit.energy.cost import zeus_cost
from lit.energy.fake import FakeNVML, PowerProfile, h200_like_profile
from lit.energy.power_limit import PowerLimitOptimizer, candidate_limits

BATCH = 256


class NoisyFake(FakeNVML):
    def __init__(self, profile: PowerProfile, noise: float, seed: int) -> None:
        super().__init__(profile)
        self.noise, self.rng = noise, random.Random(seed)

    def step(self) -> float:
        scale = max(0.5, 1.0 + self.noise * self.rng.gauss(0.0, 1.0))
        t = self.profile.step_time(self.limits[0]) * scale
        self.energy_j[0] += self.profile.power(self.limits[0]) * t
        self.time_s += t
        return t


def train(profile: PowerProfile, steps_per_epoch: int, epochs: int, noise: float, seed: int,
          eta: float | None, fixed: int | None = None) -> tuple[float, float, int]:
    """(energy J, time s, final limit) of a run with Zeus (``eta``) or at a ``fixed`` limit."""
    fake = NoisyFake(profile, noise, seed)
    opt = None
    if fixed is not None:
        fake.set_power_limit(0, fixed)
    else:
        opt = PowerLimitOptimizer(fake, 0, eta_knob=eta, warmup_steps=10, profile_steps=40,
                                  pl_step_watts=25, info=lambda s: None)
    for epoch in range(epochs):
        if opt:
            opt.on_epoch_begin(epoch)
        for _ in range(steps_per_epoch):
            if opt:
                opt.on_step_begin()
            fake.step()
            if opt:
                opt.on_step_end(BATCH)
        if opt:
            opt.interrupt()
    return fake.energy_j[0], fake.clock(), (opt.chosen if opt else fixed)


def brute_force(profile: PowerProfile, eta: float) -> int:
    def cost(limit: int) -> float:
        t = profile.step_time(limit)
        return zeus_cost(profile.power(limit) * t, t, eta, 700.0)
    return min(candidate_limits(200, 700, 25), key=lambda w: (cost(w), -w))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--etas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--memory-bound", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    p.add_argument("--steps-per-epoch", type=int, default=5004, help="ImageNet at batch 256")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.02])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    print(f"{args.epochs} epochs x {args.steps_per_epoch} steps, batch {BATCH}; energy and time "
          "relative to the same run at 700 W; cost relative to the brute-force optimum's run\n")
    print("| memory-bound | noise | eta | chosen W | optimum W | energy vs 700 W | time vs 700 W "
          "| cost vs optimum |")
    print("|---|---|---|---|---|---|---|---|")
    for mb in args.memory_bound:
        profile = h200_like_profile(demand_w=636.0, idle_w=82.0, step_time_s=0.0453, memory_bound=mb)
        for noise in args.noise:
            e_max, t_max, _ = train(profile, args.steps_per_epoch, args.epochs, noise, args.seed, None, 700)
            for eta in args.etas:
                best = brute_force(profile, eta)
                e_z, t_z, chosen = train(profile, args.steps_per_epoch, args.epochs, noise, args.seed, eta)
                e_b, t_b, _ = train(profile, args.steps_per_epoch, args.epochs, noise, args.seed, None, best)
                c_z = zeus_cost(e_z, t_z, eta, 700.0)
                c_b = zeus_cost(e_b, t_b, eta, 700.0)
                print(f"| {mb} | {noise} | {eta} | {chosen} | {best} | {e_z / e_max:.3f} | "
                      f"{t_z / t_max:.3f} | {c_z / c_b:.4f} |", flush=True)


if __name__ == "__main__":
    main()
