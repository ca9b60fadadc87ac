"""What the controller stores: experiment, attempt, point and study records, and their states."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from typing import Any


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

# Why a run whose training ended after its experiment did completes as CANCELLED.
ENDED_ERROR = "its experiment ended before the run's evaluations"


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


def dumps_value(value: Any) -> str:
    """A stored value as JSON text (sorted keys); NaN and inf, which metrics of diverged runs
    hold, are written as Python's json reads them back."""
    return json.dumps(value, sort_keys=True, allow_nan=True)
