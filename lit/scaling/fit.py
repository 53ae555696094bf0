"""Power-law fits of scaling curves: ``L(x) = alpha * x^(-beta) + gamma`` (Ardalani et al., arXiv
2208.08489, Eq. 1), with bootstrap confidence intervals, tables and log-log plots.

:func:`fit_power_law` is the pure fit (scipy's ``curve_fit``, bounded: alpha >= 0,
0 <= beta <= 5, 0 <= gamma <= max(L)); x is divided by its smallest value before fitting, which
keeps ``alpha`` of order one and the problem well conditioned, and ``alpha`` is reported for the
original x. Several starting exponents are tried and the least-squares best is kept.

Confidence intervals come from a residual bootstrap: the fitted curve plus residuals drawn with
replacement (scaled by ``sqrt(n / (n - 3))`` for the three fitted parameters), refitted
``bootstrap`` times; the interval is the percentile interval. (Resampling the points themselves
breaks down with the 4-8 points a sweep gives: many resamples repeat x values or lose the ends
of the range.)

A curve is "out of steam" (the paper's phrase for parameter scaling) when the lower confidence
bound of its relative loss drop over the last decade of x, ``(L(x_max / 10) - L(x_max)) /
L(x_max / 10)``, is below ``flat_tol``: within its CI, the last 10x of x bought (almost) nothing.
(Over a range narrower than 10x, x_max / 10 lies a little below the data.)

Curves of a results table (:mod:`lit.scaling.sweep`): ``N`` (loss vs samples, the runs built
for the data axis plus the baseline), ``V`` and ``H`` (vs embedding parameters), ``M`` and ``O``
(vs dense parameters), each with the baseline, and ``compute`` (vs training FLOPs =
3 x forward FLOPs per sample x samples, on the lower envelope of every run: the best loss
reached at each compute).
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MIN_POINTS = 4  # three parameters plus at least one degree of freedom
CURVES = {  # curve -> (roles of its runs, x column)
    "N": (("N", "baseline"), "samples_seen"),
    "V": (("V", "baseline"), "embedding_parameters"),
    "H": (("H", "baseline"), "embedding_parameters"),
    "M": (("M", "baseline"), "dense_parameters"),
    "O": (("O", "baseline"), "dense_parameters"),
    "compute": (None, "train_flops"),
}


def power_law(x: np.ndarray, alpha: float, beta: float, gamma: float) -> np.ndarray:
    return alpha * np.power(x, -beta) + gamma


def _jacobian(x: np.ndarray, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """d/d(alpha, beta, gamma) of :func:`power_law`, (n, 3): exact, so curve_fit needs no
    finite differences."""
    xb = np.power(x, -beta)
    return np.stack([xb, -alpha * xb * np.log(x), np.ones_like(x)], axis=1)


@dataclass
class PowerLawFit:
    """A fitted ``alpha * x^-beta + gamma`` with bootstrap samples of its parameters."""

    alpha: float
    beta: float
    gamma: float
    x: np.ndarray
    y: np.ndarray
    rmse: float
    confidence: float
    boot: np.ndarray = field(repr=False)  # (B, 3): alpha, beta, gamma per bootstrap fit

    def predict(self, x) -> np.ndarray:
        return power_law(np.asarray(x, dtype=np.float64), self.alpha, self.beta, self.gamma)

    def predict_boot(self, x) -> np.ndarray:
        """(B, len(x)) predictions of every bootstrap fit."""
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        a, b, g = (self.boot[:, i:i + 1] for i in range(3))
        return a * np.power(x[None, :], -b) + g

    def interval(self, values: np.ndarray) -> tuple[float, float]:
        tail = 50.0 * (1.0 - self.confidence)
        lo, hi = np.nanpercentile(values, [tail, 100.0 - tail], axis=0)
        return float(lo), float(hi)

    @property
    def beta_ci(self) -> tuple[float, float]:
        return self.interval(self.boot[:, 1])

    @property
    def gamma_ci(self) -> tuple[float, float]:
        return self.interval(self.boot[:, 2])

    @property
    def alpha_ci(self) -> tuple[float, float]:
        return self.interval(self.boot[:, 0])

    def drop(self) -> float:
        """Relative loss drop over the last decade of x: ``(L(x_max / 10) - L(x_max)) / L(x_max / 10)``."""
        lo, hi = self.predict([self.x.max() / 10.0, self.x.max()])
        return float((lo - hi) / lo)

    def drop_ci(self) -> tuple[float, float]:
        pred = self.predict_boot([self.x.max() / 10.0, self.x.max()])
        return self.interval((pred[:, 0] - pred[:, 1]) / pred[:, 0])

    def out_of_steam(self, flat_tol: float) -> bool:
        return self.drop_ci()[0] < flat_tol


def _fit_once(x: np.ndarray, y: np.ndarray, p0: tuple[float, float, float] | None = None):
    """Least-squares fit on x already scaled to start at 1; returns (params, sse) or None.

    Without ``p0`` several starting exponents are tried; with it (bootstrap refits) only ``p0``,
    falling back to the several starts when that fails.
    """
    from scipy.optimize import curve_fit

    bounds = ([0.0, 0.0, 0.0], [np.inf, 5.0, max(float(np.max(y)), 1e-12)])
    gamma0 = 0.9 * float(np.min(y))
    starts = [(max(float(y[np.argmin(x)]) - gamma0, 1e-6), beta0, gamma0)
              for beta0 in (0.1, 0.3, 0.7, 1.5)]
    if p0 is not None:
        starts = [p0]
    best = None
    for start in starts:
        start = [float(min(max(v, lo), hi)) for v, lo, hi in zip(start, bounds[0], bounds[1])]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # OptimizeWarning when the covariance is singular
                params, _ = curve_fit(power_law, x, y, p0=start, bounds=bounds, jac=_jacobian,
                                      max_nfev=2000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((power_law(x, *params) - y) ** 2))
        if best is None or sse < best[1]:
            best = (params, sse)
    if best is None and p0 is not None:
        return _fit_once(x, y, None)
    return best


def fit_power_law(x, y, bootstrap: int = 1000, confidence: float = 0.95,
                  seed: int = 0) -> PowerLawFit:
    """Fit ``y = alpha * x^-beta + gamma`` with residual-bootstrap confidence intervals.

    Raises ValueError for fewer than 4 points, non-positive x, or non-finite values.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < MIN_POINTS:
        raise ValueError(f"too few points for alpha * x^-beta + gamma: {len(x)} given, at least "
                         f"{MIN_POINTS} needed (three parameters and one degree of freedom); add "
                         f"grid points to this axis")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite; drop NaN rows first")
    if np.any(x <= 0):
        raise ValueError(f"x must be > 0 for a power law, got min {x.min()!r}")
    if len(np.unique(x)) < 3:
        raise ValueError(f"need at least 3 distinct x values, got {len(np.unique(x))}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    x0 = float(x.min())
    xs = x / x0
    best = _fit_once(xs, y)
    if best is None:
        raise ValueError("curve_fit found no solution for this curve")
    params = best[0]
    fitted = power_law(xs, *params)
    residuals = (y - fitted) * math.sqrt(len(x) / (len(x) - 3))
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(bootstrap):
        resampled = fitted + rng.choice(residuals, size=len(x), replace=True)
        refit = _fit_once(xs, resampled, p0=tuple(params))
        if refit is not None:
            boot.append(refit[0])
    boot_arr = np.array(boot, dtype=np.float64).reshape(-1, 3)
    # Back to the original x: alpha * (x / x0)^-beta = (alpha * x0^beta) * x^-beta.
    boot_arr[:, 0] = boot_arr[:, 0] * np.power(x0, boot_arr[:, 1])
    alpha = float(params[0] * x0 ** params[1])
    rmse = float(np.sqrt(np.mean((y - fitted) ** 2)))
    return PowerLawFit(alpha, float(params[1]), float(params[2]), x, y, rmse, confidence, boot_arr)


# --- results tables --------------------------------------------------------------------------

def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_results(path: str | Path, metrics: list[str]) -> list[dict]:
    """Rows of a results table usable for fitting: the latest row per (run, N) with status ok
    and finite metrics; the others are dropped with one warning that counts them."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    latest: dict[tuple, dict] = {}
    for row in rows:
        latest[(row["run_id"], row["N"])] = row
    kept, failed, nan = [], [], []
    for row in latest.values():
        if row.get("status") != "ok":
            failed.append(row["run_id"])
            continue
        values = [_float(row.get(m)) for m in metrics]
        if not all(math.isfinite(v) for v in values):
            nan.append(row["run_id"])
            continue
        kept.append(row)
    if failed or nan:
        warnings.warn(f"{path}: excluded {len(failed)} failed run(s) {failed[:5]} and {len(nan)} "
                      f"row(s) with NaN metrics {nan[:5]}", UserWarning, stacklevel=2)
    return kept


def curve_points(rows: list[dict], curve: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one curve, sorted by x; ``compute`` keeps the lower envelope."""
    roles, x_col = CURVES[curve]
    picked = [r for r in rows if roles is None or r["role"] in roles]
    pairs = sorted((_float(r[x_col]), _float(r[metric])) for r in picked)
    pairs = [(x, y) for x, y in pairs if math.isfinite(x) and x > 0]
    if curve == "compute":
        envelope, best = [], math.inf
        for x, y in pairs:
            if y < best:
                envelope.append((x, y))
                best = y
        pairs = envelope
    else:  # average repeated x (seeds) into one point
        merged: dict[float, list[float]] = {}
        for x, y in pairs:
            merged.setdefault(x, []).append(y)
        pairs = [(x, float(np.mean(ys))) for x, ys in sorted(merged.items())]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def fit_table(rows: list[dict], metrics: list[str], curves: list[str] | None, bootstrap: int,
              confidence: float, seed: int) -> tuple[dict, list[str]]:
    """Fits keyed by (metric, curve), and notes on curves skipped for too few points."""
    fits, notes = {}, []
    for metric in metrics:
        for curve in curves or list(CURVES):
            x, y = curve_points(rows, curve, metric)
            if len(x) < MIN_POINTS or len(np.unique(x)) < 3:
                message = (f"{metric} vs {curve}: {len(x)} point(s), at least {MIN_POINTS} needed")
                if curves:
                    raise ValueError(f"too few points: {message}; run more of the sweep or leave "
                                     f"this curve out of --curves")
                notes.append(message)
                continue
            fits[(metric, curve)] = fit_power_law(x, y, bootstrap, confidence, seed)
    if not fits:
        raise ValueError("too few points: no curve has enough points to fit (" + "; ".join(notes) + ")")
    return fits, notes


def fit_rows(fits: dict, flat_tol: float) -> list[dict]:
    rows = []
    for (metric, curve), f in fits.items():
        b_lo, b_hi = f.beta_ci
        g_lo, g_hi = f.gamma_ci
        d_lo, d_hi = f.drop_ci()
        rows.append({"metric": metric, "curve": curve, "x": CURVES[curve][1], "points": len(f.x),
                     "x_min": f.x.min(), "x_max": f.x.max(), "alpha": f.alpha, "beta": f.beta,
                     "beta_lo": b_lo, "beta_hi": b_hi, "gamma": f.gamma, "gamma_lo": g_lo,
                     "gamma_hi": g_hi, "rmse": f.rmse, "drop": f.drop(), "drop_lo": d_lo,
                     "drop_hi": d_hi, "out_of_steam": f.out_of_steam(flat_tol)})
    return rows


def markdown(rows: list[dict], confidence: float, flat_tol: float, notes: list[str],
             from_one_run: bool) -> str:
    pct = f"{100 * confidence:g}%"
    lines = [f"| metric | curve | x | points | beta [{pct} CI] | gamma [{pct} CI] | alpha | "
             f"drop over last 10x [{pct} CI] | out of steam |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['metric']} | {r['curve']} | {r['x']} {r['x_min']:.3g}-{r['x_max']:.3g} | "
            f"{r['points']} | {r['beta']:.3f} [{r['beta_lo']:.3f}, {r['beta_hi']:.3f}] | "
            f"{r['gamma']:.4f} [{r['gamma_lo']:.4f}, {r['gamma_hi']:.4f}] | {r['alpha']:.4g} | "
            f"{100 * r['drop']:.2f}% [{100 * r['drop_lo']:.2f}, {100 * r['drop_hi']:.2f}] | "
            f"{'yes' if r['out_of_steam'] else 'no'} |")
    lines += ["", f"L(x) = alpha * x^-beta + gamma; residual bootstrap {pct} intervals; out of steam "
              f"= the lower bound of the relative loss drop over the last 10x of x < "
              f"{100 * flat_tol:g}%."]
    if from_one_run:
        lines.append("Data-scaling points were taken from EvalAtSamples inside one run "
                     "(--points-from-one-run): they share one training history, which biases "
                     "the data exponent; their held-out loss is the validation stream's.")
    lines += [f"Not fitted: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(fits: dict, metric: str, path: Path, writer=None) -> None:
    """Log-log panels of every curve of ``metric``: points, fit, CI band, gamma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    curves = [c for c in CURVES if (metric, c) in fits]
    if not curves:
        return
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, curve in zip(axes.flat, curves):
        f = fits[(metric, curve)]
        grid = np.geomspace(f.x.min(), f.x.max(), 100)
        band = f.predict_boot(grid)
        lo, hi = np.nanpercentile(band, [50 * (1 - f.confidence), 100 - 50 * (1 - f.confidence)], axis=0)
        ax.fill_between(grid, lo, hi, alpha=0.25, label=f"{100 * f.confidence:g}% band")
        ax.plot(grid, f.predict(grid), label=f"beta={f.beta:.3f}")
        ax.axhline(f.gamma, linestyle="--", linewidth=0.8, color="gray", label=f"gamma={f.gamma:.3f}")
        ax.scatter(f.x, f.y, color="black", s=14, zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(CURVES[curve][1])
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {curve}")
        # Loss ranges are narrow on a log axis: label a few plain values, no minor labels.
        lows = [float(np.min(lo)), float(np.min(f.y)), f.gamma]
        span = np.linspace(min(v for v in lows if v > 0), float(np.max(f.y)), 5)
        ax.set_yticks(span, [f"{v:.3f}" for v in span])
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.16 / rows, top=1 - 0.08 / rows, wspace=0.4, hspace=0.5)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if writer is not None:  # the saved PNG, not a second rendering of the figure
        image = matplotlib.image.imread(path)[..., :3]
        writer.add_image(f"scaling/{metric}", image, dataformats="HWC")


def fit_command(args) -> list[dict]:
    """``python -m lit.scaling fit RESULTS.csv``: table (md + csv), PNGs and TensorBoard images."""
    results = Path(args.results)
    if not results.is_file():
        raise SystemExit(f"fit: no results table at {str(results)!r}; run `python -m lit.scaling "
                         f"sweep` first")
    out = Path(args.out) if args.out else results.parent / "fit"
    out.mkdir(parents=True, exist_ok=True)
    rows = load_results(results, args.metrics)
    fits, notes = fit_table(rows, args.metrics, args.curves, args.bootstrap, args.confidence,
                            args.seed)
    table = fit_rows(fits, args.flat_tol)
    from_one_run = any(r.get("source") == "eval_at" for r in rows)
    text = markdown(table, args.confidence, args.flat_tol, notes, from_one_run)
    (out / "fits.md").write_text(text)
    with open(out / "fits.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(out / "tb"))
    for metric in args.metrics:
        plot(fits, metric, out / f"{metric}.png", tb)
    tb.close()
    print(text)
    print(f"[scaling] wrote {out / 'fits.md'}, {out / 'fits.csv'}, "
          f"{', '.join(str(out / f'{m}.png') for m in args.metrics)} and TensorBoard images in {out / 'tb'}")
    return table
