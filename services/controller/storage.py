"""The controller's storage: experiments, run attempts, metric points and study aggregates.

`ExperimentStorage` is the interface the servicer and the scheduler use; `SQLiteStorage`
keeps everything in one SQLite database under the state directory (WAL mode, one connection
per thread, every write one transaction) and `InMemoryStorage` in dictionaries (for tests and
throwaway servers). Both pass the same contract suite (tests/services/controller).

What is stored:
  - experiments: name experiments/{id}, the spec as JSON, state, timestamps, error; a
    client's request_id is UNIQUE, so a resubmission finds the first experiment.
  - attempts: one row per run attempt (study, trial index, replica, seed, attempt number,
    kind, hyperparameters, state QUEUED -> ACTIVE -> [EVALUATING ->] COMPLETED, outcome,
    result, worker, why it failed (`Failure`), why it waits to be placed).
    (experiment, study, trial, replica, attempt) is UNIQUE: an attempt cannot be queued twice.
  - points: metric points keyed (trial, attempt, step) UNIQUE, so a retried report never
    double counts. Each point has a sequence number that Watch streams use as a cursor. A
    point awaiting evaluation gets the evaluation service's metrics merged in later (and a
    new sequence number, so watchers see it again).
  - studies: the latest protocol phase, best trial and StudyScore of each study.

Nothing here knows about gRPC or the study protocol; values are plain JSON data.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import enum
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from batchlab.sqlite import ThreadConnections
from services.controller.backups import check_database

__all__ = [
    "AttemptRecord",
    "AttemptState",
    "ExperimentRecord",
    "Failure",
    "ExperimentState",
    "ExperimentStorage",
    "InMemoryStorage",
    "NewAttempt",
    "PointRecord",
    "SQLiteStorage",
    "StorageError",
    "StudyRecord",
    "TERMINAL_EXPERIMENT_STATES",
    "TrialKey",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# What version 1 databases lack; applied in order at open (each ALTER is one transaction).
_MIGRATIONS = {
    2: ("ALTER TABLE attempts ADD COLUMN failure TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE attempts ADD COLUMN pending_reason TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE attempts ADD COLUMN pending_since REAL",
        "ALTER TABLE points ADD COLUMN awaiting INTEGER NOT NULL DEFAULT 0"),
}


class StorageError(RuntimeError):
    """The storage refused an operation (e.g. a duplicate attempt, an unknown experiment)."""


class ExperimentState(enum.StrEnum):
    """States of an experiment (names as batchlab.v1.Experiment.State)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL_EXPERIMENT_STATES = frozenset(
    {ExperimentState.SUCCEEDED, ExperimentState.FAILED, ExperimentState.CANCELLED})


class AttemptState(enum.StrEnum):
    """States of a run attempt (names as batchlab.v1.Trial.State).

    EVALUATING: training ended (the trainer is free again) and the outcome waits for the
    evaluation service's results of the attempt's evaluation points.
    """

    QUEUED = "QUEUED"
    ACTIVE = "ACTIVE"
    EVALUATING = "EVALUATING"
    COMPLETED = "COMPLETED"


class Failure(enum.StrEnum):
    """Why an attempt failed (names as batchlab.v1.Failure without the prefix; "" = none).

    RUN: the run failed by itself (counts toward max_attempts). INFRASTRUCTURE: its trainer
    or a service it needs failed (counts). CONTROLLER: the controller restarted or lost its
    Ray cluster under it (does not count). UNSCHEDULABLE: no node can provide its resources.
    """

    NONE = ""
    RUN = "RUN"
    INFRASTRUCTURE = "INFRASTRUCTURE"
    CONTROLLER = "CONTROLLER"
    UNSCHEDULABLE = "UNSCHEDULABLE"


@dataclasses.dataclass(frozen=True, order=True)
class TrialKey:
    """One protocol run of a study: its tuning run (replica 0) or a seed rerun (1..N).

    Args:
      experiment_id: the experiment id (without "experiments/").
      study_id: the study id.
      trial_index: the tuning trial whose hyperparameters the run uses.
      replica: 0 for the tuning run, 1.. for reruns.
    """

    experiment_id: str
    study_id: str
    trial_index: int
    replica: int

    @property
    def name(self) -> str:
        """The resource name experiments/{e}/studies/{s}/trials/{t}-r{r}."""
        return (f"experiments/{self.experiment_id}/studies/{self.study_id}/trials/"
                f"{self.trial_index}-r{self.replica}")


@dataclasses.dataclass(frozen=True)
class ExperimentRecord:
    """A stored experiment.

    Args:
      id: the experiment id; its resource name is experiments/{id}.
      seq: insertion order (ascending with creation; pagination key).
      request_id: the client's idempotency key ("" when none was given).
      spec: the ExperimentSpec as its protobuf JSON mapping.
      state: see ExperimentState.
      create_time: unix seconds.
      start_time: when the scheduler started it (unix seconds), if it has.
      end_time: when it reached a terminal state, if it has.
      error: why it FAILED, for people.
    """

    id: str
    seq: int
    request_id: str
    spec: Mapping[str, Any]
    state: ExperimentState
    create_time: float
    start_time: float | None = None
    end_time: float | None = None
    error: str = ""

    @property
    def name(self) -> str:
        """The resource name experiments/{id}."""
        return f"experiments/{self.id}"

    @property
    def terminal(self) -> bool:
        """Whether the experiment has ended."""
        return self.state in TERMINAL_EXPERIMENT_STATES


@dataclasses.dataclass(frozen=True)
class NewAttempt:
    """An attempt to queue.

    Args:
      trial: the protocol run it belongs to.
      seed: the run seed.
      attempt: 1 for the first attempt, +1 for each retry.
      kind: "tuning" or "rerun".
      hyperparameters: {"optimizer": config, "workload": overrides}.
    """

    trial: TrialKey
    seed: int
    attempt: int
    kind: str
    hyperparameters: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class AttemptRecord:
    """A stored run attempt.

    Args:
      id: storage id (ascending with creation).
      trial: the protocol run.
      seed: the run seed.
      attempt: the attempt number (1-based).
      kind: "tuning" or "rerun".
      hyperparameters: the trial's hyperparameters.
      state: QUEUED, ACTIVE or COMPLETED.
      outcome: the Outcome name once COMPLETED ("SUCCEEDED", "DIVERGED", "FAILED",
        "CANCELLED"), else None.
      result: the RunResult dict (batchlab.train.RunResult.to_dict()) when one came back.
      error: why it failed, for people.
      worker: the trainer that ran it.
      step: the last step reported for it.
      create_time: unix seconds.
      start_time: when it was handed to a trainer.
      end_time: when it completed.
      failure: why it failed (a Failure value; "" when it did not fail).
      pending_reason: why it waits to be placed ("" when nothing holds it back).
      pending_since: since when no node of the cluster could hold it (unix seconds): set at
        the first permanent refusal, kept through later reasons (another permanent refusal,
        or the cluster out of reach for a while, as when the controller restarts), cleared
        when it is placed. The unschedulable timeout counts from it.
    """

    id: int
    trial: TrialKey
    seed: int
    attempt: int
    kind: str
    hyperparameters: Mapping[str, Any]
    state: AttemptState
    outcome: str | None = None
    result: Mapping[str, Any] | None = None
    error: str = ""
    worker: str = ""
    step: int = 0
    create_time: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    failure: str = ""
    pending_reason: str = ""
    pending_since: float | None = None

    @property
    def counted(self) -> bool:
        """Whether it counts toward max_attempts (a controller-side loss does not)."""
        return self.failure != Failure.CONTROLLER


@dataclasses.dataclass(frozen=True)
class PointRecord:
    """A metric point of a trial attempt.

    Args:
      trial: the protocol run.
      attempt: the attempt that produced it.
      step: the training step.
      values: metric name -> value.
      seq: the storage sequence number (0 before it is stored).
      awaiting_evaluation: the evaluation service's metrics are still to come.
    """

    trial: TrialKey
    attempt: int
    step: int
    values: Mapping[str, float]
    seq: int = 0
    awaiting_evaluation: bool = False


@dataclasses.dataclass(frozen=True)
class StudyRecord:
    """A study's latest protocol reading and score.

    Args:
      study_id: the study.
      phase: "tuning", "reruns" or "done".
      best_trial: the selected trial, once known.
      score: batchlab.search.StudyScore.to_dict().
      update_time: unix seconds.
    """

    study_id: str
    phase: str
    best_trial: int | None
    score: Mapping[str, Any]
    update_time: float = 0.0


class ExperimentStorage(abc.ABC):
    """What the controller stores. Every method is safe to call from several threads.

    Methods that change an attempt or an experiment take the state they expect it to be in
    and return False (changing nothing) otherwise, so two threads never both finish an
    attempt or leave a terminal state.
    """

    # -- experiments ------------------------------------------------------------------------
    @abc.abstractmethod
    def create_experiment(self, experiment_id: str, request_id: str,
                          spec: Mapping[str, Any]) -> tuple[ExperimentRecord, bool]:
        """Store a new PENDING experiment, or find the one created with the same request_id.

        Args:
          experiment_id: the id to use for a new experiment (must be unused).
          request_id: the client's idempotency key; "" never matches another experiment.
          spec: the spec's JSON mapping.

        Returns:
          (the experiment, whether it was created now).
        """

    @abc.abstractmethod
    def get_experiment(self, experiment_id: str) -> ExperimentRecord | None:
        """The experiment with this id, or None."""

    @abc.abstractmethod
    def list_experiments(self, *, after_seq: int = 0,
                         limit: int | None = None) -> list[ExperimentRecord]:
        """Experiments in creation order whose seq is greater than after_seq.

        Args:
          after_seq: the last seq of the previous page (0 for the first page).
          limit: at most this many (None: all).
        """

    @abc.abstractmethod
    def experiments_in(self, states: Iterable[ExperimentState]) -> list[ExperimentRecord]:
        """Experiments in any of the given states, in creation order."""

    @abc.abstractmethod
    def set_experiment_state(self, experiment_id: str, state: ExperimentState, *,
                             expected: Iterable[ExperimentState], error: str = "") -> bool:
        """Move an experiment to `state` if it is in one of `expected`.

        RUNNING sets start_time (if unset); a terminal state sets end_time.

        Returns:
          Whether the state changed.
        """

    # -- attempts ---------------------------------------------------------------------------
    @abc.abstractmethod
    def add_attempts(self, attempts: Sequence[NewAttempt]) -> list[AttemptRecord]:
        """Queue attempts (state QUEUED) in one transaction.

        Raises:
          StorageError: an attempt with the same (trial, attempt) exists, or its experiment
            does not; nothing is stored then.
        """

    @abc.abstractmethod
    def attempts(self, experiment_id: str, *, study_id: str | None = None,
                 states: Iterable[AttemptState] | None = None) -> list[AttemptRecord]:
        """An experiment's attempts in creation order, optionally of one study or states."""

    @abc.abstractmethod
    def get_attempt(self, trial: TrialKey, attempt: int) -> AttemptRecord | None:
        """One attempt of a trial, or None."""

    @abc.abstractmethod
    def activate_attempt(self, attempt_id: int, worker: str) -> bool:
        """QUEUED -> ACTIVE on `worker`; returns whether it changed."""

    @abc.abstractmethod
    def complete_attempt(self, attempt_id: int, outcome: str, *,
                         result: Mapping[str, Any] | None = None, error: str = "",
                         expected: Iterable[AttemptState] = (AttemptState.ACTIVE,),
                         failure: str = "") -> bool:
        """Record how an attempt ended (state COMPLETED) if it is in an expected state.

        Args:
          failure: why it failed (a Failure value), for outcome FAILED.

        Returns:
          Whether it changed (False: it completed before, or is not in an expected state).
        """

    @abc.abstractmethod
    def fail_active_attempts(self, error: str, failure: str = "") -> list[AttemptRecord]:
        """Complete every ACTIVE attempt as FAILED (their controller died); returns them."""

    @abc.abstractmethod
    def finish_training(self, attempt_id: int, result: Mapping[str, Any]) -> bool:
        """ACTIVE -> EVALUATING: training ended with `result`; the outcome waits for the
        evaluations of its points. Returns whether it changed."""

    @abc.abstractmethod
    def set_pending_reason(self, attempt_id: int, reason: str, *, permanent: bool = True) -> None:
        """Say why a QUEUED attempt is not placed ("" clears it and pending_since).

        Args:
          attempt_id: the attempt.
          reason: why it waits, for people.
          permanent: no node of the cluster can hold it (pending_since is set to now unless
            it is set already); False: a passing condition (the cluster out of reach), which
            keeps pending_since as it is.
        """

    # -- points -----------------------------------------------------------------------------
    @abc.abstractmethod
    def add_points(self, points: Sequence[PointRecord]) -> int:
        """Store metric points; a (trial, attempt, step) seen before is ignored.

        Also raises the attempt's `step` to the largest step reported.

        Returns:
          How many points were new.
        """

    @abc.abstractmethod
    def points(self, experiment_id: str, *, after_seq: int = 0,
               limit: int | None = None) -> list[PointRecord]:
        """An experiment's points with seq > after_seq, in seq order."""

    @abc.abstractmethod
    def trial_points(self, trial: TrialKey) -> list[PointRecord]:
        """Every point of a trial (all attempts), in seq order."""

    @abc.abstractmethod
    def awaiting_points(self, experiment_id: str) -> list[PointRecord]:
        """An experiment's points still awaiting evaluation, in seq order."""

    @abc.abstractmethod
    def record_evaluation(self, trial: TrialKey, step: int,
                          values: Mapping[str, float]) -> int:
        """Merge an evaluation's metrics into the trial's points at `step` that await it (any
        attempt: a checkpoint step is the same state whichever attempt reported it), clear
        their flag and give them new sequence numbers. Returns how many points changed."""

    # -- studies ----------------------------------------------------------------------------
    @abc.abstractmethod
    def put_study(self, experiment_id: str, study: StudyRecord) -> None:
        """Store (replace) a study's phase, best trial and score."""

    @abc.abstractmethod
    def studies(self, experiment_id: str) -> dict[str, StudyRecord]:
        """An experiment's stored studies by id."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (connections)."""


# --------------------------------------------------------------------------- SQLite

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


def _dumps(value: Any) -> str:
    # NaN and inf can appear in metrics of diverged runs; Python's json reads them back.
    return json.dumps(value, sort_keys=True, allow_nan=True)


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
                    (experiment_id, request_id or None, _dumps(spec), ExperimentState.PENDING,
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
        states = [str(s) for s in states]
        rows = self._connection().execute(
            f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments WHERE state IN "
            f"({_placeholders(states)}) ORDER BY seq", states).fetchall()
        return [_experiment_from_row(r) for r in rows]

    def set_experiment_state(self, experiment_id: str, state: ExperimentState, *,
                             expected: Iterable[ExperimentState], error: str = "") -> bool:
        expected = [str(s) for s in expected]
        now = self._clock()
        end = now if state in TERMINAL_EXPERIMENT_STATES else None
        start = now if state is ExperimentState.RUNNING else None
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE experiments SET state = ?, error = CASE WHEN ? = '' THEN error "
                "ELSE ? END, start_time = COALESCE(start_time, ?), "
                "end_time = COALESCE(end_time, ?) "
                f"WHERE id = ? AND state IN ({_placeholders(expected)})",
                (str(state), error, error, start, end, experiment_id, *expected))
            return cursor.rowcount == 1

    # -- attempts ---------------------------------------------------------------------------
    def add_attempts(self, attempts: Sequence[NewAttempt]) -> list[AttemptRecord]:
        ids = []
        now = self._clock()
        with self._write() as conn:
            for a in attempts:
                try:
                    cursor = conn.execute(
                        "INSERT INTO attempts (experiment_id, study_id, trial_index, replica, "
                        "seed, attempt, kind, hyperparameters, state, create_time) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (a.trial.experiment_id, a.trial.study_id, a.trial.trial_index,
                         a.trial.replica, a.seed, a.attempt, a.kind, _dumps(a.hyperparameters),
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
            states = [str(s) for s in states]
            query += f" AND state IN ({_placeholders(states)})"
            args.extend(states)
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
        expected = [str(s) for s in expected]
        with self._write() as conn:
            # An EVALUATING attempt keeps the result stored when training ended unless a new
            # one (with the evaluations merged in) comes.
            cursor = conn.execute(
                "UPDATE attempts SET state = ?, outcome = ?, result = COALESCE(?, result), "
                "error = ?, end_time = ?, step = MAX(step, ?), failure = ?, "
                "pending_reason = '', pending_since = NULL "
                f"WHERE id = ? AND state IN ({_placeholders(expected)})",
                (AttemptState.COMPLETED, outcome, None if result is None else _dumps(result),
                 error, self._clock(), int((result or {}).get("steps_completed") or 0),
                 str(failure), attempt_id, *expected))
            return cursor.rowcount == 1

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
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE attempts SET state = ?, result = ?, step = MAX(step, ?) "
                "WHERE id = ? AND state = ?",
                (AttemptState.EVALUATING, _dumps(result),
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
                     _dumps(dict(p.values)), int(p.awaiting_evaluation)))
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
                    (*key, attempt, step, _dumps(merged)))
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
                 _dumps(dict(study.score)), self._clock()))

    def studies(self, experiment_id: str) -> dict[str, StudyRecord]:
        rows = self._connection().execute(
            "SELECT study_id, phase, best_trial, score, update_time FROM studies "
            "WHERE experiment_id = ? ORDER BY study_id", (experiment_id,)).fetchall()
        return {r[0]: StudyRecord(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows}


# ------------------------------------------------------------------------- in memory


class InMemoryStorage(ExperimentStorage):
    """ExperimentStorage in dictionaries behind one lock (nothing survives the process).

    Records are deep-copied on the way in and out, so callers never share mutable state.

    Args:
      clock: returns unix seconds.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.RLock()
        self._experiments: dict[str, ExperimentRecord] = {}
        self._attempts: dict[int, AttemptRecord] = {}
        self._points: dict[tuple[TrialKey, int, int], PointRecord] = {}
        self._studies: dict[tuple[str, str], StudyRecord] = {}
        self._seq = 0

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def create_experiment(self, experiment_id: str, request_id: str,
                          spec: Mapping[str, Any]) -> tuple[ExperimentRecord, bool]:
        with self._lock:
            if request_id:
                for record in self._experiments.values():
                    if record.request_id == request_id:
                        return record, False
            if experiment_id in self._experiments:
                raise StorageError(f"experiment {experiment_id!r} exists")
            record = ExperimentRecord(
                id=experiment_id, seq=self._next_seq(), request_id=request_id,
                spec=json.loads(_dumps(spec)), state=ExperimentState.PENDING,
                create_time=self._clock())
            self._experiments[experiment_id] = record
            return record, True

    def get_experiment(self, experiment_id: str) -> ExperimentRecord | None:
        with self._lock:
            return self._experiments.get(experiment_id)

    def list_experiments(self, *, after_seq: int = 0,
                         limit: int | None = None) -> list[ExperimentRecord]:
        with self._lock:
            found = sorted((e for e in self._experiments.values() if e.seq > after_seq),
                           key=lambda e: e.seq)
        return found if limit is None else found[:limit]

    def experiments_in(self, states: Iterable[ExperimentState]) -> list[ExperimentRecord]:
        states = set(states)
        with self._lock:
            return sorted((e for e in self._experiments.values() if e.state in states),
                          key=lambda e: e.seq)

    def set_experiment_state(self, experiment_id: str, state: ExperimentState, *,
                             expected: Iterable[ExperimentState], error: str = "") -> bool:
        with self._lock:
            record = self._experiments.get(experiment_id)
            if record is None or record.state not in set(expected):
                return False
            now = self._clock()
            self._experiments[experiment_id] = dataclasses.replace(
                record, state=state, error=error or record.error,
                start_time=record.start_time if record.start_time is not None or
                state is not ExperimentState.RUNNING else now,
                end_time=record.end_time if record.end_time is not None or
                state not in TERMINAL_EXPERIMENT_STATES else now)
            return True

    def add_attempts(self, attempts: Sequence[NewAttempt]) -> list[AttemptRecord]:
        with self._lock:
            existing = {(a.trial, a.attempt) for a in self._attempts.values()}
            for a in attempts:
                if a.trial.experiment_id not in self._experiments:
                    raise StorageError(f"cannot queue {a.trial.name}: no such experiment")
                if (a.trial, a.attempt) in existing:
                    raise StorageError(f"cannot queue attempt {a.attempt} of {a.trial.name}: "
                                       "it exists")
                existing.add((a.trial, a.attempt))
            out = []
            now = self._clock()
            for a in attempts:
                record = AttemptRecord(
                    id=self._next_seq(), trial=a.trial, seed=a.seed, attempt=a.attempt,
                    kind=a.kind, hyperparameters=copy.deepcopy(dict(a.hyperparameters)),
                    state=AttemptState.QUEUED, create_time=now)
                self._attempts[record.id] = record
                out.append(record)
            return out

    def attempts(self, experiment_id: str, *, study_id: str | None = None,
                 states: Iterable[AttemptState] | None = None) -> list[AttemptRecord]:
        states = None if states is None else set(states)
        with self._lock:
            return [a for _, a in sorted(self._attempts.items())
                    if a.trial.experiment_id == experiment_id
                    and (study_id is None or a.trial.study_id == study_id)
                    and (states is None or a.state in states)]

    def get_attempt(self, trial: TrialKey, attempt: int) -> AttemptRecord | None:
        with self._lock:
            return next((a for a in self._attempts.values()
                         if a.trial == trial and a.attempt == attempt), None)

    def activate_attempt(self, attempt_id: int, worker: str) -> bool:
        with self._lock:
            record = self._attempts.get(attempt_id)
            if record is None or record.state is not AttemptState.QUEUED:
                return False
            self._attempts[attempt_id] = dataclasses.replace(
                record, state=AttemptState.ACTIVE, worker=worker, start_time=self._clock())
            return True

    def complete_attempt(self, attempt_id: int, outcome: str, *,
                         result: Mapping[str, Any] | None = None, error: str = "",
                         expected: Iterable[AttemptState] = (AttemptState.ACTIVE,),
                         failure: str = "") -> bool:
        with self._lock:
            record = self._attempts.get(attempt_id)
            if record is None or record.state not in set(expected):
                return False
            steps = int((result or {}).get("steps_completed") or 0)
            self._attempts[attempt_id] = dataclasses.replace(
                record, state=AttemptState.COMPLETED, outcome=outcome,
                result=record.result if result is None else json.loads(_dumps(result)),
                error=error, end_time=self._clock(), step=max(record.step, steps),
                failure=str(failure), pending_reason="", pending_since=None)
            return True

    def fail_active_attempts(self, error: str, failure: str = "") -> list[AttemptRecord]:
        with self._lock:
            active = [a for _, a in sorted(self._attempts.items())
                      if a.state is AttemptState.ACTIVE]
            for a in active:
                self.complete_attempt(a.id, "FAILED", error=error, failure=failure)
            return active

    def finish_training(self, attempt_id: int, result: Mapping[str, Any]) -> bool:
        with self._lock:
            record = self._attempts.get(attempt_id)
            if record is None or record.state is not AttemptState.ACTIVE:
                return False
            self._attempts[attempt_id] = dataclasses.replace(
                record, state=AttemptState.EVALUATING, result=json.loads(_dumps(result)),
                step=max(record.step, int(result.get("steps_completed") or 0)))
            return True

    def set_pending_reason(self, attempt_id: int, reason: str, *, permanent: bool = True) -> None:
        with self._lock:
            record = self._attempts.get(attempt_id)
            if record is None:
                return
            since = (None if not reason else record.pending_since
                     if record.pending_since is not None or not permanent else self._clock())
            self._attempts[attempt_id] = dataclasses.replace(
                record, pending_reason=reason, pending_since=since)

    def add_points(self, points: Sequence[PointRecord]) -> int:
        added = 0
        with self._lock:
            for p in points:
                key = (p.trial, p.attempt, p.step)
                if key not in self._points:
                    self._points[key] = dataclasses.replace(
                        p, values=dict(p.values), seq=self._next_seq())
                    added += 1
                for attempt_id, a in self._attempts.items():
                    if a.trial == p.trial and a.attempt == p.attempt and a.step < p.step:
                        self._attempts[attempt_id] = dataclasses.replace(a, step=p.step)
        return added

    def points(self, experiment_id: str, *, after_seq: int = 0,
               limit: int | None = None) -> list[PointRecord]:
        with self._lock:
            found = sorted((p for p in self._points.values()
                            if p.trial.experiment_id == experiment_id and p.seq > after_seq),
                           key=lambda p: p.seq)
        return found if limit is None else found[:limit]

    def trial_points(self, trial: TrialKey) -> list[PointRecord]:
        with self._lock:
            return sorted((p for p in self._points.values() if p.trial == trial),
                          key=lambda p: p.seq)

    def awaiting_points(self, experiment_id: str) -> list[PointRecord]:
        with self._lock:
            return sorted((p for p in self._points.values()
                           if p.trial.experiment_id == experiment_id and p.awaiting_evaluation),
                          key=lambda p: p.seq)

    def record_evaluation(self, trial: TrialKey, step: int,
                          values: Mapping[str, float]) -> int:
        with self._lock:
            keys = [k for k, p in self._points.items()
                    if p.trial == trial and p.step == step and p.awaiting_evaluation]
            for k in keys:
                point = self._points[k]
                self._points[k] = dataclasses.replace(
                    point, values={**point.values, **dict(values)}, seq=self._next_seq(),
                    awaiting_evaluation=False)
            return len(keys)

    def put_study(self, experiment_id: str, study: StudyRecord) -> None:
        with self._lock:
            self._studies[(experiment_id, study.study_id)] = dataclasses.replace(
                study, score=json.loads(_dumps(dict(study.score))), update_time=self._clock())

    def studies(self, experiment_id: str) -> dict[str, StudyRecord]:
        with self._lock:
            return {s: r for (e, s), r in sorted(self._studies.items()) if e == experiment_id}
