"""The PatchDropout time-accuracy trade-off study (Liu et al., arXiv 2208.07220, Sec. 5):
train a grid of (model size, keep rate, resolution) for a fixed training-time budget each and
compare accuracy against training time.

    python -m lit.tradeoff --models deit_fmnist_tiny_patch4_28 deit_fmnist_small_patch4_28 \\
        --keep_rates 1.0 0.5 0.25 --resolutions 28 --budget_s 120 --out runs/tradeoff

Each grid point is one ``python -m lit fit`` subprocess with a config written by this tool
(kept as ``<out>/runs/<run>/config.yaml``): :class:`models.ImageClassifier` on Fashion-MNIST
(resized when the resolution is not 28), AdamW, :class:`lit.schedulers.WarmupDecay` (5 % warm-up,
cosine) and :class:`callbacks.BudgetEvaluator`, which stops at the budget, ends the schedule
with the run, and scores ``--eval_images`` held-out images every ``--eval_every_s`` training
seconds and at every epoch end; the official test set is scored once at the end.

Writes into ``--out``: ``curves.csv`` (every evaluation), ``summary.csv`` and ``summary.md``
(one row per run, plus accuracy at each common epoch), ``tradeoff.png`` (validation accuracy vs
training time) and TensorBoard scalars under ``tb/<run>``
(``tradeoff/val_acc`` with the step = training seconds).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

def run_name(model: str, keep_rate: float, resolution: int) -> str:
    return f"{model}-keep{keep_rate:g}-res{resolution}"


def run_config(args: argparse.Namespace, model: str, keep_rate: float, resolution: int, points_file: Path) -> dict:
    """The ``python -m lit fit`` config of one grid point."""
    gpu = args.accelerator == "gpu" or (args.accelerator == "auto" and torch.cuda.is_available())
    resize = [{"class_path": "torchvision.transforms.v2.Resize",
               "init_args": {"size": [resolution, resolution], "antialias": True}}] if resolution != 28 else None
    data = {"batch_size": args.batch_size, "val_size": args.eval_images, "seed": args.seed,
            "num_workers": args.num_workers, "train_transforms": resize, "eval_transforms": resize}
    if args.data_dir is not None:
        data["data_dir"] = args.data_dir
    test_batches = math.ceil(args.test_images / args.batch_size) if args.test_images else 1.0
    return {
        "seed_everything": args.seed,
        "test_after_fit": True,
        "trainer": {
            "max_epochs": args.max_epochs or 10_000, "accelerator": "gpu" if gpu else "cpu", "devices": 1,
            "precision": "bf16-mixed" if gpu else "32-true", "logger": False, "enable_checkpointing": False,
            "default_root_dir": str(points_file.parent),  # the CLI's resolved config lands here
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "limit_test_batches": test_batches,
            "callbacks": [{"class_path": "callbacks.BudgetEvaluator", "init_args": {
                "points_file": str(points_file), "run": run_name(model, keep_rate, resolution),
                "budget_s": args.budget_s, "eval_every_s": args.eval_every_s, "clock": args.clock}}]},
        "model": {"class_path": "models.ImageClassifier", "init_args": {
            "backbone": model, "num_classes": 10, "in_chans": 1, "img_size": resolution,
            "keep_rate": keep_rate, "label_smoothing": 0.1,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": args.lr, "weight_decay": 0.05}},
            "lr_scheduler": {"class_path": "lit.schedulers.WarmupDecay",
                             "init_args": {"warmup_fraction": 0.05, "decay": "cosine"}}}},
        "data": {"class_path": "datamodules.FashionMNIST", "init_args": data},
    }


def run_one(args: argparse.Namespace, model: str, keep_rate: float, resolution: int) -> list[dict]:
    """Train one grid point in a ``python -m lit fit`` subprocess; its evaluations as dicts."""
    name = run_name(model, keep_rate, resolution)
    folder = Path(args.out) / "runs" / name
    folder.mkdir(parents=True, exist_ok=True)
    points_file = folder / "points.json"
    points_file.unlink(missing_ok=True)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(args, model, keep_rate, resolution, points_file), sort_keys=False))
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    print(f"run {name}: python -m lit fit --config {config}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "lit", "fit", "--config", str(config)], env=env)
    if proc.returncode != 0:
        raise SystemExit(f"run {name} failed (exit {proc.returncode}); its config: {config}")
    points = json.loads(points_file.read_text()) if points_file.is_file() else []
    return [{**p, "model": model, "keep_rate": keep_rate, "resolution": resolution} for p in points]


def summarise(points: list[dict]) -> tuple[list[dict], str]:
    """One row per run (final point) and a markdown report with an equal-epoch table."""
    runs: dict[str, list[dict]] = {}
    for p in points:
        runs.setdefault(p["run"], []).append(p)
    rows = [{"run": name, "model": pts[-1]["model"], "params_M": round(pts[-1]["params"] / 1e6, 2),
             **{k: pts[-1][k] for k in ("keep_rate", "resolution", "train_s", "epochs", "images_per_s",
                                         "val_acc", "test_acc")}} for name, pts in runs.items()]
    lines = ["| run | params (M) | keep | res | train s | epochs | images/s | val acc | test acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        test = r["test_acc"] if r["test_acc"] is not None else "-"
        lines.append(f"| {r['run']} | {r['params_M']} | {r['keep_rate']} | {r['resolution']} | {r['train_s']} | "
                     f"{r['epochs']} | {r['images_per_s']} | {r['val_acc']:.4f} | {test} |")
    epoch_acc = {name: {round(p["epochs"]): p["val_acc"] for p in pts if p["at_epoch_end"]}
                 for name, pts in runs.items()}
    common = sorted(set().union(*epoch_acc.values())) if epoch_acc else []
    if common:
        lines += ["", "Validation accuracy at each epoch end (equal epochs):", "",
                  "| run | " + " | ".join(f"epoch {e}" for e in common) + " |",
                  "|---|" + "---|" * len(common)]
        for name, accs in epoch_acc.items():
            lines.append(f"| {name} | " + " | ".join(f"{accs[e]:.4f}" if e in accs else "-" for e in common) + " |")
    return rows, "\n".join(lines) + "\n"


def write_outputs(points: list[dict], out: Path) -> None:
    """curves.csv, summary.csv, summary.md, tradeoff.png and TensorBoard scalars under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    rows, markdown = summarise(points)
    for filename, table, fields in (("curves.csv", points, list(points[0])), ("summary.csv", rows, list(rows[0]))):
        with open(out / filename, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(table)
    (out / "summary.md").write_text(markdown)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(p["run"] for p in points):
        pts = [p for p in points if p["run"] == name]
        ax.plot([p["train_s"] for p in pts], [p["val_acc"] for p in pts], marker="o", label=name)
        writer = SummaryWriter(str(out / "tb" / name))
        for p in pts:
            writer.add_scalar("tradeoff/val_acc", p["val_acc"], global_step=int(round(p["train_s"])))
            writer.add_scalar("tradeoff/val_acc_vs_epoch_x100", p["val_acc"], global_step=int(round(p["epochs"] * 100)))
        writer.close()
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("PatchDropout: accuracy vs training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=120)
    plt.close(fig)
    print(markdown)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deit_fmnist_tiny_patch4_28", "deit_fmnist_small_patch4_28"],
                        help="timm model names (the 28x28 ones are registered by models.timm_tiny)")
    parser.add_argument("--keep_rates", nargs="+", type=float, default=[1.0, 0.5, 0.25])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[28])
    parser.add_argument("--budget_s", type=float, default=None, help="training seconds per run")
    parser.add_argument("--max_epochs", type=int, default=None, help="epochs per run (with or without a budget)")
    parser.add_argument("--eval_every_s", type=float, default=30.0)
    parser.add_argument("--eval_images", type=int, default=2000, help="held-out training images for validation")
    parser.add_argument("--test_images", type=int, default=None, help="score only this many test images")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--data_dir", default=None, help="Fashion-MNIST folder (default: the datamodule's)")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="budget in wall seconds or in this process's CPU seconds (shared machines)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--only_runs", nargs="+", default=None,
                        help="run only these grid points, named MODEL-keepK-resR (as in the output)")
    parser.add_argument("--out", default="runs/tradeoff")
    args = parser.parse_args(argv)
    if args.budget_s is None and args.max_epochs is None:
        parser.error("--budget_s or --max_epochs: give at least one, e.g. --budget_s 120")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget_s must be > 0 seconds, got {args.budget_s!r}")
    if any(not 0 < k <= 1 for k in args.keep_rates):
        parser.error(f"--keep_rates must be in (0, 1], got {args.keep_rates!r}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    points: list[dict] = []
    for model_name in args.models:
        for resolution in args.resolutions:
            for keep_rate in args.keep_rates:
                if args.only_runs and run_name(model_name, keep_rate, resolution) not in args.only_runs:
                    continue
                points += run_one(args, model_name, keep_rate, resolution)
    if not points:
        raise SystemExit("no evaluation happened: raise --budget_s or --max_epochs")
    write_outputs(points, Path(args.out))
    return points


if __name__ == "__main__":
    main()
