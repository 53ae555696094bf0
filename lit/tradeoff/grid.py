"""The grid points of the trade-off study: one ``python -m lit fit`` config and subprocess each
(see :mod:`lit.tradeoff`)."""

from __future__ import annotations

import argparse
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
