"""The trade-off study tool: a tiny real grid on Fashion-MNIST writes its table, plot and
TensorBoard scalars; the schedule and the equal-epoch table against hand-computed values."""

from __future__ import annotations

import csv
import math

import pytest

from lit.tradeoff import Point, cosine_factor, main, parse_args, summarise
from tests.conftest import needs_fmnist


def test_cosine_factor_hand_values() -> None:
    assert cosine_factor(0.0, warmup=0.1) == pytest.approx(1e-3 / 0.1)
    assert cosine_factor(0.05, warmup=0.1) == pytest.approx(0.051 / 0.1)
    assert cosine_factor(0.1, warmup=0.1) == pytest.approx(1.0)
    assert cosine_factor(0.55, warmup=0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_factor(1.0, warmup=0.1) == pytest.approx(0.0, abs=1e-12)
    assert cosine_factor(3.0, warmup=0.1) == pytest.approx(0.0, abs=1e-12)  # past the budget


def _point(run: str, epochs: float, acc: float, end: bool, keep: float = 1.0) -> Point:
    return Point(run=run, model="m", params=1_000_000, keep_rate=keep, resolution=28, train_s=10 * epochs,
                 epochs=epochs, steps=int(100 * epochs), images_per_s=1000.0, val_acc=acc, at_epoch_end=end)


def test_summary_has_final_rows_and_an_equal_epoch_table() -> None:
    points = [_point("a", 0.5, 0.5, False), _point("a", 1.0, 0.6, True), _point("a", 2.0, 0.7, True),
              _point("b", 1.0, 0.55, True, keep=0.5), _point("b", 1.4, 0.58, False, keep=0.5)]
    rows, markdown = summarise(points)
    assert [(r["run"], r["val_acc"], r["epochs"]) for r in rows] == [("a", 0.7, 2.0), ("b", 0.58, 1.4)]
    assert "| a | 0.6000 | 0.7000 |" in markdown
    assert "| b | 0.5500 | - |" in markdown


def test_arguments_are_checked() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--keep_rates", "1.0"])  # neither a budget nor epochs
    with pytest.raises(SystemExit):
        parse_args(["--budget_s", "10", "--keep_rates", "0"])


@needs_fmnist
def test_tiny_grid_writes_table_plot_and_tensorboard(tmp_path) -> None:
    out = tmp_path / "study"
    points = main(["--models", "deit_fmnist_tiny_patch4_28", "--keep_rates", "0.5",
                   "--budget_s", "1.5", "--eval_every_s", "0.7", "--eval_images", "128", "--test_images", "128",
                   "--batch_size", "32", "--clock", "cpu", "--accelerator", "cpu", "--out", str(out)])
    runs = {p.run for p in points}
    assert runs == {"deit_fmnist_tiny_patch4_28-keep0.5-res28"}
    with open(out / "summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert len(summary) == 1 and all(0.0 <= float(r["val_acc"]) <= 1.0 for r in summary)
    assert all(r["test_acc"] for r in summary)
    finals = [p for p in points if p.test_acc is not None]
    assert len(finals) == 1 and all(p.train_s >= 1.5 for p in finals)  # stopped at the budget
    assert (out / "tradeoff.png").stat().st_size > 10_000
    assert "| run | params (M) | keep |" in (out / "summary.md").read_text()
    for run in runs:
        assert list((out / "tb" / run).glob("events.out.tfevents.*"))
