"""lit.scaling: results tables (exclusion of failed and NaN rows, too few points), the fit
command's tables, CSV and plots with "not identified" curves, the compute envelope (off and on),
the sweep's grid and configs (dry run), resume, and the allocation against a hand calculation.
The fitter itself is tests/lit/scaling/test_power_law.py. The end-to-end sweep through real
``python -m lit fit`` subprocesses is ``slow``."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import yaml

from lit.scaling.allocate import allocate, allocate_command, loglog_interp
from lit.scaling.fit import (PowerLawFit, curve_points, fit_command, fit_power_law, fit_table,
                             load_results)
from lit.scaling.sweep import (COLUMNS, append_row, build_grid, load_sweep_config, read_results,
                               sweep)
from tests.conftest import ROOT

TRUE = dict(alpha=30.0, beta=0.4, gamma=0.45)


def law(x, alpha=TRUE["alpha"], beta=TRUE["beta"], gamma=TRUE["gamma"]):
    return alpha * np.power(x, -beta) + gamma


def _row(run_id, role, n, flops=1000.0, emb=1e6, dense=1e4, test=0.5, train=0.55, status="ok",
         **extra):
    return {"run_id": run_id, "role": role, "source": "run", "seed": 0, "N": n, "V": 10, "H": 4,
            "M": "8x4", "O": 1.0, "embedding_parameters": emb, "dense_parameters": dense,
            "parameters": emb + dense, "forward_flops_per_sample": flops,
            "train_flops": 3 * flops * n, "samples_seen": n, "train_logloss": train,
            "train_ne": train, "test_logloss": test, "test_ne": test, "test_auroc": 0.7,
            "wall_s": 1.0, "train_s": 1.0, "status": status, "error": "", "config": "c.yaml",
            **extra}


def _known_table(path: Path) -> None:
    """Rows whose losses follow known laws: data steep, H steep, V flat."""
    rng = np.random.default_rng(1)
    n0, e0 = 1e5, 1e6
    for i, n in enumerate([2.5e4, 5e4, 1e5, 2e5, 4e5, 8e5]):
        role = "baseline" if n == n0 else "N"
        append_row(path, _row(f"n{i}", role, int(n), test=float(law(n / 1e3)),
                              train=float(law(n / 1e3, beta=0.5))))
    for i, e in enumerate([2.5e5, 5e5, 2e6, 4e6]):
        append_row(path, _row(f"h{i}", "H", int(n0), emb=e, flops=1000 * e / e0,
                              test=float(law(n0 / 1e3) - law(e0 / 1e4) + law(e / 1e4)),
                              train=float(law(n0 / 1e3, beta=0.5) - law(e0 / 1e4, beta=0.5)
                                          + law(e / 1e4, beta=0.5))))
        append_row(path, _row(f"v{i}", "V", int(n0), emb=e,
                              test=float(law(n0 / 1e3) + 0.001 * rng.standard_normal()),
                              train=float(law(n0 / 1e3, beta=0.5))))


def test_results_with_failed_and_nan_rows_are_excluded_with_a_warning(tmp_path):
    path = tmp_path / "results.csv"
    _known_table(path)
    append_row(path, _row("bad", "N", 3000, status="failed", test=None))
    append_row(path, _row("nan", "N", 4000, test=float("nan")))
    with pytest.warns(UserWarning, match=r"excluded 1 failed run\(s\) \['bad'\] and 1 row\(s\) "
                                         r"with NaN metrics \['nan'\]"):
        rows = load_results(path, ["test_ne"])
    assert {r["run_id"] for r in rows} == {f"n{i}" for i in range(6)} | \
        {f"h{i}" for i in range(4)} | {f"v{i}" for i in range(4)}


def _fit_args(path, **changes):
    return Namespace(**{"results": str(path), "out": None, "metrics": ["test_ne", "train_ne"],
                        "curves": None, "confidence": 0.95, "flat_tol": 0.005,
                        "compute_envelope": False, **changes})


def test_fit_command_writes_tables_plots_and_reports_curves_not_identified(tmp_path):
    from lit.scaling.fit import ESTIMATES, plot

    path = tmp_path / "results.csv"
    _known_table(path)
    table = fit_command(_fit_args(path))
    by = {(r["metric"], r["curve"]): r for r in table}
    # exact laws: N and H recover their exponents; V is flat (noise only)
    assert by[("test_ne", "N")]["beta"] == pytest.approx(0.4, rel=1e-6)
    assert by[("train_ne", "N")]["beta"] == pytest.approx(0.5, rel=1e-6)
    assert by[("test_ne", "H")]["beta"] == pytest.approx(0.4, rel=1e-6)
    assert by[("test_ne", "N")]["identified"] and by[("test_ne", "N")]["out_of_steam"] == "no"
    flat = by[("test_ne", "V")]
    assert not flat["identified"] and flat["reason"].startswith("beta not identified (")
    assert all(flat[k] is None for k in ESTIMATES)
    assert flat["out_of_steam"] == "yes" and flat["drop_hi"] < 0.005
    out = tmp_path / "fit"
    assert (out / "test_ne.png").stat().st_size > 10_000 and (out / "train_ne.png").is_file()
    with open(out / "fits.csv", newline="") as handle:
        saved = {(r["metric"], r["curve"]): r for r in csv.DictReader(handle)}
    assert len(saved) == len(table)
    row = saved[("test_ne", "V")]
    assert row["identified"] == "False" and row["reason"] == flat["reason"]
    assert all(row[k] == "" for k in ESTIMATES) and float(row["drop_hi"]) == flat["drop_hi"]
    assert saved[("test_ne", "N")]["identified"] == "True"
    assert float(saved[("test_ne", "N")]["beta"]) == pytest.approx(0.4, rel=1e-6)
    md = {line.split(" | ")[1]: line for line in (out / "fits.md").read_text().splitlines()
          if line.startswith("| test_ne |")}
    assert f"| not identified: {flat['reason']} | not identified | - |" in md["V"]
    assert md["V"].endswith(f"| yes: {flat['out_of_steam_reason']} |")
    assert "| 0.400 [0.400, 0.400] | 0.4500 [0.4500, 0.4500] |" in md["N"]
    assert list((out / "tb").glob("events.out.tfevents*"))
    fits, _ = fit_table(load_results(path, ["test_ne"]), ["test_ne"], ["N", "V"])
    labels = plot(fits, "test_ne", tmp_path / "p.png")
    assert labels == {"N": "beta=0.400 [0.400, 0.400]", "V": f"not identified: {flat['reason']}"}
    with pytest.raises(ValueError, match="too few points: test_ne vs M: 1 point"):
        fit_command(_fit_args(path, curves=["M"]))  # no M runs: asked for explicitly, an error


def _compute_rows():
    """Train FLOPs = 3 x forward x N: 3000, 6000, 9000, 12000 (two runs), 15000."""
    return [_row("a", "N", 1000, flops=1, test=0.9), _row("b", "N", 2000, flops=1, test=0.8),
            _row("c", "H", 1000, flops=3, test=0.85), _row("d", "M", 1000, flops=4, test=0.7),
            _row("e", "O", 1000, flops=4, test=0.74), _row("f", "N", 5000, flops=1, test=0.72)]


def test_compute_curve_keeps_every_run_unless_the_envelope_is_asked_for():
    x, y = curve_points(_compute_rows(), "compute", "test_ne")
    assert x.tolist() == [3000, 6000, 9000, 12000, 15000]
    assert y.tolist() == pytest.approx([0.9, 0.8, 0.85, 0.72, 0.72])  # 12000: mean of 0.7, 0.74
    x, y = curve_points(_compute_rows(), "compute", "test_ne", compute_envelope=True)
    assert x.tolist() == [3000, 6000, 12000] and y.tolist() == [0.9, 0.8, 0.7]
    from lit.scaling.__main__ import parse_args
    from lit.scaling.fit import markdown

    assert not parse_args(["fit", "r.csv"]).compute_envelope
    assert parse_args(["fit", "r.csv", "--compute-envelope"]).compute_envelope
    assert "compute: the lower envelope of all runs (--compute-envelope" in markdown(
        [], 0.95, 0.005, [], False, compute_envelope=True)
    assert "compute: every run" in markdown([], 0.95, 0.005, [], False)


def test_the_envelope_biases_gamma_down_and_every_run_does_not():
    """16 runs along a known compute law with 1% noise, 40 seeds: the envelope keeps the runs
    that happened to land low, more of them at large compute, so its gamma sits below the truth;
    the fit of every run is centred on it."""
    x = np.geomspace(1e9, 1e11, 16)
    alpha, beta, gamma = 0.2 * 1e9 ** 0.4, 0.4, 0.8
    every, envelope = [], []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        y = law(x, alpha, beta, gamma) * (1 + 0.01 * rng.standard_normal(16))
        rows = [_row(f"r{i}", "N", 1000, flops=xi / 3000, test=float(yi))
                for i, (xi, yi) in enumerate(zip(x, y))]
        for keep, out in ((False, every), (True, envelope)):
            fits, _ = fit_table(rows, ["test_ne"], ["compute"], compute_envelope=keep)
            out.append(fits[("test_ne", "compute")].gamma)
    se = np.std(every) / np.sqrt(40)
    assert abs(np.mean(every) - gamma) < 3 * se
    assert np.mean(envelope) < gamma - 3 * se


def _exact(alpha, beta, gamma, x):
    boot = np.tile([alpha, beta, gamma], (50, 1)).astype(float)
    return PowerLawFit(alpha, beta, gamma, np.asarray(x, float), law(np.asarray(x, float),
                       alpha, beta, gamma), 0.0, 0.95, (beta, beta), (gamma, gamma), 0.0,
                       (0.0, 0.0), True, "", boot)


def test_allocation_matches_the_hand_calculation():
    # L = A N^-a + B x^-b + const, f(x) = c x, N = C / (3 c x): dL/dx = 0 gives
    # x* = (b B / (a A) * (C / 3c)^a)^(1 / (a + b)).
    A, a, B, b, c, C = 50.0, 0.3, 20.0, 0.2, 2.0, 1e13
    data_law = _exact(A, a, 0.4, [1e5, 1e8])
    knob_law = _exact(B, b, 0.45, [1e3, 1e7])
    x_star = (b * B / (a * A) * (C / (3 * c)) ** a) ** (1 / (a + b))
    result = allocate(C, data_law, knob_law, 1e4, lambda x: c * x, (1e3, 1e7), "H")
    assert result.x == pytest.approx(x_star, rel=1e-4)
    assert result.samples == pytest.approx(C / (3 * c * x_star), rel=1e-4)
    expected = A * result.samples ** -a + 0.4 + B * result.x ** -b - B * 1e4 ** -b
    assert result.loss == pytest.approx(expected, rel=1e-9)
    assert result.loss_lo == pytest.approx(expected) and result.loss_hi == pytest.approx(expected)
    # a knob that costs no FLOPs: the largest size allowed wins
    free = allocate(C, data_law, knob_law, 1e4, lambda x: 1e3, (1e3, 1e7), "V")
    assert free.x == pytest.approx(1e7, rel=1e-6)


def _allocate_args(path):
    return Namespace(results=str(path), compute=1e10, metric="test_ne", extrapolate=1.0,
                     bootstrap=30, confidence=0.95, seed=0, out=None)


def test_allocate_skips_knob_laws_that_are_not_identified(tmp_path, capsys):
    path = tmp_path / "results.csv"
    _known_table(path)
    rng = np.random.default_rng(2)
    for i, d in enumerate([2.5e3, 5e3, 2e4, 4e4]):  # M: flat, noise only
        append_row(path, _row(f"m{i}", "M", 100000, dense=d, flops=1000 * d / 1e4,
                              test=float(law(100) + 0.001 * rng.standard_normal())))
    allocations = allocate_command(_allocate_args(path))
    text = capsys.readouterr().out
    knob_fit = fit_power_law(*curve_points(load_results(path, ["test_ne"]), "M", "test_ne"))
    assert not knob_fit.identified
    assert [a.strategy for a in allocations] == ["data", "H"]
    assert f"M (not identified: {knob_fit.reason})" in text and "O (too few points: 1)" in text
    assert "V (not identified: " in text


def test_allocate_refuses_a_data_law_that_is_not_identified(tmp_path):
    path = tmp_path / "results.csv"
    for i, n in enumerate([2.5e4, 5e4, 1e5, 2e5, 4e5]):
        append_row(path, _row(f"n{i}", "baseline" if n == 1e5 else "N", int(n), test=0.5))
    with pytest.raises(SystemExit, match=r"the data law \(test_ne vs N\) is not identified \(beta"):
        allocate_command(_allocate_args(path))


def test_loglog_interp_is_exact_on_power_laws():
    f = loglog_interp([1e3, 1e4, 1e5], [2e3 * 10 ** 0.5, 2e4 * 10 ** 0.5, 2e5 * 10 ** 0.5])
    assert f(3e4) == pytest.approx(6e4 * 10 ** 0.5) and f(1e6) == pytest.approx(2e6 * 10 ** 0.5)


SWEEP_YAML = """
base_config: configs/dlrm/synthetic.yaml
set:
  trainer.callbacks: []
  trainer.limit_val_batches: 0
  data.init_args.batch_size: 128
  data.init_args.val_samples: 256
  data.init_args.test_samples: 512
  data.init_args.cardinalities: [100, 50, 7]
  data.init_args.num_dense: 3
  model.init_args.dense_arch_layer_sizes: [8]
baseline: {N: 512, V: 16, H: 4, M: [8], O: 1.0}
axes:
  N: [256, 512, 1024]
  H: [2, 4, 8]
"""


def _sweep_config(tmp_path, text=SWEEP_YAML):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    cwd = os.getcwd()
    os.chdir(ROOT)  # base_config is relative to where the sweep runs
    try:
        return load_sweep_config(path)
    finally:
        os.chdir(cwd)


def test_dry_run_lists_and_writes_exactly_the_grid(tmp_path, capsys):
    config = _sweep_config(tmp_path)
    specs = sweep(config, tmp_path / "out", dry_run=True)
    ids = [s.run_id for s in specs]
    assert ids == ["N512-V16-H4-M8-O1-s0", "N256-V16-H4-M8-O1-s0", "N1024-V16-H4-M8-O1-s0",
                   "N512-V16-H2-M8-O1-s0", "N512-V16-H8-M8-O1-s0"]
    assert [s.role for s in specs] == ["baseline", "N", "N", "H", "H"]
    listing = capsys.readouterr().out
    for run in ids:
        assert f"todo  {run}" in listing
        saved = yaml.safe_load((tmp_path / "out" / "runs" / run / "config.yaml").read_text())
        values = dict(part.split("s", 1) if part.startswith("s") else (part[0], part[1:])
                      for part in run.split("-"))
        assert saved["data"]["init_args"]["train_samples"] == int(values["N"])
        assert saved["model"]["init_args"]["embedding_dim"] == int(values["H"])
        assert saved["model"]["init_args"]["num_embeddings"] == 16
        assert saved["model"]["init_args"]["over_arch_layer_sizes"] == [8]
        assert saved["trainer"]["callbacks"] == [{"class_path": "callbacks.run_summary.RunSummary", "init_args": {
            "path": str(tmp_path / "out" / "runs" / run / "summary.json")}}]
        assert saved["trainer"]["logger"]["init_args"]["name"] == run
        assert saved["checkpoint"] == {"save_last": False, "save_top_k": 0}
    assert not (tmp_path / "out" / "results.csv").exists()
    one = build_grid(config, points_from_one_run=True)
    assert [s.run_id for s in one][-1] == "N1024-V16-H4-M8-O1-s0-points"
    assert one[-1].eval_at == (256, 512, 1024) and len(one) == 4


def test_saved_run_config_parses_with_the_cli(tmp_path, capsys):
    from lit.cli import main

    config = _sweep_config(tmp_path)
    sweep(config, tmp_path / "out", dry_run=True)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tmp_path / "out/runs/N512-V16-H2-M8-O1-s0/config.yaml"),
              "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "callbacks.run_summary.RunSummary" in capsys.readouterr().out


def test_resume_skips_finished_runs(tmp_path, capsys):
    config = _sweep_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for spec in build_grid(config):
        append_row(out / "results.csv", _row(spec.run_id, spec.role, spec.values["N"]))
    # every run is done: no subprocess may start (this interpreter path does not exist)
    sweep(config, out, python=str(tmp_path / "no-python"))
    assert "5 runs in the grid, 5 already done, 0 to run" in capsys.readouterr().out
    assert len(read_results(out / "results.csv")) == 5


@pytest.mark.parametrize("text, match", [
    (SWEEP_YAML.replace("axes:", "axes:\n  Q: [1]"), "unknown knob 'Q'"),
    (SWEEP_YAML.replace("baseline: {N: 512, ", "baseline: {"), "baseline.N"),
    (SWEEP_YAML.replace("base_config: configs/dlrm/synthetic.yaml", "base_config: nope.yaml"),
     "is not a file"),
    (SWEEP_YAML + "grid: diagonal\n", "grid must be"),
])
def test_bad_sweep_configs(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        _sweep_config(tmp_path, text)


def test_rows_are_appended_whole(tmp_path):
    path = tmp_path / "r.csv"
    append_row(path, _row("a", "N", 10, error='quote " and, comma\nnewline'))
    rows = read_results(path)
    assert list(rows[0]) == COLUMNS and rows[0]["error"] == 'quote " and, comma\nnewline'


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sweep_end_to_end_records_failures_resumes_and_survives_ctrl_c(tmp_path):
    """Real `python -m lit fit` subprocesses: a failing grid point (H=0) is recorded and the sweep
    goes on; a second start runs only what failed; Ctrl-C mid-run leaves whole rows only."""
    text = SWEEP_YAML.replace("H: [2, 4, 8]", "H: [0, 8]").replace("N: [256, 512, 1024]", "N: [256]")
    config_path = tmp_path / "sweep.yaml"
    config_path.write_text(text)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    cmd = [sys.executable, "-m", "lit.scaling", "sweep", "--config", str(config_path), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_results(out / "results.csv")
    status = {r["run_id"]: r["status"] for r in rows}
    assert status == {"N512-V16-H4-M8-O1-s0": "ok", "N256-V16-H4-M8-O1-s0": "ok",
                      "N512-V16-H0-M8-O1-s0": "failed", "N512-V16-H8-M8-O1-s0": "ok"}
    failed = next(r for r in rows if r["status"] == "failed")
    assert "embedding_dim must be >= 1" in failed["error"]
    ok = next(r for r in rows if r["run_id"] == "N512-V16-H4-M8-O1-s0")
    assert int(ok["samples_seen"]) == 512 and int(ok["embedding_parameters"]) == (16 + 16 + 7) * 4
    assert float(ok["train_flops"]) == 3 * 512 * float(ok["forward_flops_per_sample"])
    assert 0 < float(ok["test_ne"]) < 1.5 and 0 < float(ok["train_ne"]) < 1.5
    assert list((out / "tb" / "N512-V16-H4-M8-O1-s0").rglob("events.out.tfevents*"))
    # resume: only the failed run is tried again (and fails again)
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert "4 runs in the grid, 3 already done, 1 to run" in again.stdout
    assert len(read_results(out / "results.csv")) == 5
    # Ctrl-C in the middle of a run: exit 130, no partial row, the run is still to do
    config_path.write_text(text.replace("H: [0, 8]", "H: [16]"))
    sweep_proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    log = out / "runs" / "N512-V16-H16-M8-O1-s0" / "log.txt"
    deadline = time.time() + 120
    while not (log.is_file() and log.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.2)
    sweep_proc.send_signal(signal.SIGINT)
    _, err = sweep_proc.communicate(timeout=120)
    assert sweep_proc.returncode == 130 and "resume" in err
    rows = read_results(out / "results.csv")
    assert len(rows) == 5 and all(r["status"] in ("ok", "failed") for r in rows)
    assert math.isfinite(float(rows[0]["test_ne"]))


def test_points_from_one_run_become_rows_and_the_report_says_so(tmp_path):
    from lit.scaling.fit import markdown
    from lit.scaling.sweep import rows_from_summary

    config = _sweep_config(tmp_path)
    spec = build_grid(config, points_from_one_run=True)[-1]
    summary = {"embedding_parameters": 100, "dense_parameters": 10, "forward_flops_per_sample": 7,
               "samples_seen": 1024, "train_logloss": 0.5, "train_ne": 0.9, "test_ne": 0.8,
               "eval_at": [{"samples": 256.0, "logloss": 0.6, "ne": 0.95, "auroc": 0.6,
                            "train_logloss": 0.65, "train_ne": 1.0},
                           {"samples": 1024.0, "logloss": 0.5, "ne": 0.85, "auroc": 0.7,
                            "train_logloss": 0.5, "train_ne": 0.9}]}
    rows = rows_from_summary(spec, summary, Path("c.yaml"), 3.0)
    assert [(r["N"], r["source"], r["test_ne"], r["train_ne"], r["train_flops"]) for r in rows] == \
        [(256, "eval_at", 0.95, 1.0, 3 * 7 * 256), (1024, "eval_at", 0.85, 0.9, 3 * 7 * 1024)]
    assert all(r["role"] == "N" and r["run_id"].endswith("-points") for r in rows)
    assert "--points-from-one-run" in markdown([], 0.95, 0.005, [], from_one_run=True)
