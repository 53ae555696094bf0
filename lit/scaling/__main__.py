"""``python -m lit.scaling {sweep,fit,allocate}``: see :mod:`lit.scaling`."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import yaml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lit.scaling",
                                     description="Scaling-law sweeps, fits and compute allocation "
                                                 "for DLRM (arXiv 2208.08489).")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sweep", help="run the grid of a sweep config (resumable)")
    s.add_argument("--config", required=True, help="sweep config, e.g. configs/dlrm/scaling_synthetic.yaml")
    s.add_argument("--out", default=None, help="output folder (default: the config's `out`)")
    s.add_argument("--dry-run", action="store_true", help="list the runs and write their configs only")
    s.add_argument("--points-from-one-run", action="store_true",
                   help="take the data-scaling points from EvalAtSamples inside one run at the "
                        "largest N (cheaper; biases the exponent, and the report says so)")
    s.add_argument("--only", nargs="+", choices=["N", "V", "H", "M", "O", "grid"], default=None,
                   help="run only the runs built for these axes (the baseline goes with N)")
    s.add_argument("--timeout", type=float, default=None, help="seconds per run before it counts as failed")
    s.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra dotted overrides for every run, YAML values, e.g. "
                        "data.init_args.train_files='[day_0.gz, day_1.gz]' trainer.devices=1")

    f = sub.add_parser("fit", help="fit L(x) = alpha x^-beta + gamma per curve of a results table")
    f.add_argument("results", help="results.csv written by `sweep`")
    f.add_argument("--out", default=None, help="output folder (default: fit/ beside the table)")
    f.add_argument("--metrics", nargs="+", default=["test_ne", "train_ne"],
                   choices=["test_ne", "train_ne", "test_logloss", "train_logloss"])
    f.add_argument("--curves", nargs="+", default=None,
                   choices=["N", "V", "H", "M", "O", "compute"],
                   help="curves to fit (default: every curve with enough points); a curve named "
                        "here with too few points is an error")
    f.add_argument("--confidence", type=float, default=0.95,
                   help="level of the profile-likelihood intervals")
    f.add_argument("--flat-tol", type=float, default=0.005,
                   help="'out of steam' when the whole interval of the relative loss drop over the "
                        "last 10x of x is below this, 'cannot tell' when it straddles it")
    f.add_argument("--compute-envelope", action="store_true",
                   help="fit the compute curve on the lower envelope of the runs (each point beats "
                        "every smaller-compute one) instead of every run; biases gamma down")

    a = sub.add_parser("allocate", help="split a compute budget between data and one knob")
    a.add_argument("results", help="results.csv written by `sweep`")
    a.add_argument("--compute", type=float, required=True, help="training FLOPs (3 x forward x samples)")
    a.add_argument("--metric", default="test_ne", choices=["test_ne", "train_ne", "test_logloss",
                                                          "train_logloss"])
    a.add_argument("--extrapolate", type=float, default=1.0,
                   help="allow knob sizes this factor beyond the measured range (1 = none)")
    a.add_argument("--bootstrap", type=int, default=1000,
                   help="residual-bootstrap resamples for the predicted loss's interval")
    a.add_argument("--confidence", type=float, default=0.95)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default=None, help="also write the table as markdown here")
    return parser.parse_args(argv)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "sweep":
        # Ctrl-C, `kill -INT` and `kill -TERM` all stop the sweep cleanly, also when it was
        # started in the background (where the shell makes it ignore SIGINT).
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
        from lit.scaling.sweep import load_sweep_config, sweep

        config = load_sweep_config(args.config)
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise SystemExit(f"sweep: --set takes KEY=VALUE, got {item!r}")
            config.set[key] = yaml.safe_load(value)
        try:
            sweep(config, Path(args.out or config.out), args.points_from_one_run, args.dry_run,
                  timeout=args.timeout, only=args.only)
        except KeyboardInterrupt:
            print("\n[scaling] interrupted: the results table holds every finished run; start the "
                  "same command again to resume", file=sys.stderr)
            return 130
        return 0
    if args.command == "fit":
        from lit.scaling.fit import fit_command

        fit_command(args)
        return 0
    from lit.scaling.allocate import allocate_command

    allocate_command(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
