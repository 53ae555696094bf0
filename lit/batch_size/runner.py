"""Launch one recurrence of a job: ``python -m lit fit`` with the chosen batch size.

The run gets ``--data.init_args.batch_size B``, the learning rate scaled by the chosen rule and
a :class:`callbacks.BatchSizeTarget` appended to ``trainer.callbacks`` (target, cost limit,
result file). Its process runs in its own session; SIGINT/SIGTERM to the wrapper terminate
it (then SIGKILL after a grace period) before the wrapper records the run as failed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

TARGET = re.compile(r"^\s*([^<>=\s]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Target:
    """``monitor >= value`` (mode ``max``) or ``monitor <= value`` (mode ``min``)."""

    monitor: str
    mode: str
    value: float

    @classmethod
    def parse(cls, text: str) -> "Target":
        m = TARGET.match(text)
        if m is None:
            raise ValueError(f"target must look like 'val/acc>=0.85' or 'val/loss<=0.3', got {text!r}")
        try:
            value = float(m.group(3))
        except ValueError:
            raise ValueError(f"target value must be a number, got {text!r}") from None
        return cls(m.group(1), "max" if m.group(2) == ">=" else "min", value)

    def __str__(self) -> str:
        return f"{self.monitor}{'>=' if self.mode == 'max' else '<='}{self.value:g}"


@dataclass(frozen=True)
class JobConfig:
    """What the wrapper reads from the job's YAML: its batch size and learning rate."""

    path: Path
    batch_size: int
    lr: float | None
    lr_flag: str | None

    @classmethod
    def read(cls, path: str | Path) -> "JobConfig":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config must be an existing YAML file, got {str(path)!r}")
        cfg = yaml.safe_load(path.read_text()) or {}
        batch_size = _get(cfg, "data", "init_args", "batch_size")
        if not isinstance(batch_size, int):
            raise ValueError(f"{path}: data.init_args.batch_size must be set to an integer (the "
                             f"job's default batch size), got {batch_size!r}")
        for keys, flag in ((("optimizer", "init_args", "lr"), "--optimizer.init_args.lr"),
                           (("model", "init_args", "optimizer", "init_args", "lr"),
                            "--model.init_args.optimizer.init_args.lr")):
            lr = _get(cfg, *keys)
            if isinstance(lr, (int, float)):
                return cls(path, batch_size, float(lr), flag)
        return cls(path, batch_size, None, None)


def _get(cfg: dict, *keys: str):
    for k in keys:
        if not isinstance(cfg, dict) or k not in cfg:
            return None
        cfg = cfg[k]
    return cfg


def fit_command(job: JobConfig, batch_size: int, lr: float | None, target: Target,
                result_path: Path, cost_limit: float | None, eta: float,
                max_power_w: float | None, extra: list[str]) -> list[str]:
    """The ``python -m lit fit`` command line of one run."""
    callback = {"class_path": "callbacks.BatchSizeTarget", "init_args": {
        "monitor": target.monitor, "target": target.value, "mode": target.mode,
        "result_path": str(result_path), "cost_limit": cost_limit, "eta": eta,
        "max_power_w": max_power_w}}
    cmd = [sys.executable, "-m", "lit", "fit", "--config", str(job.path),
           "--data.init_args.batch_size", str(batch_size)]
    if lr is not None and job.lr_flag is not None:
        cmd += [job.lr_flag, repr(lr)]
    return cmd + [f"--trainer.callbacks+={json.dumps(callback)}", *extra]


class Interrupted(Exception):
    """The wrapper received SIGINT or SIGTERM while a run was in flight."""


def launch(cmd: list[str], log_path: Path, grace_s: float = 30.0) -> int:
    """Run ``cmd`` with output to ``log_path``; return its exit code.

    On SIGINT/SIGTERM the child's process group gets SIGTERM, then SIGKILL after ``grace_s``,
    and :class:`Interrupted` is raised.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def interrupt(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ})
            try:
                return proc.wait()
            except Interrupted:
                _stop(proc, grace_s)
                raise
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_result(path: Path) -> dict | None:
    """The run's result JSON, or ``None`` when the run wrote none."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
