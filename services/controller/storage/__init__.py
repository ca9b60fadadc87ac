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

from services.controller.storage.base import ExperimentStorage
from services.controller.storage.memory import InMemoryStorage
from services.controller.storage.records import (
    TERMINAL_EXPERIMENT_STATES,
    AttemptRecord,
    AttemptState,
    ExperimentRecord,
    ExperimentState,
    Failure,
    NewAttempt,
    PointRecord,
    StorageError,
    StudyRecord,
    TrialKey,
)
from services.controller.storage.sqlite import SQLiteStorage

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
