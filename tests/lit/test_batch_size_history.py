"""The SQLite run history: two writer processes at once, atomic claims that see each other's
runs in flight, a dead wrapper's run recorded as failed, a killed training process and an
interrupted wrapper recorded as failed (real subprocesses and signals)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

from lit.batch_size.history import History
from lit.batch_size.policy import next_batch_size
from lit.batch_size.runner import launch
from tests.conftest import ROOT


def _writer(path: str, tag: int, n: int) -> None:
    history = History(path, timeout_s=60)
    for i in range(n):
        run = history.claim("job", lambda obs, runs: (32 * (tag + 1), "pruning", None, None))
        history.finish(run.id, "reached", cost=float(100 * tag + i), cost_unit="s")


def test_two_concurrent_writers_lose_nothing(tmp_path) -> None:
    path = str(tmp_path / "h.sqlite")
    History(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, tag, 40)) for tag in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    runs = History(path).runs("job")
    assert len(runs) == 80 and len({r.id for r in runs}) == 80
    assert all(r.status == "reached" for r in runs)
    for tag in (0, 1):  # each writer's results, complete and in its own order
        costs = [r.cost for r in runs if r.batch_size == 32 * (tag + 1)]
        assert costs == [100.0 * tag + i for i in range(40)]


def _slow_claim(path: str, hold_s: float, out) -> None:
    history = History(path, timeout_s=60)

    def choose(obs, runs):
        running = [r.batch_size for r in runs if r.status == "running"]
        d = next_batch_size(obs, [32, 64, 128], 64, running=running)
        time.sleep(hold_s)  # hold the write lock: the other claim must wait, then see this run
        return d.batch_size, d.phase, None, None

    run = history.claim("job", choose)
    out.put((run.batch_size, run.phase))


def test_concurrent_claims_see_each_others_run(tmp_path) -> None:
    path = str(tmp_path / "h.sqlite")
    history = History(path)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_slow_claim, args=(path, 1.0, q)) for _ in range(2)]
    for p in procs:
        p.start()
    got = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # One claims pruning's 64; the other waits for the lock, sees 64 in flight and gets the
    # best known size instead (nothing finished yet: the default, recorded as concurrent).
    assert got == [(64, "concurrent"), (64, "pruning")]
    assert [r.status for r in history.runs("job")] == ["running", "running"]


def test_dead_wrapper_is_recorded_failed(tmp_path) -> None:
    history = History(tmp_path / "h.sqlite")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer exists
    run = history.claim("job", lambda obs, runs: (64, "pruning", None, None))
    history.db.execute("UPDATE runs SET pid = ? WHERE id = ?", (proc.pid, run.id))
    mine = history.claim("job", lambda obs, runs: (32, "pruning", None, None))  # this process
    assert history.reap("job") == 1
    by_id = {r.id: r for r in history.runs("job")}
    assert by_id[run.id].status == "failed" and "gone" in by_id[run.id].note
    assert by_id[mine.id].status == "running"
    assert history.observations("job") == []  # failed runs are no observations


def test_killed_training_process_gives_its_exit_code(tmp_path) -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert launch([sys.executable, "-c", code], tmp_path / "run.log") == -signal.SIGKILL


def test_finish_checks_its_arguments(tmp_path) -> None:
    history = History(tmp_path / "h.sqlite")
    run = history.claim("job", lambda obs, runs: (64, "pruning", None, None))
    with pytest.raises(ValueError, match="status must be one of"):
        history.finish(run.id, "done", cost=1.0)
    with pytest.raises(ValueError, match="needs its cost"):
        history.finish(run.id, "reached")
    with pytest.raises(ValueError, match="must be a file path"):
        History(tmp_path)


def test_interrupted_wrapper_stops_its_run_and_records_it_failed(tmp_path) -> None:
    """SIGTERM to ``python -m lit.batch_size run`` while a real ``lit fit`` trains."""
    hist = tmp_path / "h.sqlite"
    cmd = [sys.executable, "-m", "lit.batch_size", "run", "--config",
           str(ROOT / "configs/quickstart.yaml"), "--batch-sizes", "64", "128",
           "--target", "val/acc>=0.99", "--history", str(hist), "--", "--trainer.max_epochs", "50",
           f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
           f"--trainer.default_root_dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    wrapper = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "h.runs" / "run1.log"
    deadline = time.time() + 120
    while time.time() < deadline and not log.is_file():
        time.sleep(0.1)  # the run is claimed and its process is being started
    time.sleep(1.0)
    wrapper.send_signal(signal.SIGTERM)
    out, _ = wrapper.communicate(timeout=120)
    assert wrapper.returncode == 130, out
    (run,) = History(hist).runs()
    assert (run.status, run.batch_size, run.note) == ("failed", 128, "interrupted by SIGTERM")
    children = subprocess.run(["pgrep", "-f", str(tmp_path / "h.runs")], capture_output=True)
    assert children.stdout == b""  # the training process group is gone too


def test_crashing_run_is_recorded_failed_and_its_size_dropped(tmp_path) -> None:
    """A real `lit fit` that exits with an error: failed with its exit code; after
    --max-failures such runs the default size is refused with a clear message."""
    hist = tmp_path / "h.sqlite"
    cmd = [sys.executable, "-m", "lit.batch_size", "run", "--config",
           str(ROOT / "configs/quickstart.yaml"), "--batch-sizes", "64", "128", "--target",
           "val/acc>=0.5", "--history", str(hist), "--max-failures", "1", "--",
           "--trainer.max_epochs", "not-a-number"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1 and "failed (exit code 2)" in first.stdout
    (run,) = History(hist).runs()
    assert (run.status, run.batch_size, run.note, run.cost) == ("failed", 128, "exit code 2", None)
    assert "max_epochs" in (hist.parent / "h.runs" / "run1.log").read_text()
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "default batch size 128 failed 1 times" in second.stderr
