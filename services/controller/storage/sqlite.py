"""SQLiteStorage: everything in one SQLite database under the state directory (WAL mode, one
connection per thread, every write one transaction), with schema migrations."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from batchlab.sqlite import ThreadConnections
from services.controller.backups import check_database
from services.controller.storage.base import ExperimentStorage
from services.controller.storage.records import (
    ENDED_ERROR,
    TERMINAL_EXPERIMENT_STATES,
    AttemptRecord,
    AttemptState,
    ExperimentRecord,
    ExperimentState,
    NewAttempt,
    PointRecord,
    StorageError,
    StudyRecord,
    TrialKey,
    dumps_value,
)

log = logging.getLogger(__name__)


SCHEMA_VERSION = 2
# What version 1 databases lack; applied in order at open (each ALTER is one transaction).
_MIGRATIONS = {
    2: ("ALTER TABLE attempts ADD COLUMN failure TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE attempts ADD COLUMN pending_reason TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE attempts ADD COLUMN pending_since REAL",
        "ALTER TABLE points ADD COLUMN awaiting INTEGER NOT NULL DEFAULT 0"),
}




_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS experiments (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  request_id TEXT UNIQUE,
  spec TEXT NOT NULL,
  state TEXT NOT NULL,
  create_time REAL NOT NULL,
  start_time REAL,
  end_time REAL,
  error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS experiments_by_state ON experiments(state);
CREATE TABLE IF NOT EXISTS attempts (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  experiment_id TEXT NOT NULL REFERENCES experiments(id),
  study_id TEXT NOT NULL,
  trial_index INTEGER NOT NULL,
  replica INTEGER NOT NULL,
  seed INTEGER NOT NULL,
  attempt INTEGER NOT NULL,
  kind TEXT NOT NULL,
  hyperparameters TEXT NOT NULL,
  state TEXT NOT NULL,
  outcome TEXT,
  result TEXT,
  error TEXT NOT NULL DEFAULT '',
  worker TEXT NOT NULL DEFAULT '',
  step INTEGER NOT NULL DEFAULT 0,
  create_time REAL NOT NULL,
  start_time REAL,
  end_time REAL,
  failure TEXT NOT NULL DEFAULT '',
  pending_reason TEXT NOT NULL DEFAULT '',
  pending_since REAL,
  UNIQUE (experiment_id, study_id, trial_index, replica, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_by_state ON attempts(state);
CREATE INDEX IF NOT EXISTS attempts_by_experiment ON attempts(experiment_id, study_id);
CREATE TABLE IF NOT EXISTS points (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  experiment_id TEXT NOT NULL,
  study_id TEXT NOT NULL,
  trial_index INTEGER NOT NULL,
  replica INTEGER NOT NULL,
  attempt INTEGER NOT NULL,
  step INTEGER NOT NULL,
  metrics TEXT NOT NULL,
  awaiting INTEGER NOT NULL DEFAULT 0,
  UNIQUE (experiment_id, study_id, trial_index, replica, attempt, step)
);
CREATE INDEX IF NOT EXISTS points_by_experiment ON points(experiment_id, seq);
CREATE TABLE IF NOT EXISTS studies (
  experiment_id TEXT NOT NULL,
  study_id TEXT NOT NULL,
  phase TEXT NOT NULL,
  best_trial INTEGER,
  score TEXT NOT NULL,
  update_time REAL NOT NULL,
  PRIMARY KEY (experiment_id, study_id)
);
"""

_ATTEMPT_COLUMNS = ("id, experiment_id, study_id, trial_index, replica, seed, attempt, kind, "
                    "hyperparameters, state, outcome, result, error, worker, step, create_time, "
                    "start_time, end_time, failure, pending_reason, pending_since")
_POINT_COLUMNS = "seq, study_id, trial_index, replica, attempt, step, metrics, awaiting"
# After the migrations: indexes on columns that version 1 lacked.
_INDEXES = """
CREATE INDEX IF NOT EXISTS points_awaiting ON points(experiment_id, awaiting);
CREATE INDEX IF NOT EXISTS points_by_trial ON points(experiment_id, study_id, trial_index,
                                                     replica, step);
"""
_EXPERIMENT_COLUMNS = ("id, seq, request_id, spec, state, create_time, start_time, end_time, "
                       "error")


def _experiment_from_row(row: Sequence[Any]) -> ExperimentRecord:
    return ExperimentRecord(
        id=row[0], seq=row[1], request_id=row[2] or "", spec=json.loads(row[3]),
        state=ExperimentState(row[4]), create_time=row[5], start_time=row[6], end_time=row[7],
        error=row[8] or "")


def _attempt_from_row(row: Sequence[Any]) -> AttemptRecord:
    return AttemptRecord(
        id=row[0], trial=TrialKey(row[1], row[2], row[3], row[4]), seed=row[5], attempt=row[6],
        kind=row[7], hyperparameters=json.loads(row[8]), state=AttemptState(row[9]),
        outcome=row[10], result=None if row[11] is None else json.loads(row[11]),
        error=row[12] or "", worker=row[13] or "", step=row[14], create_time=row[15],
        start_time=row[16], end_time=row[17], failure=row[18] or "",
        pending_reason=row[19] or "", pending_since=row[20])


def _point_from_row(experiment_id: str, row: Sequence[Any]) -> PointRecord:
    return PointRecord(TrialKey(experiment_id, row[1], row[2], row[3]), row[4], row[5],
                       json.loads(row[6]), seq=row[0], awaiting_evaluation=bool(row[7]))


def _placeholders(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)


def _set_experiment_state(conn: sqlite3.Connection, experiment_id: str, state: ExperimentState,
                          expected: Iterable[ExperimentState], error: str, now: float) -> bool:
    """ExperimentStorage.set_experiment_state inside the caller's write transaction."""
    expected_names = [str(s) for s in expected]
    end = now if state in TERMINAL_EXPERIMENT_STATES else None
    start = now if state is ExperimentState.RUNNING else None
    cursor = conn.execute(
        "UPDATE experiments SET state = ?, error = CASE WHEN ? = '' THEN error "
        "ELSE ? END, start_time = COALESCE(start_time, ?), "
        "end_time = COALESCE(end_time, ?) "
        f"WHERE id = ? AND state IN ({_placeholders(expected_names)})",
        (str(state), error, error, start, end, experiment_id, *expected_names))
    return cursor.rowcount == 1


def _complete_attempt(conn: sqlite3.Connection, attempt_id: int, outcome: str,
                      result: Mapping[str, Any] | None, error: str,
                      expected: Iterable[AttemptState], failure: str, now: float) -> bool:
    """ExperimentStorage.complete_attempt inside the caller's write transaction."""
    expected_names = [str(s) for s in expected]
    # An EVALUATING attempt keeps the result stored when training ended unless a new one
    # (with the evaluations merged in) comes.
    cursor = conn.execute(
        "UPDATE attempts SET state = ?, outcome = ?, result = COALESCE(?, result), "
        "error = ?, end_time = ?, step = MAX(step, ?), failure = ?, "
        "pending_reason = '', pending_since = NULL "
        f"WHERE id = ? AND state IN ({_placeholders(expected_names)})",
        (AttemptState.COMPLETED, outcome, None if result is None else dumps_value(result),
         error, now, int((result or {}).get("steps_completed") or 0),
         str(failure), attempt_id, *expected_names))
    return cursor.rowcount == 1


class SQLiteStorage(ExperimentStorage):
    """ExperimentStorage in one SQLite file (WAL mode), safe across threads.

    Every thread gets its own connection; each write is one `BEGIN IMMEDIATE` transaction, so
    writers queue on SQLite's lock (with a busy timeout) instead of failing with "database is
    locked", and readers see committed data only.

    Args:
      directory: the state directory; the database is directory/controller.sqlite3.
      clock: returns unix seconds (tests pass a fake).
      busy_timeout_s: how long a writer waits for the lock before failing.

    Raises:
      DatabaseDamaged: an existing database fails SQLite's integrity check (the message says
        how to restore a backup; services.controller.backups).
    """

    FILENAME = "controller.sqlite3"

    def __init__(self, directory: str | Path, *, clock: Callable[[], float] = time.time,
                 busy_timeout_s: float = 30.0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / self.FILENAME
        # Before anything touches the file: a damaged database is refused with the way out.
        check_database(self.path)
        self._clock = clock
        self._db = ThreadConnections(self.path, busy_timeout_s=busy_timeout_s, foreign_keys=True)
        # Idempotent DDL (IF NOT EXISTS), outside a transaction: executescript commits first.
        self._connection().executescript(_SCHEMA)
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                             (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StorageError(f"{self.path}: schema version {row[0]}, this controller "
                                   f"reads version {SCHEMA_VERSION}")
            else:
                for version in range(int(row[0]) + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[version]:
                        conn.execute(statement)
                    log.info("%s: schema upgraded to version %d", self.path, version)
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                             (str(SCHEMA_VERSION),))
        self._connection().executescript(_INDEXES)
        log.info("storage at %s", self.path)

    # -- connections ------------------------------------------------------------------------
    def _open(self) -> ThreadConnections:
        if self._db.closed:
            raise StorageError(f"{self.path}: storage is closed")
        return self._db

    def _connection(self) -> sqlite3.Connection:
        return self._open().get()

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction; rolled back on any exception."""
        return self._open().write()

    def _read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One read transaction: every query inside sees the same snapshot."""
        return self._open().read()

    def close(self) -> None:
        """Close every thread's connection."""
        self._db.close()

    # -- experiments ------------------------------------------------------------------------
    def create_experiment(self, experiment_id: str, request_id: str,
                          spec: Mapping[str, Any]) -> tuple[ExperimentRecord, bool]:
        with self._write() as conn:
            if request_id:
                row = conn.execute(f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments "
                                   "WHERE request_id = ?", (request_id,)).fetchone()
                if row is not None:
                    return _experiment_from_row(row), False
            try:
                conn.execute(
                    "INSERT INTO experiments (id, request_id, spec, state, create_time) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (experiment_id, request_id or None, dumps_value(spec), ExperimentState.PENDING,
                     self._clock()))
            except sqlite3.IntegrityError as error:
                raise StorageError(f"experiment {experiment_id!r} exists: {error}") from error
            row = conn.execute(f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments WHERE id = ?",
                               (experiment_id,)).fetchone()
            return _experiment_from_row(row), True

    def get_experiment(self, experiment_id: str) -> ExperimentRecord | None:
        row = self._connection().execute(
            f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments WHERE id = ?",
            (experiment_id,)).fetchone()
        return None if row is None else _experiment_from_row(row)

    def list_experiments(self, *, after_seq: int = 0,
                         limit: int | None = None) -> list[ExperimentRecord]:
        rows = self._connection().execute(
            f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments WHERE seq > ? ORDER BY seq "
            "LIMIT ?", (after_seq, -1 if limit is None else limit)).fetchall()
        return [_experiment_from_row(r) for r in rows]

    def experiments_in(self, states: Iterable[ExperimentState]) -> list[ExperimentRecord]:
        state_names = [str(s) for s in states]
        rows = self._connection().execute(
            f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments WHERE state IN "
            f"({_placeholders(state_names)}) ORDER BY seq", state_names).fetchall()
        return [_experiment_from_row(r) for r in rows]

    def set_experiment_state(self, experiment_id: str, state: ExperimentState, *,
                             expected: Iterable[ExperimentState], error: str = "") -> bool:
        with self._write() as conn:
            return _set_experiment_state(conn, experiment_id, state, expected, error,
                                         self._clock())

    def end_experiment(self, experiment_id: str, state: ExperimentState, *,
                       expected: Iterable[ExperimentState], error: str = "",
                       cancel_error: str) -> tuple[bool, int]:
        if state not in TERMINAL_EXPERIMENT_STATES:
            raise ValueError(f"end_experiment: {state} is not a terminal state")
        waiting = [str(AttemptState.QUEUED), str(AttemptState.EVALUATING)]
        now = self._clock()
        with self._write() as conn:
            changed = _set_experiment_state(conn, experiment_id, state, expected, error, now)
            cancelled = conn.execute(
                "UPDATE attempts SET state = ?, outcome = 'CANCELLED', error = ?, "
                "end_time = ?, pending_reason = '', pending_since = NULL "
                f"WHERE experiment_id = ? AND state IN ({_placeholders(waiting)})",
                (AttemptState.COMPLETED, cancel_error, now, experiment_id, *waiting)).rowcount
        return changed, cancelled

    # -- attempts ---------------------------------------------------------------------------
    def add_attempts(self, attempts: Sequence[NewAttempt]) -> list[AttemptRecord]:
        ids = []
        now = self._clock()
        with self._write() as conn:
            for experiment_id in sorted({a.trial.experiment_id for a in attempts}):
                row = conn.execute("SELECT state FROM experiments WHERE id = ?",
                                   (experiment_id,)).fetchone()
                if row is not None and ExperimentState(row[0]) in TERMINAL_EXPERIMENT_STATES:
                    raise StorageError(f"cannot queue runs of experiments/{experiment_id}: it "
                                       f"ended {row[0]}")
            for a in attempts:
                try:
                    cursor = conn.execute(
                        "INSERT INTO attempts (experiment_id, study_id, trial_index, replica, "
                        "seed, attempt, kind, hyperparameters, state, create_time) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (a.trial.experiment_id, a.trial.study_id, a.trial.trial_index,
                         a.trial.replica, a.seed, a.attempt, a.kind, dumps_value(a.hyperparameters),
                         AttemptState.QUEUED, now))
                except sqlite3.IntegrityError as error:
                    raise StorageError(f"cannot queue attempt {a.attempt} of {a.trial.name}: "
                                       f"{error}") from error
                ids.append(cursor.lastrowid)
            rows = conn.execute(
                f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE id IN ({_placeholders(ids)}) "
                "ORDER BY id", ids).fetchall() if ids else []
        return [_attempt_from_row(r) for r in rows]

    def attempts(self, experiment_id: str, *, study_id: str | None = None,
                 states: Iterable[AttemptState] | None = None) -> list[AttemptRecord]:
        query = f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE experiment_id = ?"
        args: list[Any] = [experiment_id]
        if study_id is not None:
            query += " AND study_id = ?"
            args.append(study_id)
        if states is not None:
            state_names = [str(s) for s in states]
            query += f" AND state IN ({_placeholders(state_names)})"
            args.extend(state_names)
        rows = self._connection().execute(query + " ORDER BY id", args).fetchall()
        return [_attempt_from_row(r) for r in rows]

    def get_attempt(self, trial: TrialKey, attempt: int) -> AttemptRecord | None:
        row = self._connection().execute(
            f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE experiment_id = ? AND study_id = ? "
            "AND trial_index = ? AND replica = ? AND attempt = ?",
            (trial.experiment_id, trial.study_id, trial.trial_index, trial.replica,
             attempt)).fetchone()
        return None if row is None else _attempt_from_row(row)

    def activate_attempt(self, attempt_id: int, worker: str) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE attempts SET state = ?, worker = ?, start_time = ? "
                "WHERE id = ? AND state = ?",
                (AttemptState.ACTIVE, worker, self._clock(), attempt_id, AttemptState.QUEUED))
            return cursor.rowcount == 1

    def complete_attempt(self, attempt_id: int, outcome: str, *,
                         result: Mapping[str, Any] | None = None, error: str = "",
                         expected: Iterable[AttemptState] = (AttemptState.ACTIVE,),
                         failure: str = "") -> bool:
        with self._write() as conn:
            return _complete_attempt(conn, attempt_id, outcome, result, error, expected,
                                     failure, self._clock())

    def fail_active_attempts(self, error: str, failure: str = "") -> list[AttemptRecord]:
        with self._write() as conn:
            rows = conn.execute(f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE state = ? "
                                "ORDER BY id", (AttemptState.ACTIVE,)).fetchall()
            conn.execute("UPDATE attempts SET state = ?, outcome = 'FAILED', error = ?, "
                         "end_time = ?, failure = ? WHERE state = ?",
                         (AttemptState.COMPLETED, error, self._clock(), str(failure),
                          AttemptState.ACTIVE))
        return [_attempt_from_row(r) for r in rows]

    def finish_training(self, attempt_id: int, result: Mapping[str, Any]) -> bool:
        terminal = [str(s) for s in TERMINAL_EXPERIMENT_STATES]
        with self._write() as conn:
            # An ended experiment's evaluations never come: its run completes as CANCELLED.
            ended = conn.execute(
                "SELECT 1 FROM attempts JOIN experiments ON experiments.id = "
                f"attempts.experiment_id WHERE attempts.id = ? AND experiments.state IN "
                f"({_placeholders(terminal)})", (attempt_id, *terminal)).fetchone() is not None
            if ended:
                _complete_attempt(conn, attempt_id, "CANCELLED", result, ENDED_ERROR,
                                  [AttemptState.ACTIVE], "", self._clock())
                return False
            cursor = conn.execute(
                "UPDATE attempts SET state = ?, result = ?, step = MAX(step, ?) "
                "WHERE id = ? AND state = ?",
                (AttemptState.EVALUATING, dumps_value(result),
                 int(result.get("steps_completed") or 0), attempt_id, AttemptState.ACTIVE))
            return cursor.rowcount == 1

    def set_pending_reason(self, attempt_id: int, reason: str, *, permanent: bool = True) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE attempts SET pending_since = CASE WHEN ? = '' THEN NULL "
                "WHEN ? THEN COALESCE(pending_since, ?) ELSE pending_since END, "
                "pending_reason = ? WHERE id = ?",
                (reason, int(permanent), self._clock(), reason, attempt_id))

    # -- points -----------------------------------------------------------------------------
    def add_points(self, points: Sequence[PointRecord]) -> int:
        added = 0
        with self._write() as conn:
            for p in points:
                t = p.trial
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO points (experiment_id, study_id, trial_index, "
                    "replica, attempt, step, metrics, awaiting) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (t.experiment_id, t.study_id, t.trial_index, t.replica, p.attempt, p.step,
                     dumps_value(dict(p.values)), int(p.awaiting_evaluation)))
                added += cursor.rowcount
                conn.execute(
                    "UPDATE attempts SET step = MAX(step, ?) WHERE experiment_id = ? AND "
                    "study_id = ? AND trial_index = ? AND replica = ? AND attempt = ?",
                    (p.step, t.experiment_id, t.study_id, t.trial_index, t.replica, p.attempt))
        return added

    def points(self, experiment_id: str, *, after_seq: int = 0,
               limit: int | None = None) -> list[PointRecord]:
        rows = self._connection().execute(
            f"SELECT {_POINT_COLUMNS} FROM points "
            "WHERE experiment_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (experiment_id, after_seq, -1 if limit is None else limit)).fetchall()
        return [_point_from_row(experiment_id, r) for r in rows]

    def trial_points(self, trial: TrialKey) -> list[PointRecord]:
        rows = self._connection().execute(
            f"SELECT {_POINT_COLUMNS} FROM points WHERE experiment_id = ? AND study_id = ? "
            "AND trial_index = ? AND replica = ? ORDER BY seq",
            (trial.experiment_id, trial.study_id, trial.trial_index, trial.replica)).fetchall()
        return [_point_from_row(trial.experiment_id, r) for r in rows]

    def awaiting_points(self, experiment_id: str) -> list[PointRecord]:
        rows = self._connection().execute(
            f"SELECT {_POINT_COLUMNS} FROM points WHERE experiment_id = ? AND awaiting = 1 "
            "ORDER BY seq", (experiment_id,)).fetchall()
        return [_point_from_row(experiment_id, r) for r in rows]

    def record_evaluation(self, trial: TrialKey, step: int,
                          values: Mapping[str, float]) -> int:
        key = (trial.experiment_id, trial.study_id, trial.trial_index, trial.replica)
        with self._write() as conn:
            rows = conn.execute(
                "SELECT seq, attempt, metrics FROM points WHERE experiment_id = ? AND "
                "study_id = ? AND trial_index = ? AND replica = ? AND step = ? AND awaiting = 1",
                (*key, step)).fetchall()
            for seq, attempt, metrics in rows:
                merged = {**json.loads(metrics), **dict(values)}
                # Deleted and inserted again: a new seq, so Watch streams send it again.
                conn.execute("DELETE FROM points WHERE seq = ?", (seq,))
                conn.execute(
                    "INSERT INTO points (experiment_id, study_id, trial_index, replica, "
                    "attempt, step, metrics, awaiting) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                    (*key, attempt, step, dumps_value(merged)))
        return len(rows)

    # -- studies ----------------------------------------------------------------------------
    def put_study(self, experiment_id: str, study: StudyRecord) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO studies (experiment_id, study_id, phase, best_trial, score, "
                "update_time) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (experiment_id, study_id) "
                "DO UPDATE SET phase = excluded.phase, best_trial = excluded.best_trial, "
                "score = excluded.score, update_time = excluded.update_time",
                (experiment_id, study.study_id, study.phase, study.best_trial,
                 dumps_value(dict(study.score)), self._clock()))

    def studies(self, experiment_id: str) -> dict[str, StudyRecord]:
        rows = self._connection().execute(
            "SELECT study_id, phase, best_trial, score, update_time FROM studies "
            "WHERE experiment_id = ? ORDER BY study_id", (experiment_id,)).fetchall()
        return {r[0]: StudyRecord(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows}
