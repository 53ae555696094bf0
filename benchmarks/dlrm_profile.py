"""Where a DLRM training step's time goes, on the host and on the GPU: ``torch.profiler`` over a
short window of steps of the Lightning loop (``DLRMModule`` on a Trainer) and of the bare DMP
loop, over the same device batches.

The Lightning loop runs with :class:`RecordFunctionProfiler` as the Trainer's profiler, so each of
Lightning's named actions (every callback hook, the module's hooks, the strategy's
``training_step`` and ``batch_to_device``, the data fetch) is a range in the trace. Printed: the
top rows of ``key_averages()`` by self GPU time and by total CPU time, and one line per loop with
its wall time, GPU busy time (kernels and copies) and host time per step: a step whose wall time
is near its host time and far above its GPU time is bound by the host.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.profilers import Profiler


class RecordFunctionProfiler(Profiler):
    """Lightning's profiler interface that only opens a ``torch.profiler`` range per action
    (the trace is taken by a ``torch.profiler.profile`` around the window)."""

    def __init__(self) -> None:
        super().__init__()
        self._open: dict[str, list] = {}

    def start(self, action_name: str) -> None:
        scope = torch.autograd.profiler.record_function(action_name)
        scope.__enter__()
        self._open.setdefault(action_name, []).append(scope)

    def stop(self, action_name: str) -> None:
        stack = self._open.get(action_name)
        if stack:
            stack.pop().__exit__(None, None, None)

    def summary(self) -> str:
        return ""


def _activities() -> list:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


class ProfileWindow(Callback):
    """Profiles the training steps ``first .. first + steps - 1`` of a fit."""

    def __init__(self, first: int, steps: int) -> None:
        self.first, self.steps = first, steps
        self.prof = None
        self.seconds = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        if batch_idx == self.first:
            _sync()
            self.prof = torch.profiler.profile(activities=_activities())
            self.prof.__enter__()
            self.started = time.perf_counter()
        elif batch_idx == self.first + self.steps and self.prof is not None:
            _stop(self)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _stop(window) -> None:
    _sync()
    window.seconds = time.perf_counter() - window.started
    window.prof.__exit__(None, None, None)


def summary_line(name: str, prof, seconds: float, steps: int) -> str:
    """Wall, GPU-busy and host (the profiled ranges' CPU) milliseconds per step."""
    table = prof.key_averages()
    device_only = sum(e.self_device_time_total for e in table
                      if e.self_cpu_time_total == 0 and e.self_device_time_total > 0)
    return (f"{name}: {steps} steps, wall {1e3 * seconds / steps:.2f} ms/step, GPU busy "
            f"(kernels and copies) {device_only / 1e3 / steps:.2f} ms/step")


def print_tables(prof, rows: int = 15) -> None:
    table = prof.key_averages()
    if torch.cuda.is_available():
        print(f"\ntop {rows} by self GPU time:")
        print(table.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70))
    print(f"\ntop {rows} by total CPU time (Lightning's actions are the [..] rows):")
    print(table.table(sort_by="cpu_time_total", row_limit=rows, max_name_column_width=70))


def profile_lightning(module_kwargs: dict, schema, batches, warmup: int, device, steps: int,
                      lightning_loop) -> None:
    window = ProfileWindow(warmup, steps)
    lightning_loop(module_kwargs, schema, batches, warmup, device, callbacks=[window],
                   profiler=RecordFunctionProfiler())
    if window.prof is None:
        print("the Lightning loop ended before the profiled window")
        return
    if window.seconds == 0.0:  # the window reached the last batch
        _stop(window)
    print(summary_line("Lightning DLRMModule", window.prof, window.seconds, steps))
    print_tables(window.prof)


def profile_bare(module_kwargs: dict, schema, batches, warmup: int, device, steps: int,
                 shape) -> None:
    from models.dlrm.network import build_dlrm
    from models.dlrm.sharded import dense_named_parameters, shard_with_fused_optimizer
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

    dmp = shard_with_fused_optimizer(build_dlrm(shape, schema.sparse_names), device,
                                     "row_wise_adagrad", 0.01)
    named = dense_named_parameters(dmp)
    dense = torch.optim.Adagrad(list(named.values()), lr=0.01)
    opt = CombinedOptimizer([("fused", dmp.fused_optimizer),
                             ("dense", KeyedOptimizerWrapper(named, lambda _params: dense))])
    prof, started = None, 0.0
    for i, b in enumerate(batches[:warmup + steps]):
        if i == warmup:
            _sync()
            prof = torch.profiler.profile(activities=_activities())
            prof.__enter__()
            started = time.perf_counter()
        with torch.autograd.profiler.record_function("bare step"):
            loss = F.binary_cross_entropy_with_logits(
                dmp(b.dense_features, b.sparse_features).squeeze(-1), b.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    _sync()
    seconds = time.perf_counter() - started
    prof.__exit__(None, None, None)
    print(summary_line("bare DMP loop", prof, seconds, steps))
    table = prof.key_averages()
    print("\nbare loop, top 10 by total CPU time:")
    print(table.table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=70))


class PythonProfileWindow(Callback):
    """``cProfile`` over the training steps ``first .. first + steps - 1``: which Python
    functions (Lightning's loop and hooks, the module's step, torchrec) take the host's time."""

    def __init__(self, first: int, steps: int) -> None:
        import cProfile

        self.first, self.steps = first, steps
        self.prof = cProfile.Profile()
        self.running = False

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        if batch_idx == self.first:
            self.prof.enable()
            self.running = True
        elif batch_idx == self.first + self.steps and self.running:
            self.prof.disable()
            self.running = False


def python_profile_lightning(module_kwargs: dict, schema, batches, warmup: int, device,
                             steps: int, lightning_loop, rows: int = 25) -> None:
    import io
    import pstats

    window = PythonProfileWindow(warmup, steps)
    lightning_loop(module_kwargs, schema, batches, warmup, device, callbacks=[window])
    if window.running:
        window.prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(window.prof, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(rows)
    print(f"\nLightning loop under cProfile, {steps} steps (cProfile slows Python code, so read the "
          "shares, not the times), top by own time:")
    text = out.getvalue()
    print(text[text.find("   ncalls"):].rstrip())
