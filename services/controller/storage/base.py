"""ExperimentStorage: the interface the servicer and the scheduler use, which every storage implements."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from services.controller.storage.records import (
    AttemptRecord,
    AttemptState,
    ExperimentRecord,
    ExperimentState,
    NewAttempt,
    PointRecord,
    StudyRecord,
    TrialKey,
)


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

    @abc.abstractmethod
    def end_experiment(self, experiment_id: str, state: ExperimentState, *,
                       expected: Iterable[ExperimentState], error: str = "",
                       cancel_error: str) -> tuple[bool, int]:
        """Move an experiment to the terminal `state` (if it is in one of `expected`) and, in
        the same transaction, complete its QUEUED and EVALUATING attempts as CANCELLED with
        `cancel_error` (nobody runs or waits for them any more). A reader never sees the
        experiment ended while runs of it still wait.

        Returns:
          Whether the state changed, and how many attempts were cancelled (they are
          cancelled even when the state did not change: the experiment had ended already).
        """

    # -- attempts ---------------------------------------------------------------------------
    @abc.abstractmethod
    def add_attempts(self, attempts: Sequence[NewAttempt]) -> list[AttemptRecord]:
        """Queue attempts (state QUEUED) in one transaction.

        Raises:
          StorageError: an attempt with the same (trial, attempt) exists, or its experiment
            does not exist or has ended (a run queued then would wait forever); nothing is
            stored then.
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
        evaluations of its points. Returns whether it changed. If the attempt's experiment has
        ended, nobody evaluates its points: it completes as CANCELLED (error ENDED_ERROR, the
        result kept) in the same transaction, and False is returned."""

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
