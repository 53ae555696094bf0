"""``python -m lit.batch_size``: pick the batch size of a recurring training job (Zeus).

    # one recurrence (or --recurrences N): choose a size, train it, record the outcome
    python -m lit.batch_size run --config configs/quickstart.yaml --batch-sizes 64 128 256 512 \\
        --target 'val/acc>=0.85' --lr-rule sqrt --history runs/bs.sqlite -- --trainer.max_epochs 6
    python -m lit.batch_size history --history runs/bs.sqlite       # table per batch size
    python -m lit.batch_size simulate --recurrences 40 --seed 0      # the policy on a cost model

Arguments after ``--`` go to every ``python -m lit fit`` run unchanged.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from lit.batch_size.history import History, Run
from lit.batch_size.policy import (AllPrunedError, check_candidates, cost_limit, next_batch_size,
                                   posterior, rewards_by_arm, scale_lr)
from lit.batch_size.runner import (Interrupted, JobConfig, Target, fit_command, launch,
                                   read_result)
from lit.energy.cost import check_eta


def power_of_two_range(low: int, high: int) -> list[int]:
    if not 1 <= low <= high:
        raise ValueError(f"--range needs 1 <= MIN <= MAX, got {low!r} {high!r}")
    out, b = [], 1
    while b <= high:
        if b >= low:
            out.append(b)
        b *= 2
    return out


def add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="choose a batch size, train with it, record the outcome")
    p.add_argument("--config", required=True, help="the job's YAML (python -m lit fit --config)")
    p.add_argument("--history", required=True, help="SQLite history file (created if missing)")
    p.add_argument("--target", required=True, help="e.g. 'val/acc>=0.85' or 'val/loss<=0.3'")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--batch-sizes", type=int, nargs="+", help="candidate batch sizes")
    sizes.add_argument("--range", type=int, nargs=2, metavar=("MIN", "MAX"),
                       help="candidates: the powers of two in [MIN, MAX] (and the default)")
    p.add_argument("--default", type=int, help="where pruning starts (default: the config's)")
    p.add_argument("--lr-rule", choices=("linear", "sqrt", "none"), default="none",
                   help="scale the config's lr from its batch size to the chosen one")
    p.add_argument("--eta", type=float, default=0.5, help="energy/time weight of the cost")
    p.add_argument("--beta", type=float, default=2.0,
                   help="stop a run past beta x the best cost (<= 0: never)")
    p.add_argument("--max-power-w", type=float, help="MaxPower of the cost when energy is measured")
    p.add_argument("--window", type=int, default=0, help="last N observations per size (0: all)")
    p.add_argument("--rounds", type=int, default=2, help="pruning rounds (Zeus: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Thompson sampler")
    p.add_argument("--job", help="job name in the history (default: CONFIG_STEM:TARGET)")
    p.add_argument("--recurrences", type=int, default=1, help="how many runs, one after another")
    p.add_argument("--max-failures", type=int, default=2,
                   help="drop a size after this many failed runs and no finished one")
    p.add_argument("--logs", help="folder for result files and run logs (default: beside history)")
    p.add_argument("fit_args", nargs=argparse.REMAINDER, help="-- then extra `lit fit` arguments")


def cmd_run(args: argparse.Namespace) -> int:
    check_eta(args.eta, "--eta")
    if args.recurrences < 1:
        raise ValueError(f"--recurrences must be >= 1, got {args.recurrences!r}")
    target = Target.parse(args.target)
    job_cfg = JobConfig.read(args.config)
    default = args.default or job_cfg.batch_size
    candidates = (args.batch_sizes if args.batch_sizes
                  else sorted(set(power_of_two_range(*args.range) + [default])) if args.range
                  else None)
    if candidates is None:
        raise ValueError("give the candidates: --batch-sizes B1 B2 ... or --range MIN MAX")
    candidates = check_candidates(candidates, default)
    if args.lr_rule != "none" and job_cfg.lr is None:
        raise ValueError(f"--lr-rule {args.lr_rule} needs an lr in {args.config} "
                         "(model.init_args.optimizer.init_args.lr or optimizer.init_args.lr)")
    beta = args.beta if args.beta > 0 else None
    job = args.job or f"{Path(args.config).stem}:{target}"
    extra = args.fit_args[1:] if args.fit_args[:1] == ["--"] else args.fit_args
    history = History(args.history)
    logs = Path(args.logs) if args.logs else Path(args.history).with_suffix(".runs")
    status = 0
    for _ in range(args.recurrences):
        status = max(status, run_once(args, history, job, job_cfg, target, candidates, default,
                                      beta, extra, logs))
        if status == 2:  # every size pruned: nothing left to run
            break
    print_table(history, job)
    return status


def run_once(args, history: History, job: str, job_cfg: JobConfig, target: Target,
             candidates: list[int], default: int, beta: float | None, extra: list[str],
             logs: Path) -> int:
    history.reap(job)

    def choose(observations, runs: list[Run]):
        finished = {r.batch_size for r in runs if r.observation is not None}
        failures = {b: sum(r.status == "failed" for r in runs if r.batch_size == b)
                    for b in candidates}
        usable = [b for b in candidates if b in finished or failures[b] < args.max_failures]
        if default not in usable:
            raise ValueError(f"the default batch size {default} failed {failures[default]} times: "
                             f"see the logs in {logs} and fix the job or pass --default")
        running = [r.batch_size for r in runs if r.status == "running"]
        decision = next_batch_size(observations, usable, default, seed=args.seed,
                                   rounds=args.rounds, window=args.window, running=running)
        lr = (scale_lr(job_cfg.lr, job_cfg.batch_size, decision.batch_size, args.lr_rule)
              if job_cfg.lr is not None else None)
        phase = decision.phase + (f" {decision.round + 1}" if decision.round is not None else "")
        return decision.batch_size, phase, lr, cost_limit(observations, beta)

    try:
        run = history.claim(job, choose)
    except AllPrunedError as err:
        print(f"[batch_size] {err}", file=sys.stderr)
        return 2
    result_path = logs / f"run{run.id}.json"
    result_path.unlink(missing_ok=True)  # left by an earlier history file: never read it
    cmd = fit_command(job_cfg, run.batch_size, run.lr, target, result_path, run.cost_limit,
                      args.eta, args.max_power_w, extra)
    limit = f"{run.cost_limit:.1f}" if run.cost_limit is not None else "none"
    lr = f"{run.lr:.3g}" if run.lr is not None else "config"
    print(f"[batch_size] run {run.id}: batch size {run.batch_size} ({run.phase}), lr {lr}, "
          f"cost limit {limit}; log {logs / f'run{run.id}.log'}", flush=True)
    try:
        rc = launch(cmd, logs / f"run{run.id}.log")
    except Interrupted as sig:
        history.finish(run.id, "failed", note=f"interrupted by {sig}")
        print(f"[batch_size] run {run.id} interrupted ({sig}): recorded as failed", flush=True)
        raise SystemExit(130)
    result = read_result(result_path)
    if rc != 0 or result is None:
        why = f"exit code {rc}" if rc != 0 else "no result file"
        history.finish(run.id, "failed", note=why)
        print(f"[batch_size] run {run.id} failed ({why}): see {logs / f'run{run.id}.log'}",
              flush=True)
        return 1
    history.finish(run.id, result["status"], cost=result["cost"], cost_unit=result["cost_unit"],
                   time_s=result["time_s"], energy_j=result["energy_j"],
                   epochs=result["epochs"], steps=result["steps"], metric=result["metric"])
    print(f"[batch_size] run {run.id}: {result['status']}, cost {result['cost']:.1f} "
          f"{result['cost_unit']}, {result['epochs']:.2f} epochs, {target.monitor} "
          f"{result['metric']}", flush=True)
    return 0


def table_rows(runs: list[Run], window: int = 0) -> list[dict]:
    """One summary row per batch size: counts, cost mean/std (of every finished run, windowed)
    and the Gaussian posterior of the mean cost (sizes that reached the target at least once)."""
    rows = []
    sizes = sorted({r.batch_size for r in runs})
    observations = [r.observation for r in runs if r.observation is not None]
    rewards = rewards_by_arm(observations, sizes, window)
    for b in sizes:
        mine = [r for r in runs if r.batch_size == b]
        costs = [-x for x in rewards[b]]
        mean, precision = posterior(rewards[b])
        sd = 0.0 if math.isinf(precision) else (1 / math.sqrt(precision) if precision > 0 else None)
        rows.append({
            "batch_size": b, "runs": len(mine),
            **{s: sum(r.status == s for r in mine) for s in ("reached", "not_reached", "stopped",
                                                            "failed", "running")},
            "mean_cost": sum(costs) / len(costs) if costs else None,
            "std_cost": (sum((c - sum(costs) / len(costs)) ** 2 for c in costs) / len(costs)) ** 0.5
            if costs else None,
            # a size that never reached the target is no arm of the sampler
            "posterior": (-mean, sd) if costs and sd is not None and any(
                r.status == "reached" for r in mine) else None,
        })
    return rows


def print_table(history: History, job: str | None, window: int = 0, show_runs: bool = False) -> None:
    for name in [job] if job else history.jobs():
        runs = history.runs(name)
        units = sorted({r.cost_unit for r in runs if r.cost_unit})
        print(f"\njob {name}: {len(runs)} runs, cost in {'/'.join(units) or '-'}")
        print("| batch size | runs | reached | not reached | stopped | failed | running "
              "| mean cost | std cost | posterior of the mean cost |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in table_rows(runs, window):
            f = lambda v: "-" if v is None else f"{v:.1f}"
            post = "-" if r["posterior"] is None else f"N({r['posterior'][0]:.1f}, {r['posterior'][1]:.1f}^2)"
            print(f"| {r['batch_size']} | {r['runs']} | {r['reached']} | {r['not_reached']} | "
                  f"{r['stopped']} | {r['failed']} | {r['running']} | {f(r['mean_cost'])} | "
                  f"{f(r['std_cost'])} | {post} |")
        if show_runs:
            print("\n| run | batch size | phase | lr | status | cost | epochs | metric | note |")
            print("|---:|---:|---|---:|---|---:|---:|---:|---|")
            for r in sorted(runs, key=lambda r: r.id):
                f = lambda v, p=".1f": "-" if v is None else format(v, p)
                print(f"| {r.id} | {r.batch_size} | {r.phase} | {f(r.lr, '.3g')} | {r.status} | "
                      f"{f(r.cost)} | {f(r.epochs, '.2f')} | {f(r.metric, '.4f')} | {r.note or ''} |")


def cmd_history(args: argparse.Namespace) -> int:
    if not Path(args.history).is_file():
        raise ValueError(f"--history {args.history!r} does not exist")
    history = History(args.history)
    history.reap(args.job)
    print_table(history, args.job, args.window, args.runs)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit.batch_size", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_parser(sub)
    h = sub.add_parser("history", help="table per batch size of a history file")
    h.add_argument("--history", required=True)
    h.add_argument("--job", help="only this job")
    h.add_argument("--window", type=int, default=0, help="posterior over the last N per size")
    h.add_argument("--runs", action="store_true", help="also list every run")
    from lit.batch_size.simulate import add_simulate_parser, cmd_simulate
    add_simulate_parser(sub)
    args = parser.parse_args(argv)
    try:
        return {"run": cmd_run, "history": cmd_history, "simulate": cmd_simulate}[args.command](args)
    except ValueError as err:
        parser.exit(2, f"python -m lit.batch_size {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
