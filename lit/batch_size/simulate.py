"""``python -m lit.batch_size simulate``: the policy over a cost model or a recorded table.

Each recurrence asks :func:`lit.batch_size.policy.next_batch_size` for a size, draws that size's
outcome from the landscape and feeds it back, with Zeus's early stop applied (a run whose cost
would pass beta x the best converged cost so far is cut there and counts as not converged).
Side by side, in the same draws' distribution:

* **default**: every recurrence runs the default batch size;
* **grid**: exhaustive grid search, each candidate once (smallest first), then the cheapest
  one observed for the remaining recurrences;
* **oracle**: every recurrence runs the size with the lowest expected cost.

Landscapes: the built-in ``convex`` one (below), a JSON file
``{"default": 64, "sizes": {"32": {"cost": 120, "std": 6, "reach": 1.0, "fail_cost": 300}}}``,
or a recorded table (``--table``): a CSV with ``batch_size,cost,reached`` rows (and optionally
``status``) or a history SQLite file, whose rows are resampled with replacement per size; runs
stopped early are left out (their cost is a truncated one).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lit.batch_size.policy import Observation, cost_limit, next_batch_size


@dataclass(frozen=True)
class Arm:
    """One batch size of a cost model: time/energy cost to the target, noise, reach chance."""

    cost: float
    std: float
    reach: float = 1.0
    fail_cost: float | None = None  # cost of a run that exhausts its budget (default 2.5 cost)


class Landscape:
    """Outcomes per batch size: a parametric model (``arms``) or recorded rows (``rows``)."""

    def __init__(self, default: int, arms: dict[int, Arm] | None = None,
                 rows: dict[int, list[tuple[float, bool]]] | None = None) -> None:
        if (arms is None) == (rows is None):
            raise ValueError("a landscape needs either arms (a cost model) or rows (a table)")
        self.arms, self.rows = arms, rows
        self.sizes = sorted(arms or rows)
        if default not in self.sizes:
            raise ValueError(f"default {default!r} is not among the landscape's sizes {self.sizes!r}")
        self.default = default

    def expected(self, b: int) -> float:
        """Expected cost of a run of size ``b`` (no early stop)."""
        if self.rows is not None:
            return float(np.mean([c for c, _ in self.rows[b]]))
        a = self.arms[b]
        return a.reach * a.cost + (1 - a.reach) * (a.fail_cost or 2.5 * a.cost)

    def best(self) -> int:
        """The size with the lowest expected cost among those that reach the target."""
        ok = [b for b in self.sizes if (self.arms[b].reach > 0.5 if self.arms else
                                        np.mean([r for _, r in self.rows[b]]) > 0.5)]
        return min(ok, key=self.expected)

    def draw(self, b: int, rng: np.random.Generator) -> tuple[float, bool]:
        """One run's (cost, reached)."""
        if self.rows is not None:
            return self.rows[b][int(rng.integers(len(self.rows[b])))]
        a = self.arms[b]
        if rng.random() < a.reach:
            return max(a.cost + a.std * rng.standard_normal(), 1e-9), True
        return a.fail_cost or 2.5 * a.cost, False


def convex_landscape(best: int = 256) -> Landscape:
    """Built-in: sizes 8..1024, best ``best`` (256), default 64; 8 and 1024 never reach the
    target.

    Cost (to the target) = 100 (1 + 0.15 log2(b / best)^2) with 5% noise: the U shape of
    Zeus's Fig. 3 (small batches under-use the device, large ones need more epochs).
    """
    if best not in (16, 32, 64, 128, 256, 512):
        raise ValueError(f"the built-in landscape's best must be a power of two in 16..512, got {best!r}")
    arms = {}
    for k in range(3, 11):
        b = 2 ** k
        cost = 100 * (1 + 0.15 * math.log2(b / best) ** 2)
        arms[b] = Arm(cost, 0.05 * cost, 0.0 if b in (8, 1024) else 1.0, 2.5 * cost)
    return Landscape(64, arms=arms)


def load_landscape(path: str | Path, default: int | None, job: str | None = None) -> Landscape:
    """A landscape from a JSON cost model, a CSV table or a history SQLite file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"landscape/table file not found: {str(path)!r}")
    if path.suffix == ".json":
        spec = json.loads(path.read_text())
        arms = {int(b): Arm(float(a["cost"]), float(a.get("std", 0.0)), float(a.get("reach", 1.0)),
                            a.get("fail_cost")) for b, a in spec["sizes"].items()}
        return Landscape(default or int(spec["default"]), arms=arms)
    rows: dict[int, list[tuple[float, bool]]] = {}
    if path.suffix == ".csv":
        with open(path) as f:
            for r in csv.DictReader(f):
                if r.get("status") == "stopped":  # cut short by early stopping: not an outcome
                    continue
                reached = str(r["reached"]).strip().lower() in ("1", "true", "yes")
                rows.setdefault(int(r["batch_size"]), []).append((float(r["cost"]), reached))
    else:
        from lit.batch_size.history import History

        history = History(path)
        jobs = [job] if job else history.jobs()
        if len(jobs) != 1:
            raise ValueError(f"{path} holds jobs {jobs!r}: pick one with --job")
        for r in history.runs(jobs[0]):
            if r.observation is not None and r.status != "stopped":  # stopped rows are truncated
                rows.setdefault(r.batch_size, []).append((r.cost, r.status == "reached"))
    if not rows:
        raise ValueError(f"{path}: no rows to resample")
    if default is None:
        raise ValueError("a recorded table needs --default (the job's usual batch size)")
    return Landscape(default, rows=rows)


Drift = tuple[int, Landscape]  # (recurrence index, landscape from then on)


def active(land: Landscape, drift: Drift | None, i: int) -> Landscape:
    """The landscape in force at recurrence ``i`` (0-based)."""
    return drift[1] if drift is not None and i >= drift[0] else land


def run_series(land: Landscape, recurrences: int, seed: int, beta: float | None = 2.0,
               window: int = 0, rounds: int = 2,
               drift: Drift | None = None) -> list[tuple[int, float, bool]]:
    """The policy's series: (batch size, cost paid, reached) per recurrence."""
    rng = np.random.default_rng([seed, 1])  # outcome noise, apart from the sampler's seed
    history: list[Observation] = []
    out = []
    for i in range(recurrences):
        b = next_batch_size(history, land.sizes, land.default, seed=seed, rounds=rounds,
                            window=window).batch_size
        cost, reached = active(land, drift, i).draw(b, rng)
        limit = cost_limit(history, beta)  # the same early-stop rule as `run`
        if limit is not None and cost > limit:
            cost, reached = limit, False
        history.append(Observation(b, cost, reached))
        out.append((b, cost, reached))
    return out


def baseline_costs(land: Landscape, recurrences: int, seed: int,
                   drift: Drift | None = None) -> dict[str, float]:
    """Cumulative cost of always-default, exhaustive grid search and the oracle (which knows
    the best size of the landscape in force, drift included)."""
    rng = np.random.default_rng([seed, 2])
    at = lambda i: active(land, drift, i)
    default = sum(at(i).draw(land.default, rng)[0] for i in range(recurrences))
    grid, seen = 0.0, {}
    for i in range(recurrences):
        if i < len(land.sizes):
            cost, reached = at(i).draw(land.sizes[i], rng)
            if reached:
                seen[land.sizes[i]] = cost
        else:
            cost = at(i).draw(min(seen, key=seen.__getitem__) if seen else land.default, rng)[0]
        grid += cost
    oracle = sum(at(i).draw(at(i).best(), rng)[0] for i in range(recurrences))
    return {"default": default, "grid": grid, "oracle": oracle}


def add_simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="run the policy over a cost model or recorded table")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--landscape", help="JSON cost model (default: the built-in convex one)")
    src.add_argument("--table", help="recorded outcomes to resample: CSV or history SQLite")
    p.add_argument("--job", help="with a history --table: which job")
    p.add_argument("--default", type=int, help="the default batch size (a table needs it)")
    p.add_argument("--recurrences", type=int, default=40)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="how many seeds (series) to run")
    p.add_argument("--beta", type=float, default=2.0, help="early stop factor (<= 0: none)")
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--last", type=int, default=10, help="report best-size picks in the last N")
    p.add_argument("--drift-at", type=int, help="built-in landscape: from this recurrence "
                   "(0-based) on, the best size moves to --drift-best")
    p.add_argument("--drift-best", type=int, default=64, help="the best size after the drift")
    p.add_argument("--verbose", action="store_true", help="print every recurrence of each seed")


def cmd_simulate(args) -> int:
    if args.recurrences < 1 or args.seeds < 1 or args.last < 1:
        raise ValueError(f"--recurrences, --seeds and --last must be >= 1, got "
                         f"{args.recurrences!r}, {args.seeds!r}, {args.last!r}")
    land = (load_landscape(args.landscape, args.default) if args.landscape else
            load_landscape(args.table, args.default, args.job) if args.table else
            convex_landscape())
    drift = None
    if args.drift_at is not None:
        if args.landscape or args.table:
            raise ValueError("--drift-at works with the built-in landscape only")
        drift = (args.drift_at, convex_landscape(args.drift_best))
    best = active(land, drift, args.recurrences - 1).best()
    beta = args.beta if args.beta > 0 else None
    moved = f" (from {land.best()} until recurrence {args.drift_at})" if drift else ""
    print(f"sizes {land.sizes}, default {land.default}, best (lowest expected cost) {best}"
          f"{moved}; {args.recurrences} recurrences, beta {beta}, window {args.window}")
    print("\n| size | expected cost |\n|---:|---:|")
    for b in land.sizes:
        print(f"| {b} | {land.expected(b):.1f} |")
    print(f"\n| seed | best picked in last {args.last} | policy cost | default cost | grid cost "
          "| oracle cost | policy / default | policy / grid |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    sums = np.zeros(4)
    hits = []
    for seed in range(args.seed, args.seed + args.seeds):
        series = run_series(land, args.recurrences, seed, beta, args.window, args.rounds, drift)
        hit = sum(b == best for b, _, _ in series[-args.last:])
        hits.append(hit)
        base = baseline_costs(land, args.recurrences, seed, drift)
        policy = sum(c for _, c, _ in series)
        sums += (policy, base["default"], base["grid"], base["oracle"])
        print(f"| {seed} | {hit}/{args.last} | {policy:.0f} | {base['default']:.0f} | "
              f"{base['grid']:.0f} | {base['oracle']:.0f} | {policy / base['default']:.3f} | "
              f"{policy / base['grid']:.3f} |")
        if args.verbose:
            print("  " + " ".join(f"{b}{'' if r else '!'}" for b, _, r in series))
    n = args.seeds
    print(f"\nmean over {n} seed(s): best picked {np.mean(hits):.1f}/{args.last} in the last "
          f"{args.last} (>= 8 in {sum(h >= 8 for h in hits)}/{n} seeds); cumulative cost policy "
          f"{sums[0] / n:.0f}, default {sums[1] / n:.0f} ({sums[0] / sums[1]:.3f}x), grid "
          f"{sums[2] / n:.0f} ({sums[0] / sums[2]:.3f}x), oracle {sums[3] / n:.0f}")
    return 0
