"""The trade-off study tool: a tiny real grid on Fashion-MNIST (one ``python -m lit fit``
subprocess per point) writes its table, plot and TensorBoard scalars; the schedule's planned
length and the equal-epoch table against hand-computed values; bad arguments name the flag."""

from __future__ import annotations

import csv

import pytest

from callbacks.budget_evaluator import BudgetEvaluator, expected_steps
from lit.tradeoff.__main__ import main, parse_args
from lit.tradeoff.report import summarise
from tests.conftest import needs_fmnist


def test_expected_steps_hand_values() -> None:
    assert expected_steps(1000, 0, 0.0, 60.0) == 1000  # no rate measured yet: the Trainer's length
    assert expected_steps(1000, 50, 10.0, 60.0) == 300  # 5 steps/s for 60 s
    assert expected_steps(200, 50, 10.0, 60.0) == 200  # the epochs end first
    assert expected_steps(1000, 50, 70.0, 60.0) == 51  # past the budget: at least one more step
    assert expected_steps(1000, 50, 10.0, None) == 1000  # no budget


def _point(run: str, epochs: float, acc: float, end: bool, keep: float = 1.0) -> dict:
    return {"run": run, "model": "m", "params": 1_000_000, "keep_rate": keep, "resolution": 28,
            "train_s": 10 * epochs, "epochs": epochs, "steps": int(100 * epochs), "images_per_s": 1000.0,
            "val_acc": acc, "at_epoch_end": end, "test_acc": None}


def test_summary_has_final_rows_and_an_equal_epoch_table() -> None:
    points = [_point("a", 0.5, 0.5, False), _point("a", 1.0, 0.6, True), _point("a", 2.0, 0.7, True),
              _point("b", 1.0, 0.55, True, keep=0.5), _point("b", 1.4, 0.58, False, keep=0.5)]
    rows, markdown = summarise(points)
    assert [(r["run"], r["val_acc"], r["epochs"], r["params_M"]) for r in rows] == [("a", 0.7, 2.0, 1.0),
                                                                                   ("b", 0.58, 1.4, 1.0)]
    assert "| a | 0.6000 | 0.7000 |" in markdown
    assert "| b | 0.5500 | - |" in markdown


@pytest.mark.parametrize("argv, message", [
    (["--keep_rates", "1.0"], "--budget_s or --max_epochs: give at least one"),
    (["--budget_s", "10", "--keep_rates", "0"], "--keep_rates must be in (0, 1], got [0.0]"),
    (["--budget_s", "-1"], "--budget_s must be > 0 seconds, got -1.0"),
])
def test_arguments_are_checked(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_budget_evaluator_arguments_name_the_field(tmp_path) -> None:
    with pytest.raises(ValueError, match="budget_s must be > 0 seconds or null, got 0"):
        BudgetEvaluator(str(tmp_path / "p.json"), budget_s=0)
    with pytest.raises(ValueError, match="eval_every_s must be > 0 seconds, got -1"):
        BudgetEvaluator(str(tmp_path / "p.json"), eval_every_s=-1)
    with pytest.raises(ValueError, match="clock must be 'wall' or 'cpu', got 'gpu'"):
        BudgetEvaluator(str(tmp_path / "p.json"), clock="gpu")


@needs_fmnist
def test_tiny_grid_writes_table_plot_and_tensorboard(tmp_path) -> None:
    out = tmp_path / "study"
    points = main(["--models", "deit_fmnist_tiny_patch4_28", "--keep_rates", "0.5",
                   "--budget_s", "1.5", "--eval_every_s", "0.7", "--eval_images", "128", "--test_images", "128",
                   "--batch_size", "32", "--clock", "cpu", "--threads", "1", "--accelerator", "cpu",
                   "--out", str(out)])
    runs = {p["run"] for p in points}
    assert runs == {"deit_fmnist_tiny_patch4_28-keep0.5-res28"}
    with open(out / "summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert len(summary) == 1 and all(0.0 <= float(r["val_acc"]) <= 1.0 for r in summary)
    assert all(r["test_acc"] for r in summary)
    finals = [p for p in points if p["test_acc"] is not None]
    assert len(finals) == 1 and finals[0] is points[-1] and finals[0]["train_s"] >= 1.5  # stopped at the budget
    assert len(points) >= 2 and points[0]["train_s"] >= 0.7  # evaluated on the clock before the budget
    assert (out / "tradeoff.png").stat().st_size > 10_000
    assert "| run | params (M) | keep |" in (out / "summary.md").read_text()
    for run in runs:
        assert list((out / "tb" / run).glob("events.out.tfevents.*"))
