"""The run history of recurring jobs, in one SQLite file.

Every run is a row, inserted as ``running`` *before* its process starts and completed when it
ends, so a crash of the training process, of the wrapper or of the machine leaves a trace:

* training process fails or is killed -> the wrapper records ``failed`` (``note`` says how);
* wrapper itself killed (SIGKILL, power loss) -> its row stays ``running`` with the wrapper's
  pid; the next wrapper on the same host finds the pid gone and records ``failed``
  (:meth:`History.reap`).

Two wrappers may share the file: the database is in WAL mode, every change is one transaction,
and choosing a batch size and inserting its row happen inside one ``BEGIN IMMEDIATE``
transaction (:meth:`History.claim`), so the second wrapper decides after seeing the first's
run in flight.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from lit.batch_size.policy import Observation

# (batch_size, phase, lr, cost_limit) of a run about to start.
Claim = tuple[int, str, "float | None", "float | None"]

STATUSES = ("running", "reached", "not_reached", "stopped", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    phase TEXT NOT NULL,
    lr REAL,
    cost_limit REAL,
    status TEXT NOT NULL CHECK (status IN ('running', 'reached', 'not_reached', 'stopped', 'failed')),
    cost REAL,
    cost_unit TEXT,
    time_s REAL,
    energy_j REAL,
    epochs REAL,
    steps INTEGER,
    metric REAL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS runs_job ON runs (job, finished_at, id);
"""


@dataclass(frozen=True)
class Run:
    """One row of the history."""

    id: int
    job: str
    batch_size: int
    phase: str
    lr: float | None
    cost_limit: float | None
    status: str
    cost: float | None
    cost_unit: str | None
    time_s: float | None
    energy_j: float | None
    epochs: float | None
    steps: int | None
    metric: float | None
    host: str
    pid: int
    started_at: float
    finished_at: float | None
    note: str | None

    @property
    def observation(self) -> Observation | None:
        """The policy's view of a finished run (``None`` while running or when it failed)."""
        if self.status in ("running", "failed") or self.cost is None:
            return None
        return Observation(self.batch_size, self.cost, self.status == "reached")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class History:
    """A job history file (created on first use).

    Args:
        path: the SQLite file.
        timeout_s: how long a writer waits for the other's transaction before failing.
    """

    def __init__(self, path: str | Path, timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"history must be a file path, got a directory: {str(path)!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        self.db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        with self.transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An exclusive-for-writers transaction (``BEGIN IMMEDIATE``), committed on success."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- reading ----------------------------------------------------------------------------
    def runs(self, job: str | None = None) -> list[Run]:
        """All runs (of ``job``), in the order they finished, running ones last."""
        where, args = ("WHERE job = ?", (job,)) if job is not None else ("", ())
        rows = self.db.execute(f"SELECT * FROM runs {where} ORDER BY finished_at IS NULL, "
                               f"finished_at, id", args).fetchall()
        return [Run(**dict(r)) for r in rows]

    def jobs(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT job FROM runs ORDER BY job")]

    def observations(self, job: str) -> list[Observation]:
        """The policy's input: finished runs of ``job`` in the order they finished."""
        return [r.observation for r in self.runs(job) if r.observation is not None]

    # -- writing ----------------------------------------------------------------------------
    def reap(self, job: str | None = None) -> int:
        """Record as failed the ``running`` rows of this host whose wrapper process is gone."""
        host, n = socket.gethostname(), 0
        with self.transaction():
            for r in self.runs(job):
                if r.status == "running" and r.host == host and not pid_alive(r.pid):
                    n += self._finish(r.id, "failed", note="wrapper process gone (killed?)")
        return n

    def claim(self, job: str, choose: Callable[[list[Observation], list[Run]], Claim]) -> Run:
        """Decide and record a new run atomically.

        ``choose(observations, runs)`` returns ``(batch_size, phase, lr, cost_limit)``; it sees
        the history as of the locked transaction, in-flight runs of other wrappers included.
        """
        with self.transaction():
            runs = self.runs(job)
            observations = [r.observation for r in runs if r.observation is not None]
            batch_size, phase, lr, limit = choose(observations, runs)
            cur = self.db.execute(
                "INSERT INTO runs (job, batch_size, phase, lr, cost_limit, status, host, pid, "
                "started_at) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?)",
                (job, int(batch_size), phase, lr, limit, socket.gethostname(), os.getpid(),
                 time.time()))
            row = self.db.execute("SELECT * FROM runs WHERE id = ?", (cur.lastrowid,)).fetchone()
        return Run(**dict(row))

    def finish(self, run_id: int, status: str, *, cost: float | None = None,
               cost_unit: str | None = None, time_s: float | None = None,
               energy_j: float | None = None, epochs: float | None = None,
               steps: int | None = None, metric: float | None = None,
               note: str | None = None) -> None:
        """Complete a run with its outcome (one transaction)."""
        if status not in STATUSES[1:]:
            raise ValueError(f"status must be one of {STATUSES[1:]!r}, got {status!r}")
        if status != "failed" and cost is None:
            raise ValueError(f"a {status!r} run needs its cost")
        with self.transaction():
            self._finish(run_id, status, cost=cost, cost_unit=cost_unit, time_s=time_s,
                         energy_j=energy_j, epochs=epochs, steps=steps, metric=metric, note=note)

    def _finish(self, run_id: int, status: str, **values) -> int:
        cols = ", ".join(f"{k} = ?" for k in values)
        cur = self.db.execute(
            f"UPDATE runs SET status = ?, finished_at = ?, {cols} WHERE id = ? AND status = 'running'",
            (status, time.time(), *values.values(), run_id))
        return cur.rowcount
