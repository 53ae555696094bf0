"""``python -m lit.tradeoff``: the PatchDropout time-accuracy study (see :mod:`lit.tradeoff`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lit import tradeoff
from lit.tradeoff.grid import run_name, run_one
from lit.tradeoff.report import write_outputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lit.tradeoff",
                                     description=tradeoff.__doc__.split("\n\n")[0],
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
