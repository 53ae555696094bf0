"""Adan vs AdamW on the quickstart task (tiny DeiT, real Fashion-MNIST) at an equal budget.

Each optimizer gets the same model, data, epochs, warmup-cosine schedule and seed, and a small
learning-rate grid; the lr with the best validation accuracy is its tuned lr, and the table
reports that run's test accuracy (the official 10k) beside every grid point.

    python benchmarks/adan_quality.py          # 2 epochs x 200 batches, 3 lrs each (CPU)
    python benchmarks/adan_quality.py --epochs 6 --train-batches 430 --adan-lrs 0.01 --adamw-lrs 0.002
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VAL_BATCHES = 10  # 1,280 of the 5,000 held-out images choose the lr; the test uses all 10k
CONFIGS = {"AdamW": ROOT / "configs" / "quickstart.yaml",
           "Adan": ROOT / "configs" / "quickstart_adan.yaml"}


def run(optimizer: str, lr: float, epochs: int, train_batches: int, workdir: Path) -> dict[str, float]:
    """Train with the optimizer's quickstart config at ``lr``; return val/test accuracy."""
    from lit.cli import main

    start = time.perf_counter()
    cli = main(["fit", "--config", str(CONFIGS[optimizer]),
                f"--trainer.max_epochs={epochs}", "--trainer.enable_progress_bar=false",
                f"--trainer.limit_train_batches={train_batches}",
                f"--trainer.limit_val_batches={VAL_BATCHES}",
                f"--model.init_args.optimizer.init_args.lr={lr}",
                f"--trainer.default_root_dir={workdir}",
                f"--trainer.logger.init_args.save_dir={workdir / 'runs'}",
                f"--trainer.logger.init_args.name={optimizer}_{lr}", "--test_after_fit=false"])
    opt = cli.trainer.optimizers[0]
    assert type(opt).__name__ == optimizer, type(opt)
    val_acc = float(cli.trainer.callback_metrics["val/acc"])
    test_acc = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]["test/acc"]
    return {"val_acc": val_acc, "test_acc": float(test_acc),
            "minutes": (time.perf_counter() - start) / 60,
            "weight_decay": opt.param_groups[0]["weight_decay"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--train-batches", type=int, default=200,
                        help="batches of 128 per epoch (430 is the full 55k split)")
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=[2e-3, 4e-3, 8e-3])
    parser.add_argument("--adan-lrs", type=float, nargs="+", default=[5e-3, 1e-2, 2e-2])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, list[tuple[float, dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer, lrs in (("AdamW", args.adamw_lrs), ("Adan", args.adan_lrs)):
            for lr in lrs:
                r = run(optimizer, lr, args.epochs, args.train_batches, Path(tmp))
                print(f"[adan_quality] {optimizer} lr={lr}: {r}", flush=True)
                results.setdefault(optimizer, []).append((lr, r))

    print(f"\nQuickstart (tiny DeiT, Fashion-MNIST), {args.epochs} epochs x {args.train_batches} "
          "batches of 128, warmup 5% + cosine, seed 0")
    print(f"{'optimizer':<10}{'lr':>8}{'wd':>7}{'val acc':>10}{'test acc':>10}{'min':>7}  tuned")
    for optimizer, rows in results.items():
        best = max(rows, key=lambda r: r[1]["val_acc"])[0]
        for lr, r in rows:
            print(f"{optimizer:<10}{lr:>8g}{r['weight_decay']:>7g}{r['val_acc']:>10.4f}"
                  f"{r['test_acc']:>10.4f}{r['minutes']:>7.1f}  {'<-' if lr == best else ''}")


if __name__ == "__main__":
    main()
