"""Scaling curves of a results table (:mod:`lit.scaling.sweep`), fitted with
``L(x) = alpha * x^(-beta) + gamma`` (Ardalani et al., arXiv 2208.08489, Eq. 1): tables (md and
csv), log-log plots and TensorBoard images. The fit, its profile-likelihood intervals and the
"not identified" and "out of steam" verdicts are :mod:`lit.scaling.power_law`.

Curves: ``N`` (loss vs samples, the runs built for the data axis plus the baseline), ``V`` and
``H`` (vs embedding parameters), ``M`` and ``O`` (vs dense parameters), each with the baseline,
and ``compute`` (vs training FLOPs = 3 x forward FLOPs per sample x samples, every run). Repeated
x (seeds, or V runs at the baseline's FLOPs) are averaged into one point.

The paper's compute curve is a frontier; ``compute_envelope=True`` keeps only the runs that beat
every smaller-compute run. That selects the luckiest of the noisy points at each compute, more of
them as compute grows, so it biases the tail (and gamma) down; it is off by default.
"""

from __future__ import annotations

import csv
import math
import textwrap
import warnings
from pathlib import Path

import numpy as np

from lit.scaling.power_law import MIN_POINTS, PowerLawFit, fit_power_law, power_law

__all__ = ["CURVES", "MIN_POINTS", "PowerLawFit", "curve_points", "fit_command", "fit_power_law",
           "fit_rows", "fit_table", "load_results", "markdown", "plot", "power_law"]

CURVES = {  # curve -> (roles of its runs, x column)
    "N": (("N", "baseline"), "samples_seen"),
    "V": (("V", "baseline"), "embedding_parameters"),
    "H": (("H", "baseline"), "embedding_parameters"),
    "M": (("M", "baseline"), "dense_parameters"),
    "O": (("O", "baseline"), "dense_parameters"),
    "compute": (None, "train_flops"),
}


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


def curve_points(rows: list[dict], curve: str, metric: str,
                 compute_envelope: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one curve, sorted by x, repeated x averaged; with ``compute_envelope`` the
    ``compute`` curve keeps only the points that beat every smaller-compute point."""
    roles, x_col = CURVES[curve]
    picked = [r for r in rows if roles is None or r["role"] in roles]
    pairs = sorted((_float(r[x_col]), _float(r[metric])) for r in picked)
    pairs = [(x, y) for x, y in pairs if math.isfinite(x) and x > 0]
    merged: dict[float, list[float]] = {}
    for x, y in pairs:
        merged.setdefault(x, []).append(y)
    if curve == "compute" and compute_envelope:  # the best run at each compute, not the mean
        envelope, best = [], math.inf
        for x, ys in sorted(merged.items()):
            if min(ys) < best:
                best = min(ys)
                envelope.append((x, best))
        pairs = envelope
    else:
        pairs = [(x, float(np.mean(ys))) for x, ys in sorted(merged.items())]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def fit_table(rows: list[dict], metrics: list[str], curves: list[str] | None,
              confidence: float = 0.95, compute_envelope: bool = False) -> tuple[dict, list[str]]:
    """Fits keyed by (metric, curve), and notes on curves skipped for too few points."""
    fits, notes = {}, []
    for metric in metrics:
        for curve in curves or list(CURVES):
            x, y = curve_points(rows, curve, metric, compute_envelope)
            if len(x) < MIN_POINTS or len(np.unique(x)) < 3:
                message = (f"{metric} vs {curve}: {len(x)} point(s), at least {MIN_POINTS} needed")
                if curves:
                    raise ValueError(f"too few points: {message}; run more of the sweep or leave "
                                     f"this curve out of --curves")
                notes.append(message)
                continue
            fits[(metric, curve)] = fit_power_law(x, y, confidence=confidence)
    if not fits:
        raise ValueError("too few points: no curve has enough points to fit (" + "; ".join(notes) + ")")
    return fits, notes


ESTIMATES = ("alpha", "beta", "beta_lo", "beta_hi", "gamma", "gamma_lo", "gamma_hi")


def fit_rows(fits: dict, flat_tol: float) -> list[dict]:
    """One row per curve; a curve that is not identified has None (an empty CSV cell) in every
    column of ``ESTIMATES`` and says why in ``reason``."""
    rows = []
    for (metric, curve), f in fits.items():
        steam, why = f.out_of_steam(flat_tol)
        row = {"metric": metric, "curve": curve, "x": CURVES[curve][1], "points": len(f.x),
               "x_min": f.x.min(), "x_max": f.x.max(), "identified": f.identified,
               "reason": f.reason, "alpha": f.alpha, "beta": f.beta, "beta_lo": f.beta_ci[0],
               "beta_hi": f.beta_ci[1], "gamma": f.gamma, "gamma_lo": f.gamma_ci[0],
               "gamma_hi": f.gamma_ci[1], "rmse": f.rmse, "drop": f.drop, "drop_lo": f.drop_ci[0],
               "drop_hi": f.drop_ci[1], "out_of_steam": steam, "out_of_steam_reason": why}
        if not f.identified:
            row.update(dict.fromkeys(ESTIMATES))
        rows.append(row)
    return rows


def markdown(rows: list[dict], confidence: float, flat_tol: float, notes: list[str],
             from_one_run: bool, compute_envelope: bool = False) -> str:
    pct = f"{100 * confidence:g}%"
    lines = [f"| metric | curve | x | points | beta [{pct} CI] | gamma [{pct} CI] | alpha | "
             f"drop over last 10x [{pct} CI] | out of steam |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["identified"]:
            fitted = (f"{r['beta']:.3f} [{r['beta_lo']:.3f}, {r['beta_hi']:.3f}] | "
                      f"{r['gamma']:.4f} [{r['gamma_lo']:.4f}, {r['gamma_hi']:.4f}] | {r['alpha']:.4g}")
        else:
            fitted = f"not identified: {r['reason']} | not identified | -"
        why = r["out_of_steam_reason"]
        steam = f"{r['out_of_steam']}: {why}" if why else r["out_of_steam"]
        lines.append(
            f"| {r['metric']} | {r['curve']} | {r['x']} {r['x_min']:.3g}-{r['x_max']:.3g} | "
            f"{r['points']} | {fitted} | {100 * r['drop']:.2f}% [{100 * r['drop_lo']:.2f}, "
            f"{100 * r['drop_hi']:.2f}] | {steam} |")
    lines += ["", f"L(x) = alpha * x^-beta + gamma; {pct} profile-likelihood intervals. Not "
              f"identified = an estimate or interval of beta or gamma on an optimiser bound "
              f"(0 <= beta <= 5, 0 <= gamma <= max L): the bound set it, not the data. Out of "
              f"steam: yes = the whole interval of the relative loss drop over the last 10x of "
              f"x is below {100 * flat_tol:g}%, cannot tell = it straddles {100 * flat_tol:g}%."]
    lines.append("compute: " + ("the lower envelope of all runs (--compute-envelope; biases "
                                "gamma down)" if compute_envelope else
                                "every run, runs of equal FLOPs averaged"))
    if from_one_run:
        lines.append("Data-scaling points were taken from EvalAtSamples inside one run "
                     "(--points-from-one-run): they share one training history, which biases "
                     "the data exponent; their held-out loss is the validation stream's.")
    lines += [f"Not fitted: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(fits: dict, metric: str, path: Path, writer=None) -> dict[str, str]:
    """Log-log panels of every curve of ``metric``: points, fit, profile band, gamma. Returns the
    fit's legend label per curve ("not identified: why" where a bound set the fit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    curves = [c for c in CURVES if (metric, c) in fits]
    labels: dict[str, str] = {}
    if not curves:
        return labels
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, curve in zip(axes.flat, curves):
        f = fits[(metric, curve)]
        grid = np.geomspace(f.x.min(), f.x.max(), 40)
        lo, hi = f.predict_interval(grid)
        ax.fill_between(grid, lo, hi, alpha=0.25, label=f"{100 * f.confidence:g}% band")
        if f.identified:
            labels[curve] = f"beta={f.beta:.3f} [{f.beta_ci[0]:.3f}, {f.beta_ci[1]:.3f}]"
            ax.plot(grid, f.predict(grid), label=labels[curve])
            ax.axhline(f.gamma, linestyle="--", linewidth=0.8, color="gray",
                       label=f"gamma={f.gamma:.3f}")
        else:  # the best fit is drawn (it passes through the points) but gets no number
            labels[curve] = f"not identified: {f.reason}"
            ax.plot(grid, f.predict(grid), color="gray", linestyle=":",
                    label=textwrap.fill(labels[curve], 38))
        ax.scatter(f.x, f.y, color="black", s=14, zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(CURVES[curve][1])
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {curve}" + ("" if f.identified else " (not identified)"))
        # Loss ranges are narrow on a log axis: label a few plain values, no minor labels.
        lows = [float(np.min(lo)), float(np.min(f.y))] + ([f.gamma] if f.identified else [])
        span = np.linspace(min(v for v in lows if v > 0), float(max(np.max(f.y), np.max(hi))), 5)
        ax.set_yticks(span, [f"{v:.3f}" for v in span])
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.16 / rows, top=1 - 0.08 / rows, wspace=0.4, hspace=0.5)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if writer is not None:  # the saved PNG, not a second rendering of the figure
        image = matplotlib.image.imread(path)[..., :3]
        writer.add_image(f"scaling/{metric}", image, dataformats="HWC")
    return labels


def fit_command(args) -> list[dict]:
    """``python -m lit.scaling fit RESULTS.csv``: table (md + csv), PNGs and TensorBoard images."""
    results = Path(args.results)
    if not results.is_file():
        raise SystemExit(f"fit: no results table at {str(results)!r}; run `python -m lit.scaling "
                         f"sweep` first")
    out = Path(args.out) if args.out else results.parent / "fit"
    out.mkdir(parents=True, exist_ok=True)
    rows = load_results(results, args.metrics)
    fits, notes = fit_table(rows, args.metrics, args.curves, args.confidence, args.compute_envelope)
    table = fit_rows(fits, args.flat_tol)
    from_one_run = any(r.get("source") == "eval_at" for r in rows)
    text = markdown(table, args.confidence, args.flat_tol, notes, from_one_run,
                    args.compute_envelope)
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
