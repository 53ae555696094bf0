"""The scaling sweep: a grid over the data budget N and the DLRM knobs V, H, M, O, each point a
``python -m lit fit`` run in its own subprocess with its own saved config.

A sweep config (YAML) names a ``python -m lit fit`` config and the grid::

    base_config: configs/dlrm/synthetic.yaml   # any `python -m lit fit` config
    set: {trainer.callbacks: [], data.init_args.val_samples: 32768}   # dotted overrides, every run
    out: runs/scaling/synthetic
    grid: one_at_a_time          # or `full` (the cartesian product of the axes)
    baseline: {N: 262144, V: 20000, H: 16, M: [128, 64], O: 1.0}
    axes: {N: [65536, 262144, 1048576], V: [2000, 20000, 100000], H: [8, 16, 32]}
    seeds: [0]                   # seed_everything per run (model init); the data stays fixed

``one_at_a_time`` is the paper's design: the baseline, then each axis varied alone with the
others at the baseline (a run's ``role`` is the axis it was built for). Every run writes
``runs/<run_id>/config.yaml`` (reproduce it with ``python -m lit fit --config`` on that file),
its TensorBoard logs under ``tb/<run_id>``, a ``summary.json`` (:class:`callbacks.RunSummary`)
and one row of ``results.csv``. Rows are appended with one ``write`` each, so the table is
consistent after a crash or Ctrl-C; finished runs are skipped when the sweep is started again,
failed ones are recorded with their error (and retried on the next start).
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

KNOBS = ("N", "V", "H", "M", "O")
KNOB_KEYS = {
    "N": "data.init_args.train_samples",
    "V": "model.init_args.num_embeddings",
    "H": "model.init_args.embedding_dim",
    "M": "model.init_args.over_arch_layer_sizes",
    "O": "model.init_args.width_multiplier",
}
# Run settings a sweep point needs unless the sweep config's `set` says otherwise.
RUN_DEFAULTS = {
    "checkpoint.save_last": False,
    "checkpoint.save_top_k": 0,
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
}
COLUMNS = [
    "run_id", "role", "source", "seed", "N", "V", "H", "M", "O",
    "embedding_parameters", "dense_parameters", "parameters", "forward_flops_per_sample",
    "train_flops", "samples_seen", "train_logloss", "train_ne", "test_logloss", "test_ne",
    "test_auroc", "wall_s", "train_s", "status", "error", "config",
]


@dataclass
class SweepConfig:
    """A parsed sweep config (see the module docstring)."""

    base: dict
    baseline: dict
    axes: dict
    grid: str = "one_at_a_time"
    seeds: list[int] = field(default_factory=lambda: [0])
    set: dict = field(default_factory=dict)
    knob_keys: dict = field(default_factory=lambda: dict(KNOB_KEYS))
    out: str = "runs/scaling"


@dataclass(frozen=True)
class RunSpec:
    """One grid point: the knob values, the axis it belongs to, and the seed."""

    knobs: tuple  # ((name, value), ...) in KNOBS order, lists as tuples
    role: str
    seed: int
    eval_at: tuple[int, ...] = ()  # --points-from-one-run: the data points this run supplies

    @property
    def values(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.knobs}

    @property
    def run_id(self) -> str:
        return run_id(self.values, self.seed) + ("-points" if self.eval_at else "")


def format_value(value) -> str:
    """A knob value as it appears in run ids and the CSV: lists as ``128x64``."""
    if isinstance(value, (list, tuple)):
        return "x".join(format_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_id(values: dict, seed: int) -> str:
    return "-".join(f"{k}{format_value(values[k])}" for k in KNOBS if k in values) + f"-s{seed}"


def set_dotted(config: dict, key: str, value) -> None:
    """``config["a"]["b"]["c"] = value`` for ``key="a.b.c"`` (intermediate mappings created)."""
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read and check a sweep config; ``base_config`` is resolved relative to the working dir."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(raw) - {"base_config", "base", "set", "out", "grid", "baseline", "axes", "seeds",
                          "knob_keys"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: base_config, base, set, "
                         f"out, grid, baseline, axes, seeds, knob_keys")
    base: dict = {}
    if raw.get("base_config"):
        base_path = Path(raw["base_config"])
        if not base_path.is_file():
            raise ValueError(f"{path}: base_config {str(base_path)!r} is not a file (paths are "
                             f"relative to the directory you run the sweep from)")
        base = yaml.safe_load(base_path.read_text()) or {}
    for key, value in (raw.get("base") or {}).items():
        set_dotted(base, key, value)
    if not base:
        raise ValueError(f"{path}: give base_config (a `python -m lit fit` config) or base")
    grid = raw.get("grid", "one_at_a_time")
    if grid not in ("one_at_a_time", "full"):
        raise ValueError(f"{path}: grid must be one_at_a_time or full, got {grid!r}")
    baseline, axes = raw.get("baseline") or {}, raw.get("axes") or {}
    for name in list(baseline) + list(axes):
        if name not in KNOBS:
            raise ValueError(f"{path}: unknown knob {name!r}; knobs are {', '.join(KNOBS)}")
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: axes.{name} must be a non-empty list, got {values!r}")
        if name not in baseline:
            raise ValueError(f"{path}: axes.{name} needs a baseline value (baseline.{name})")
    if "N" not in baseline:
        raise ValueError(f"{path}: baseline.N (the data budget of every run) is required")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"{path}: seeds must be a non-empty list of ints, got {seeds!r}")
    knob_keys = {**KNOB_KEYS, **(raw.get("knob_keys") or {})}
    return SweepConfig(base=base, baseline=baseline, axes=axes, grid=grid, seeds=seeds,
                       set=raw.get("set") or {}, knob_keys=knob_keys,
                       out=raw.get("out", "runs/scaling"))


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def build_grid(config: SweepConfig, points_from_one_run: bool = False) -> list[RunSpec]:
    """The runs of the sweep, in order, without duplicates.

    With ``points_from_one_run`` the N axis is one run at the largest N that evaluates at every
    N of the axis (``EvalAtSamples``) instead of one run per N.
    """
    base = {k: _frozen(config.baseline[k]) for k in KNOBS if k in config.baseline}
    combos: list[tuple[dict, str]] = [(base, "baseline")]
    if config.grid == "full":
        names = [k for k in KNOBS if k in config.axes]
        for values in itertools.product(*(config.axes[k] for k in names)):
            combo = {**base, **{k: _frozen(v) for k, v in zip(names, values)}}
            changed = [k for k in names if combo[k] != base[k]]
            combos.append((combo, changed[0] if len(changed) == 1 else
                           ("baseline" if not changed else "grid")))
    else:
        for name in KNOBS:
            for value in config.axes.get(name, []):
                combos.append(({**base, name: _frozen(value)}, name))
    specs: list[RunSpec] = []
    seen: set = set()
    data_points = tuple(sorted(config.axes.get("N", [])))
    for seed in config.seeds:
        for combo, role in combos:
            if points_from_one_run and role == "N":
                continue  # replaced by the one run below
            specs.append(RunSpec(tuple((k, combo[k]) for k in KNOBS if k in combo), role, seed))
        if points_from_one_run and data_points:
            combo = {**base, "N": max(data_points)}
            specs.append(RunSpec(tuple((k, combo[k]) for k in KNOBS if k in combo), "N", seed,
                                 eval_at=data_points))
    unique = []
    for spec in specs:
        if spec.run_id not in seen:
            seen.add(spec.run_id)
            unique.append(spec)
    return unique


def run_config(config: SweepConfig, spec: RunSpec, out: Path) -> dict:
    """The full ``python -m lit fit`` config of one run."""
    run = copy.deepcopy(config.base)
    for key, value in {**RUN_DEFAULTS, **config.set}.items():
        set_dotted(run, key, copy.deepcopy(value))
    for name, value in spec.values.items():
        set_dotted(run, config.knob_keys[name], value)
    run["seed_everything"] = spec.seed
    set_dotted(run, "trainer.logger", {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(out / "tb"), "name": spec.run_id}})
    callbacks = list(run["trainer"].get("callbacks") or [])
    callbacks.append({"class_path": "callbacks.run_summary.RunSummary",
                      "init_args": {"path": str(out / "runs" / spec.run_id / "summary.json")}})
    if spec.eval_at:
        callbacks = [c for c in callbacks if c.get("class_path") not in
                     ("callbacks.EvalAtSamples", "callbacks.eval_at_samples.EvalAtSamples")]
        callbacks.append({"class_path": "callbacks.eval_at_samples.EvalAtSamples",
                          "init_args": {"at_samples": list(spec.eval_at)}})
    run["trainer"]["callbacks"] = callbacks
    return run


def write_run_config(config: SweepConfig, spec: RunSpec, out: Path) -> Path:
    path = out / "runs" / spec.run_id / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# scaling sweep run {spec.run_id} (role {spec.role}); reproduce with\n"
                    f"#   python -m lit fit --config {path}\n"
                    + yaml.safe_dump(run_config(config, spec, out), sort_keys=False))
    return path


# --- the results table -----------------------------------------------------------------------

def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def append_row(path: Path, row: dict) -> None:
    """Append one row with a single ``write`` on an O_APPEND descriptor (header on first use)."""
    if not path.exists():
        header = io.StringIO()
        csv.writer(header).writerow(COLUMNS)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(header.getvalue())
        os.replace(tmp, path)  # never a file without its header
    line = io.StringIO()
    csv.DictWriter(line, fieldnames=COLUMNS, extrasaction="ignore").writerow(
        {k: _cell(row.get(k)) for k in COLUMNS})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.getvalue().encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return format_value(value) if isinstance(value, (list, tuple)) else str(value)


def rows_from_summary(spec: RunSpec, summary: dict, config_path: Path, wall_s: float) -> list[dict]:
    """Results rows of a finished run: one, or one per eval point with ``--points-from-one-run``."""
    common = {
        "run_id": spec.run_id, "role": spec.role, "seed": spec.seed, **spec.values,
        "embedding_parameters": summary.get("embedding_parameters"),
        "dense_parameters": summary.get("dense_parameters"),
        "forward_flops_per_sample": summary.get("forward_flops_per_sample"),
        "wall_s": round(wall_s, 2), "train_s": summary.get("train_s"), "status": "ok",
        "error": "", "config": str(config_path),
    }
    if common["embedding_parameters"] is not None and common["dense_parameters"] is not None:
        common["parameters"] = common["embedding_parameters"] + common["dense_parameters"]
    flops = summary.get("forward_flops_per_sample")
    if not spec.eval_at:
        samples = summary.get("samples_seen")
        return [{**common, "source": "run", "samples_seen": samples,
                 "train_flops": 3 * flops * samples if flops and samples else None,
                 "train_logloss": summary.get("train_logloss"), "train_ne": summary.get("train_ne"),
                 "test_logloss": summary.get("test_logloss"), "test_ne": summary.get("test_ne"),
                 "test_auroc": summary.get("test_auroc")}]
    rows = []
    for point in summary.get("eval_at", []):
        samples = int(point["samples"])
        rows.append({**common, "N": samples, "source": "eval_at", "samples_seen": samples,
                     "train_flops": 3 * flops * samples if flops else None,
                     "train_logloss": point.get("train_logloss"), "train_ne": point.get("train_ne"),
                     "test_logloss": point.get("logloss"), "test_ne": point.get("ne"),
                     "test_auroc": point.get("auroc")})
    return rows


def _error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:300]


def run_one(config: SweepConfig, spec: RunSpec, out: Path, python: str, timeout: float | None,
            results: Path) -> str:
    """Run one grid point in a subprocess and append its row(s); returns the status."""
    config_path = write_run_config(config, spec, out)
    summary_path = out / "runs" / spec.run_id / "summary.json"
    summary_path.unlink(missing_ok=True)
    log_path = out / "runs" / spec.run_id / "log.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path.cwd())] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([python, "-m", "lit", "fit", "--config", str(config_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()
            code = "timeout"
        except BaseException:  # Ctrl-C: stop the run, write nothing for it
            proc.terminate()
            proc.wait()
            raise
    wall = time.perf_counter() - start
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if code == 0 and summary is not None and summary.get("interrupted"):
        error = f"the run was interrupted after {summary.get('samples_seen')} samples"
    elif code == 0 and summary is not None:
        rows = rows_from_summary(spec, summary, config_path, wall)
        if rows:
            for row in rows:
                append_row(results, row)
            return "ok"
        error = "the run finished but EvalAtSamples recorded no point"
    elif code == "timeout":
        error = f"timed out after {timeout} s"
    else:
        error = (f"exit code {code}: " if code != 0 else "no summary.json: ") \
            + _error_line(log_path.read_text())
    append_row(results, {"run_id": spec.run_id, "role": spec.role, "seed": spec.seed,
                         **spec.values, "source": "run", "wall_s": round(wall, 2),
                         "status": "failed", "error": error, "config": str(config_path)})
    return "failed"


def sweep(config: SweepConfig, out: Path, points_from_one_run: bool = False,
          dry_run: bool = False, python: str = sys.executable, timeout: float | None = None,
          only: list[str] | None = None) -> list[RunSpec]:
    """Run (or, with ``dry_run``, list and write the configs of) every grid point not done yet."""
    specs = build_grid(config, points_from_one_run)
    if only:
        specs = [s for s in specs if s.role in only or (s.role == "baseline" and "N" in only)]
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.csv"
    done = {r["run_id"] for r in read_results(results) if r["status"] == "ok"}
    todo = [s for s in specs if s.run_id not in done]
    print(f"[scaling] {len(specs)} runs in the grid, {len(specs) - len(todo)} already done, "
          f"{len(todo)} to run; results: {results}", flush=True)
    if points_from_one_run:
        print("[scaling] --points-from-one-run: the data-scaling points come from EvalAtSamples "
              "inside one run (shared history and learning rate: this biases the exponent)",
              flush=True)
    if dry_run:
        for spec in specs:
            path = write_run_config(config, spec, out)
            state = "done" if spec.run_id in done else "todo"
            extra = f" eval_at={list(spec.eval_at)}" if spec.eval_at else ""
            print(f"{state}  {spec.run_id:40s} role={spec.role:8s} config={path}{extra}")
        return specs
    for i, spec in enumerate(todo, 1):
        print(f"[scaling] ({i}/{len(todo)}) {spec.run_id} (role {spec.role}) ...", flush=True)
        status = run_one(config, spec, out, python, timeout, results)
        print(f"[scaling]   {status}", flush=True)
    return specs
