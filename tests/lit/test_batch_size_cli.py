"""``python -m lit.batch_size``: a real series of three tiny Fashion-MNIST runs through
``python -m lit fit`` (lr scaled, result recorded, pruning order), the history table, the
simulator on landscapes with a known best size, and bad input rejected with clear errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from lit.batch_size.__main__ import main, table_rows
from lit.batch_size.history import History
from lit.batch_size.runner import JobConfig, Target
from lit.batch_size.simulate import Arm, Landscape, convex_landscape, run_series
from tests.conftest import CONFIGS, ROOT, needs_fmnist


def wrapper(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "lit.batch_size", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # three `lit fit` processes: about 40 s on an idle 2-core machine
@needs_fmnist
def test_three_real_tiny_runs(tmp_path) -> None:
    hist = tmp_path / "bs.sqlite"
    proc = wrapper("run", "--config", str(CONFIGS / "quickstart.yaml"), "--batch-sizes", "64", "128",
                   "--target", "val/acc>=0.05", "--lr-rule", "sqrt", "--history", str(hist),
                   # no early stop: on a loaded machine a tiny run's time can pass 2x another's
                   "--beta", "0", "--recurrences", "3", "--", "--trainer.limit_train_batches", "2",
                   "--trainer.limit_val_batches", "1", "--trainer.max_epochs", "1",
                   "--test_after_fit", "false", "--trainer.enable_progress_bar", "false",
                   f"--trainer.logger.init_args.save_dir={tmp_path / 'tb'}",
                   f"--trainer.default_root_dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = History(hist).runs()
    # pruning round 1 from the config's 128: 128, then down to 64; round 2 from the cheaper one
    assert [r.batch_size for r in runs][:2] == [128, 64]
    assert all(r.status == "reached" and r.cost_unit == "s" and r.cost > 0 for r in runs), runs
    assert runs[2].phase == "pruning 2" and runs[2].batch_size == min(runs[:2], key=lambda r: r.cost).batch_size
    assert all(r.steps == 2 and r.epochs == 1.0 for r in runs)
    # each run trained with its batch size and the sqrt-scaled lr (read back from its config)
    configs = sorted((tmp_path / "tb" / "quickstart").glob("version_*/config.yaml"))
    seen = set()
    for path in configs:
        cfg = yaml.safe_load(path.read_text())
        b = cfg["data"]["init_args"]["batch_size"]
        lr = cfg["model"]["init_args"]["optimizer"]["init_args"]["lr"]
        assert lr == pytest.approx(0.002 * math.sqrt(b / 128))
        seen.add(b)
    assert seen == {64, 128}
    result = json.loads((tmp_path / "bs.runs" / "run1.json").read_text())
    assert result["status"] == "reached" and result["monitor"] == "val/acc"
    table = wrapper("history", "--history", str(hist), "--runs")
    assert table.returncode == 0 and "| 128 |" in table.stdout and "pruning 2" in table.stdout


def test_table_rows_by_hand(tmp_path) -> None:
    history = History(tmp_path / "h.sqlite")
    for b, status, cost in [(64, "reached", 10.0), (64, "reached", 14.0), (128, "stopped", 30.0),
                            (128, "failed", None)]:
        run = history.claim("j", lambda obs, runs: (b, "pruning", None, None))
        history.finish(run.id, status, cost=cost)
    rows = {r["batch_size"]: r for r in table_rows(history.runs("j"))}
    assert rows[64]["mean_cost"] == 12.0 and rows[64]["std_cost"] == 2.0
    # posterior of the mean cost: N(12, var/n) = N(12, 4/2)
    assert rows[64]["posterior"] == (12.0, pytest.approx(math.sqrt(2.0)))
    assert (rows[128]["runs"], rows[128]["stopped"], rows[128]["failed"]) == (2, 1, 1)


def test_simulation_finds_the_known_best() -> None:
    land = convex_landscape()
    assert land.best() == 256
    for seed in range(3):
        series = run_series(land, 40, seed)
        assert sum(b == 256 for b, _, _ in series[-10:]) >= 8
        assert not any(r for b, _, r in series if b in (8, 1024))  # never reach the target


def test_simulate_command_on_a_json_landscape_and_a_recorded_table(tmp_path, capsys) -> None:
    spec = {"default": 32, "sizes": {"16": {"cost": 50, "std": 2}, "32": {"cost": 40, "std": 2},
                                     "64": {"cost": 20, "std": 2},
                                     "128": {"cost": 30, "std": 2, "reach": 0.0}}}
    (tmp_path / "l.json").write_text(json.dumps(spec))
    assert main(["simulate", "--landscape", str(tmp_path / "l.json"), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "best (lowest expected cost) 64" in out and ">= 8 in 2/2 seeds" in out
    (tmp_path / "t.csv").write_text("batch_size,cost,reached\n32,40,1\n32,42,1\n64,21,1\n64,19,1\n"
                                    "128,80,0\n")
    assert main(["simulate", "--table", str(tmp_path / "t.csv"), "--default", "32"]) == 0
    assert "best (lowest expected cost) 64" in capsys.readouterr().out


def test_parsing_and_bad_input(tmp_path, capsys) -> None:
    assert Target.parse("val/acc >= 0.85") == Target("val/acc", "max", 0.85)
    assert Target.parse("val/loss<=0.3") == Target("val/loss", "min", 0.3)
    job = JobConfig.read(CONFIGS / "quickstart.yaml")
    assert (job.batch_size, job.lr, job.lr_flag) == (128, 0.002, "--model.init_args.optimizer.init_args.lr")
    base = ["run", "--config", str(CONFIGS / "quickstart.yaml"), "--history", str(tmp_path / "h")]
    for extra, message in [
        (["--target", "val/acc=0.85", "--batch-sizes", "64"], "target must look like"),
        (["--target", "val/acc>=0.85", "--batch-sizes", "64", "256"], "default batch size 128"),
        (["--target", "val/acc>=0.85"], "give the candidates"),
        (["--target", "val/acc>=0.85", "--range", "64", "32"], "--range needs"),
        (["--target", "val/acc>=0.85", "--range", "64", "256", "--eta", "2"], "eta must be in"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(base + extra)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    no_lr = tmp_path / "no_lr.yaml"
    no_lr.write_text("data:\n  init_args:\n    batch_size: 32\n")
    with pytest.raises(SystemExit):
        main(["run", "--config", str(no_lr), "--history", str(tmp_path / "h"), "--target",
              "val/acc>=0.5", "--range", "16", "64", "--lr-rule", "linear"])
    assert "--lr-rule linear needs an lr" in capsys.readouterr().err
    with pytest.raises(ValueError, match="default 3 is not among"):
        Landscape(3, arms={8: Arm(1.0, 0.0)})


@pytest.mark.slow  # two gloo processes
@needs_fmnist
def test_ddp_run_stops_together_and_records_once(tmp_path) -> None:
    hist = tmp_path / "bs.sqlite"
    proc = wrapper("run", "--config", str(CONFIGS / "quickstart.yaml"), "--batch-sizes", "64", "128",
                   "--target", "val/acc>=0.05", "--history", str(hist), "--",
                   "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                   "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1",
                   "--trainer.max_epochs", "3", "--test_after_fit", "false",
                   "--trainer.enable_progress_bar", "false",
                   f"--trainer.logger.init_args.save_dir={tmp_path / 'tb'}",
                   f"--trainer.default_root_dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = History(hist).runs()
    assert (run.status, run.steps, run.epochs) == ("reached", 4, 1.0)  # first validation met it


def test_drift_switches_the_landscape_at_its_recurrence() -> None:
    land, moved = convex_landscape(), convex_landscape(best=64)
    assert moved.best() == 64 and moved.expected(64) == pytest.approx(100.0)
    # drift at 0: the whole series runs on the moved landscape, and finds its best
    series = run_series(land, 40, 0, drift=(0, moved))
    assert sum(b == 64 for b, _, _ in series[-10:]) >= 8
    # drift at 30: the first 30 outcomes equal the undrifted series' (same draws)
    assert run_series(land, 60, 1, drift=(30, moved))[:30] == run_series(land, 30, 1)
