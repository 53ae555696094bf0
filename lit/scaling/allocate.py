"""Split a training-compute budget between data and model size with the fitted scaling laws.

The sweep measures one-at-a-time curves around a baseline model B trained on N_0 samples: the
data law ``L_N(N)`` (model B) and, for a knob k, ``L_k(x)`` (x = the parameters k grows, data
N_0). The paper gives no joint law; we combine them additively, the separable form of the
Kaplan / Chinchilla laws, anchored so that it reproduces both measured curves through B::

    L(N, x) = L_N(N) + L_k(x) - L_k(x_B)

A budget C (training FLOPs, 3 x forward FLOPs per sample x samples) fixes N = C / (3 f(x)),
where f(x), the forward FLOPs per sample of the model with k grown to x, is interpolated
log-log between the swept runs (linear extrapolation of the log-log ends beyond them). The
allocation minimises L over x within the measured range of k (widened by ``extrapolate``) with
scipy's bounded scalar minimiser; the CI is the percentile interval of the residual-bootstrap
fits of both laws at the chosen point (not calibrated: on held-out laws such intervals covered
85-92% at nominal 95%). A law that is not identified (:mod:`lit.scaling.power_law`) is not used:
a knob's is skipped, the data law's stops the command. Knobs that cost no FLOPs (V: lookups
are memory traffic, not arithmetic) leave N alone, so the law then favours the largest table
measured: its price is memory, which this budget ignores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lit.scaling.fit import CURVES, PowerLawFit, _float, fit_power_law, load_results, curve_points


@dataclass
class Allocation:
    """The best split for one strategy (a knob, or ``data`` only)."""

    strategy: str
    x: float               # the knob's parameter count (the baseline's for ``data``)
    samples: float         # N = C / (3 f(x))
    flops_per_sample: float
    loss: float
    loss_lo: float
    loss_hi: float
    extrapolated: bool     # N or x outside the measured range


def loglog_interp(xs, ys):
    """f(x) linear in log-log through the points (ends extended along the end segments)."""
    lx, ly = np.log(np.asarray(xs, dtype=np.float64)), np.log(np.asarray(ys, dtype=np.float64))
    order = np.argsort(lx)
    lx, ly = lx[order], ly[order]

    def f(x):
        t = math.log(x)
        if len(lx) == 1:
            return float(math.exp(ly[0]))
        if t <= lx[0]:
            i = 0
        elif t >= lx[-1]:
            i = len(lx) - 2
        else:
            return float(math.exp(np.interp(t, lx, ly)))
        slope = (ly[i + 1] - ly[i]) / (lx[i + 1] - lx[i]) if lx[i + 1] != lx[i] else 0.0
        return float(math.exp(ly[i] + slope * (t - lx[i])))

    return f


def allocate(compute: float, data_law: PowerLawFit, knob_law: PowerLawFit | None, x_base: float,
             flops_of_x, x_range: tuple[float, float], strategy: str) -> Allocation:
    """Minimise ``L_N(C / 3f(x)) + L_k(x) - L_k(x_base)`` over x in ``x_range``.

    With ``knob_law=None`` the model stays the baseline and all compute goes to data.
    """
    if compute <= 0:
        raise ValueError(f"compute must be > 0 FLOPs, got {compute!r}")

    def samples(x: float) -> float:
        return compute / (3.0 * flops_of_x(x))

    def loss(log_x: float) -> float:
        x = math.exp(log_x)
        extra = 0.0 if knob_law is None else float(knob_law.predict(x) - knob_law.predict(x_base))
        return float(data_law.predict(samples(x))) + extra

    if knob_law is None:
        x_best = x_base
    else:
        from scipy.optimize import minimize_scalar

        lo, hi = math.log(x_range[0]), math.log(x_range[1])
        result = minimize_scalar(loss, bounds=(lo, hi), method="bounded",
                                 options={"xatol": 1e-9})
        candidates = [result.x, lo, hi]  # the optimum may sit on a bound
        x_best = math.exp(min(candidates, key=loss))
    n = samples(x_best)
    boot = data_law.predict_boot([n])[:, 0]
    if knob_law is not None:
        count = min(len(boot), len(knob_law.boot))
        k = knob_law.predict_boot([x_best, x_base])
        boot = boot[:count] + (k[:count, 0] - k[:count, 1])
    lo_ci, hi_ci = data_law.interval(boot) if len(boot) else (math.nan, math.nan)
    outside = not (data_law.x.min() <= n <= data_law.x.max())
    if knob_law is not None:
        outside |= not (knob_law.x.min() * (1 - 1e-9) <= x_best <= knob_law.x.max() * (1 + 1e-9))
    return Allocation(strategy, x_best, n, flops_of_x(x_best), loss(math.log(x_best)), lo_ci,
                      hi_ci, outside)


def allocate_command(args) -> list[Allocation]:
    """``python -m lit.scaling allocate RESULTS.csv --compute C``: one row per strategy."""
    if args.extrapolate < 1:
        raise SystemExit(f"allocate: --extrapolate must be >= 1, got {args.extrapolate!r}")
    rows = load_results(args.results, [args.metric])
    x, y = curve_points(rows, "N", args.metric)
    data_law = fit_power_law(x, y, args.bootstrap, args.confidence, args.seed)
    if not data_law.identified:
        raise SystemExit(f"allocate: the data law ({args.metric} vs N) is not identified "
                         f"({data_law.reason}), so it cannot be extrapolated; add N points or "
                         f"widen the N range")
    baseline = [r for r in rows if r["role"] == "baseline"]
    if not baseline:
        raise SystemExit("allocate: the results table has no baseline run (role baseline)")
    base = baseline[0]
    allocations = [allocate(args.compute, data_law, None, 1.0,
                            lambda _x: _float(base["forward_flops_per_sample"]), (1.0, 1.0), "data")]
    skipped = []
    for knob in ("V", "H", "M", "O"):
        roles, x_col = CURVES[knob]
        picked = [r for r in rows if r["role"] in roles]
        kx, ky = curve_points(rows, knob, args.metric)
        if len(kx) < 4 or len(np.unique(kx)) < 3:
            skipped.append(f"{knob} (too few points: {len(kx)})")
            continue
        knob_law = fit_power_law(kx, ky, args.bootstrap, args.confidence, args.seed)
        if not knob_law.identified:  # its exponent is the optimiser's bound, not a measurement
            skipped.append(f"{knob} (not identified: {knob_law.reason})")
            continue
        by_x = {}
        for r in picked:
            by_x[_float(r[x_col])] = _float(r["forward_flops_per_sample"])
        flops = loglog_interp(list(by_x), list(by_x.values()))
        x_range = (kx.min() / args.extrapolate, kx.max() * args.extrapolate)
        allocations.append(allocate(args.compute, data_law, knob_law, _float(base[x_col]), flops,
                                    x_range, knob))
    best = min(allocations, key=lambda a: a.loss)
    pct = f"{100 * args.confidence:g}%"
    lines = [f"Compute budget {args.compute:.3g} training FLOPs; {args.metric} predicted by "
             f"L_N(N) + L_k(x) - L_k(x_baseline).", "",
             f"| strategy | knob parameters x | samples N | forward FLOPs/sample | predicted "
             f"{args.metric} [{pct} CI] | extrapolated |", "|---|---|---|---|---|---|"]
    for a in allocations:
        mark = " **best**" if a is best else ""
        x = "baseline model" if a.strategy == "data" else f"{a.x:.4g}"
        lines.append(f"| {a.strategy}{mark} | {x} | {a.samples:.4g} | {a.flops_per_sample:.4g} | "
                     f"{a.loss:.4f} [{a.loss_lo:.4f}, {a.loss_hi:.4f}] | "
                     f"{'yes' if a.extrapolated else 'no'} |")
    if skipped:
        lines.append(f"\nNot allocated: {', '.join(skipped)}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return allocations
