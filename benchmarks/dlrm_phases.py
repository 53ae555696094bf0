"""Where the wall time of one ``python -m lit fit`` run goes: a callback that marks the run's
phases, and a runner that times the whole command and prints the phases as a table.

:class:`PhaseTimer` is added to the command line of the run
(``--trainer.callbacks+={class_path: benchmarks.dlrm_phases.PhaseTimer, init_args: {path: X}}``)
and writes wall-clock marks (``time.time()``) to ``path`` as JSON: the Trainer hooks from setup
to the test's end, the host time of every training step's start, the steps whose samples crossed
an evaluation point of ``callbacks.EvalAtSamples`` (found among the Trainer's callbacks), the
start of each checkpoint dump (its ``state_dict`` is asked for first), the model's build times
(``DLRMModule.build_seconds``) and the time Python's garbage collector took during training.
Nothing in it waits for the GPU but one synchronisation at the end of the training epoch.

:func:`main` runs the command (``python benchmarks/dlrm_phases.py --config ... -- ARGS``),
times it from before the interpreter starts to its exit, and prints one row per phase with its
seconds and, where samples pass through it, samples/s (and the training phase against
``--bare-rate``, the bare DMP loop's rate from ``bench_dlrm.py loops``).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

IMPORTED_AT = time.time()


class PhaseTimer(Callback):
    """Marks the phases of a run (see the module docstring) and writes them to ``path``.

    Args:
        path: the JSON file to write (at the end of fit, of the test, and at exit).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.marks: list[tuple[str, float]] = [("PhaseTimer imported", IMPORTED_AT),
                                               ("callbacks built", time.time())]
        self.step_starts: list[float] = []
        self.step_ends: list[float] = []
        self.evals: list[dict] = []  # {"step": k, "samples": n} for steps that evaluated
        self.info: dict = {}
        self._evaluators: list = []
        self._gc = {"collections": [0, 0, 0], "seconds": [0.0, 0.0, 0.0], "on": False}
        self._gc_started = 0.0
        gc.callbacks.append(self._gc_hook)
        atexit.register(self._at_exit)

    def mark(self, name: str) -> None:
        self.marks.append((name, time.time()))

    def _gc_hook(self, phase: str, info: dict) -> None:
        if not self._gc["on"]:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            generation = info["generation"]
            self._gc["collections"][generation] += 1
            self._gc["seconds"][generation] += time.perf_counter() - self._gc_started

    def write(self) -> None:
        data = {"marks": self.marks, "step_starts": self.step_starts, "step_ends": self.step_ends,
                "evals": self.evals, "info": self.info,
                "gc": {k: v for k, v in self._gc.items() if k != "on"}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(data))

    def _at_exit(self) -> None:
        self.mark("exit handlers")
        self.write()

    # --- hooks -----------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.mark(f"setup {getattr(stage, 'value', stage)}")

    def on_fit_start(self, trainer, pl_module) -> None:
        self.mark("fit start")
        self.info["build_seconds"] = dict(getattr(pl_module, "build_seconds", {}) or {})
        self.info["strategy"] = type(trainer.strategy).__name__
        self.info["callbacks"] = [type(c).__name__ for c in trainer.callbacks]

    def on_train_start(self, trainer, pl_module) -> None:
        self.mark("train start")
        self._evaluators = [c for c in trainer.callbacks
                            if hasattr(c, "history") and hasattr(c, "at_samples")]
        datamodule = trainer.datamodule
        self.info["batch_size"] = getattr(datamodule, "batch_size", None)
        self.info["val_samples"] = getattr(datamodule, "val_samples", None)
        self.info["test_samples"] = getattr(datamodule, "test_samples", None)
        self.info["eval_batch_size"] = getattr(datamodule, "eval_batch_size", None)
        self._history = [len(c.history) for c in self._evaluators]
        self._gc["on"] = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.step_starts.append(time.time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.step_ends.append(time.time())
        for i, evaluator in enumerate(self._evaluators):
            if len(evaluator.history) != self._history[i]:
                self._history[i] = len(evaluator.history)
                self.evals.append({"step": len(self.step_starts) - 1,
                                   "samples": int(getattr(pl_module, "samples_seen", 0))})

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.mark("validation start")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.mark("validation end")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the steps' GPU work is done here
        self.mark("train epoch end")
        self.info["samples_seen"] = int(getattr(pl_module, "samples_seen", 0))
        # The module chose its step path in its own on_train_start, after the callbacks'.
        self.info["step_path"] = str(getattr(getattr(pl_module, "step_path", None), "value", ""))
        self.info["step_path_reason"] = getattr(pl_module, "step_path_reason", "")

    def state_dict(self) -> dict:
        self.mark("checkpoint dump start")
        return {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._gc["on"] = False
        self.mark("train end")
        self.info["checkpoint"] = getattr(trainer.checkpoint_callback, "last_model_path", "") \
            if trainer.checkpoint_callback is not None else ""
        self.info["module_device_after_fit"] = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self.mark("fit end")
        self.info["module_device_after_fit"] = _table_device(pl_module)
        self.write()

    def on_test_start(self, trainer, pl_module) -> None:
        self.mark("test start")

    def on_test_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.mark("test end")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        stage = getattr(stage, "value", stage)
        self.mark(f"teardown {stage}")
        if stage == "test":
            self.info["module_device_after_test"] = _table_device(pl_module)
        self.write()


def _table_device(module) -> str:
    """The device of the largest tensor of the module's state (a DLRM's biggest table)."""
    tensors = []
    for value in getattr(module, "model", module).state_dict().values():
        local = getattr(value, "local_shards", None)
        if callable(local):  # a ShardedTensor: its shards on this rank
            tensors += [shard.tensor for shard in local()]
        elif isinstance(value, torch.Tensor):
            tensors.append(value)
    if not tensors:
        return "none"
    return str(max(tensors, key=lambda t: t.numel()).device)


# --- the table ---------------------------------------------------------------------------------


def _first(marks: list, name: str, after: float = 0.0) -> float | None:
    return next((t for n, t in marks if n == name and t >= after), None)


def phase_rows(data: dict, started: float, ended: float, bare_rate: float | None) -> list[tuple]:
    """(phase, seconds, samples/s text, note) rows from a PhaseTimer file and the command's own
    start and end times."""
    marks = data["marks"]
    starts, ends, info = data["step_starts"], data["step_ends"], data["info"]
    batch = info.get("batch_size") or 0
    rows: list[tuple] = []

    def add(name: str, a: float | None, b: float | None, rate: str = "", note: str = "") -> None:
        if a is not None and b is not None:
            rows.append((name, b - a, rate, note))

    setup = _first(marks, "setup fit")
    fit_start, train_start = _first(marks, "fit start"), _first(marks, "train start")
    built = info.get("build_seconds", {})
    add("start-up: interpreter, imports, CLI parse, data/model/trainer objects", started, setup)
    add("model build: planner + DMP tables (+ optimizers)", setup, fit_start,
        note=", ".join(f"{k} {v:.2f} s" for k, v in built.items()))
    add("fit start: model summary, hparams, logger", fit_start, train_start)
    epoch_end = _first(marks, "train epoch end")
    if starts:
        add("first training step (first data chunk, kernels, library handles)", starts[0],
            starts[1] if len(starts) > 1 else epoch_end)
        intervals = [b - a for a, b in zip(starts[1:], starts[2:] + [epoch_end or starts[-1]])]
        eval_steps = {e["step"] for e in data["evals"]}
        regular = [d for k, d in enumerate(intervals, 1) if k not in eval_steps]
        typical = statistics.median(regular) if regular else 0.0
        eval_time = sum(max(0.0, d - typical) for k, d in enumerate(intervals, 1)
                        if k in eval_steps)
        loop = (epoch_end or starts[-1]) - starts[1] - eval_time if len(starts) > 1 else 0.0
        samples = batch * (len(starts) - 1)
        rate = samples / loop if loop > 0 else 0.0
        vs = f"{rate / bare_rate:.2f}x bare loop" if bare_rate else ""
        spread = ""
        if regular:
            ordered = sorted(regular)
            spread = (f"{len(regular)} steps: median {1e3 * typical:.2f} ms, p90 "
                      f"{1e3 * ordered[int(0.9 * (len(ordered) - 1))]:.2f} ms, max "
                      f"{1e3 * ordered[-1]:.1f} ms")
        rows.append(("training steps 2..N (evaluations taken out)", loop, f"{rate:,.0f}",
                     "; ".join(x for x in (vs, spread) if x)))
        evals = data["evals"]
        if evals:
            val = info.get("val_samples") or 0
            total = len(evals) * val
            rows.append((f"EvalAtSamples: {len(evals)} evaluations of {val:,} samples", eval_time,
                         f"{total / eval_time:,.0f}" if eval_time > 0 else "",
                         "at " + ", ".join(f"{e['samples']:,}" for e in evals) + " samples"))
    add("epoch-end validation (Lightning's loop)", _first(marks, "validation start"),
        _first(marks, "validation end"))
    dump = _first(marks, "checkpoint dump start", after=epoch_end or 0.0)
    train_end = _first(marks, "train end")
    add("epoch end -> checkpoint dump", epoch_end, dump)
    written = Path(info.get("checkpoint") or "")
    dumps = sum(1 for n, t in marks if n == "checkpoint dump start" and t >= (epoch_end or 0.0))
    link = f", {written.name} links to {written.resolve().name}" if written.is_symlink() else ""
    add(f"checkpoint: {dumps} written (state gathered, files written){link}", dump, train_end)
    if dump is None:
        add("epoch end -> train end (no checkpoint)", epoch_end, train_end)
    fit_end = _first(marks, "fit end")
    add("strategy teardown after fit", train_end, fit_end,
        note=f"tables on {info.get('module_device_after_fit')} afterwards")
    test_start, test_end = _first(marks, "test start"), _first(marks, "test end")
    add("fit end -> test start (test setup)", fit_end, test_start)
    test_samples = info.get("test_samples") or 0
    if test_start is not None and test_end is not None:
        span = test_end - test_start
        rows.append(("test", span, f"{test_samples / span:,.0f}" if span > 0 else "", ""))
    last = _first(marks, "teardown test") or fit_end
    add("test teardown", test_end, _first(marks, "teardown test"),
        note=f"tables on {info.get('module_device_after_test')} afterwards"
        if "module_device_after_test" in info else "")
    exiting = _first(marks, "exit handlers", after=last or 0.0)
    add("CLI report, logger close, process group destroyed", last, exiting)
    add("interpreter shutdown", exiting or last, ended)
    return rows


def print_table(rows: list[tuple], started: float, ended: float, samples: int,
                bare_rate: float | None, gc_stats: dict | None) -> None:
    total = ended - started
    print("| phase | seconds | share | samples/s | notes |")
    print("|---|---|---|---|---|")
    for name, seconds, rate, note in rows:
        print(f"| {name} | {seconds:.2f} | {100 * seconds / total:.0f}% | {rate} | {note} |")
    rate = samples / total if total > 0 else 0.0
    vs = f" = {rate / bare_rate:.2f}x the bare loop ({bare_rate:,.0f}/s)" if bare_rate else ""
    print(f"| **whole command** | **{total:.2f}** | 100% | **{rate:,.0f}** | {samples:,} "
          f"training samples{vs} |")
    if gc_stats:
        print(f"garbage collection during training: collections per generation "
              f"{gc_stats['collections']}, seconds {[round(s, 3) for s in gc_stats['seconds']]}")


def _bare_rate(given: str | None) -> float | None:
    if not given:
        return None
    try:
        return float(given)
    except ValueError:
        pass
    try:
        return float(json.loads(Path(given).read_text())["raw"])
    except (OSError, KeyError, TypeError, ValueError):
        print(f"no bare-loop rate in {given!r}: ratios left out")
        return None


STARTUP_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import torch, lightning.pytorch
t1 = time.perf_counter()
import lit.cli, models.dlrm.module, datamodules.ctr.synthetic, callbacks.eval_at_samples
from lightning.pytorch.loggers import TensorBoardLogger
import torch.utils.tensorboard
t2 = time.perf_counter()
import yaml
init = yaml.safe_load(open(sys.argv[1]))["data"]["init_args"]
datamodules.ctr.synthetic.SyntheticCTR(**init)
t3 = time.perf_counter()
print(json.dumps({"torch + lightning imports": t1 - t0,
                  "torchrec, the project, TensorBoard imports": t2 - t1,
                  "SyntheticCTR(...) of the config (teacher tables)": t3 - t2}))
"""


def startup_breakdown(config: str) -> None:
    """What the start-up row is made of, each part timed alone in a fresh interpreter."""
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", STARTUP_PROBE, config], capture_output=True,
                          text=True, timeout=120)
    total = time.time() - started
    try:
        parts = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        print(f"start-up breakdown failed: {proc.stderr[-500:]}")
        return
    print(f"start-up, each part alone in a fresh interpreter ({total:.2f} s for all, with "
          "interpreter start and exit): " + "; ".join(f"{k} {v:.2f} s" for k, v in parts.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--work", default=None, help="folder for logs and checkpoints")
    parser.add_argument("--bare-rate", default=None,
                        help="the bare DMP loop's samples/s, or a JSON file of bench_dlrm.py "
                             "loops with it under 'raw'")
    parser.add_argument("--timeout", type=int, default=240)
    parser.add_argument("--startup-breakdown", action="store_true",
                        help="first time the imports and the datamodule's construction alone")
    parser.add_argument("args", nargs="*", help="more arguments for `python -m lit fit`")
    ns = parser.parse_args()
    work = Path(ns.work or os.environ.get("TMPDIR", "/tmp")) / "dlrm_phases"
    work.mkdir(parents=True, exist_ok=True)
    phases = work / "phases.json"
    if phases.exists():
        phases.unlink()
    bare = _bare_rate(ns.bare_rate)
    command = [sys.executable, "-m", "lit", "fit", "--config", ns.config,
               f"--trainer.default_root_dir={work}",
               f"--trainer.logger.init_args.save_dir={work / 'runs'}", *ns.args,
               # after the other arguments: a later --trainer.callbacks=[...] would drop it
               "--trainer.callbacks+={class_path: benchmarks.dlrm_phases.PhaseTimer, "
               f"init_args: {{path: {phases}}}}}"]
    if ns.startup_breakdown:
        try:
            startup_breakdown(ns.config)
        except subprocess.TimeoutExpired:
            print("start-up breakdown: time limit")
    print("$ " + " ".join(command[1:]))
    log = work / "fit.log"
    started = time.time()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                timeout=ns.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    ended = time.time()
    text = log.read_text(errors="replace")
    print(f"exit status {rc}; {ended - started:.1f} s")
    for line in text.splitlines():
        if any(k in line for k in ("test/logloss", "test/auroc", "test/ne ", "[lit]", "Error",
                                   "error:")):
            print("  " + line.strip()[:200])
    if rc != 0:
        print("\n".join(text.splitlines()[-25:]))
    if not phases.exists():
        print("no phase marks written")
        return 1
    data = json.loads(phases.read_text())
    info = data["info"]
    samples = info.get("samples_seen") or (info.get("batch_size") or 0) * len(data["step_starts"])
    print(f"strategy {info.get('strategy')}, step path {info.get('step_path')} "
          f"({info.get('step_path_reason')}), callbacks {info.get('callbacks')}")
    print_table(phase_rows(data, started, ended, bare), started, ended, samples, bare,
                data.get("gc"))
    return rc


if __name__ == "__main__":
    sys.exit(main())
