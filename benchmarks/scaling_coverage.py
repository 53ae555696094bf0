"""Coverage of the scaling fit's 95% intervals on known power laws (docs/scaling.md).

Each setting is a law ``L(x) = alpha * x^-beta + gamma`` sampled at 10 log-spaced x over 1.5-2
decades (a sweep's axis), with multiplicative Gaussian noise ``L * (1 + s * eps)``; every seed
draws new noise. For each seed both methods see the same points:

* **profile**: ``lit.scaling.power_law.fit_power_law`` (profile-likelihood intervals);
* **percentile bootstrap**: the method shipped before it, kept here verbatim: scipy
  ``curve_fit`` from four starting exponents, residual bootstrap (residuals scaled by
  sqrt(n / (n - 3))), percentile interval.

Coverage = share of seeds whose interval holds the true beta, gamma and relative drop over the
last decade of x. "identified" = share of seeds the profile fit calls identified (estimates and
intervals off the bounds); "cov. if identified" = profile coverage over those seeds only.

    python benchmarks/scaling_coverage.py                  # 200 seeds, 200 bootstrap resamples
    python benchmarks/scaling_coverage.py --seeds 50 --bootstrap 1000
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np

from lit.scaling.power_law import fit_power_law

# name -> (x, alpha, beta, gamma); the first is the synthetic study's test-NE data curve.
SETTINGS = {
    "study N: beta 0.36, gamma 83% of L, 1.5 dec": (np.geomspace(1.6e4, 5.2e5, 10), 5.753, 0.364, 0.806),
    "beta 0.5, gamma 70%, 2 dec": (np.geomspace(1e3, 1e5, 10), 0.3 * 1e3 ** 0.5, 0.5, 0.7),
    "beta 0.3, gamma 90%, 2 dec": (np.geomspace(1e4, 1e6, 10), 0.1 * 1e4 ** 0.3, 0.3, 0.9),
    "beta 0.2, gamma 80%, 2 dec": (np.geomspace(1e5, 1e7, 10), 0.2 * 1e5 ** 0.2, 0.2, 0.8),
    "beta 0.1, gamma 50%, 1.75 dec": (np.geomspace(1e6, 10 ** 7.75, 10), 0.5 * 1e6 ** 0.1, 0.1, 0.5),
}
NOISES = (0.004, 0.01, 0.02)


def _law(x, alpha, beta, gamma):
    return alpha * np.power(x, -beta) + gamma


def _curve_fit_once(x, y, p0=None):
    from scipy.optimize import curve_fit

    def jac(x, a, b, g):
        xb = np.power(x, -b)
        return np.stack([xb, -a * xb * np.log(x), np.ones_like(x)], axis=1)

    bounds = ([0.0, 0.0, 0.0], [np.inf, 5.0, max(float(np.max(y)), 1e-12)])
    gamma0 = 0.9 * float(np.min(y))
    starts = [p0] if p0 is not None else [(max(float(y[np.argmin(x)]) - gamma0, 1e-6), b0, gamma0)
                                          for b0 in (0.1, 0.3, 0.7, 1.5)]
    best = None
    for start in starts:
        start = [float(min(max(v, lo), hi)) for v, lo, hi in zip(start, bounds[0], bounds[1])]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                params, _ = curve_fit(_law, x, y, p0=start, bounds=bounds, jac=jac, max_nfev=2000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((_law(x, *params) - y) ** 2))
        if best is None or sse < best[1]:
            best = (params, sse)
    if best is None and p0 is not None:
        return _curve_fit_once(x, y)
    return best


def percentile_bootstrap(x, y, bootstrap, seed, confidence=0.95):
    """The shipped-before method: (beta, gamma, drop) percentile intervals."""
    x0 = float(x.min())
    xs = x / x0
    params = _curve_fit_once(xs, y)[0]
    fitted = _law(xs, *params)
    residuals = (y - fitted) * math.sqrt(len(x) / (len(x) - 3))
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(bootstrap):
        refit = _curve_fit_once(xs, fitted + rng.choice(residuals, size=len(x)), tuple(params))
        if refit is not None:
            boot.append(refit[0])
    boot = np.array(boot)
    a, b, g = boot[:, 0:1], boot[:, 1:2], boot[:, 2:3]
    ends = np.array([xs.max() / 10.0, xs.max()])[None, :]
    pred = a * np.power(ends, -b) + g
    drop = (pred[:, 0] - pred[:, 1]) / pred[:, 0]
    tail = 50.0 * (1.0 - confidence)
    return [tuple(np.nanpercentile(v, [tail, 100.0 - tail])) for v in (boot[:, 1], boot[:, 2], drop)]


def true_drop(x, alpha, beta, gamma):
    hi, lo = _law(np.array([x.max() / 10.0, x.max()]), alpha, beta, gamma)
    return (hi - lo) / hi


def run(seeds: int, bootstrap: int) -> list[dict]:
    rows = []
    for name, (x, alpha, beta, gamma) in SETTINGS.items():
        truth = (beta, gamma, true_drop(x, alpha, beta, gamma))
        for noise in NOISES:
            old, new, ident, new_ident = np.zeros(3), np.zeros(3), 0, np.zeros(3)
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                y = _law(x, alpha, beta, gamma) * (1.0 + noise * rng.standard_normal(len(x)))
                fit = fit_power_law(x, y)
                hits = np.array([lo <= v <= hi for v, (lo, hi) in
                                 zip(truth, (fit.beta_ci, fit.gamma_ci, fit.drop_ci))])
                new += hits
                if fit.identified:
                    ident += 1
                    new_ident += hits
                old += [lo <= v <= hi for v, (lo, hi) in
                        zip(truth, percentile_bootstrap(x, y, bootstrap, seed))]
            rows.append({"setting": name, "noise": noise, "old": old / seeds, "new": new / seeds,
                         "identified": ident / seeds,
                         "new_ident": new_ident / ident if ident else np.full(3, np.nan)})
            print(f"[coverage] {name}, noise {100 * noise:g}%: done", flush=True)
    return rows


def table(rows: list[dict], seeds: int, bootstrap: int) -> str:
    lines = [f"Coverage of nominal 95% intervals, {seeds} seeds per row (percentile bootstrap: "
             f"{bootstrap} resamples); each cell: percentile bootstrap -> profile.", "",
             "| law (10 points) | noise | beta | gamma | drop over last 10x | identified | "
             "cov. if identified (beta / gamma / drop) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{o:.2f} -> **{n:.2f}**" for o, n in zip(r["old"], r["new"])]
        cond = " / ".join("-" if math.isnan(v) else f"{v:.2f}" for v in r["new_ident"])
        lines.append(f"| {r['setting']} | {100 * r['noise']:g}% | {' | '.join(cells)} | "
                     f"{100 * r['identified']:.0f}% | {cond} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="resamples of the percentile bootstrap (the method before)")
    args = parser.parse_args()
    start = time.time()
    rows = run(args.seeds, args.bootstrap)
    print(table(rows, args.seeds, args.bootstrap))
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
