"""InMemoryStorage: the same contract in dictionaries (for tests and throwaway servers)."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

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
                spec=json.loads(dumps_value(spec)), state=ExperimentState.PENDING,
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

    def end_experiment(self, experiment_id: str, state: ExperimentState, *,
                       expected: Iterable[ExperimentState], error: str = "",
                       cancel_error: str) -> tuple[bool, int]:
        if state not in TERMINAL_EXPERIMENT_STATES:
            raise ValueError(f"end_experiment: {state} is not a terminal state")
        waiting = [AttemptState.QUEUED, AttemptState.EVALUATING]
        with self._lock:  # reentrant: the two steps are one transaction
            changed = self.set_experiment_state(experiment_id, state, expected=expected,
                                                error=error)
            cancelled = sum(self.complete_attempt(a.id, "CANCELLED", error=cancel_error,
                                                  expected=waiting)
                            for a in self.attempts(experiment_id, states=waiting))
        return changed, cancelled

    def add_attempts(self, attempts: Sequence[NewAttempt]) -> list[AttemptRecord]:
        with self._lock:
            existing = {(a.trial, a.attempt) for a in self._attempts.values()}
            for a in attempts:
                if a.trial.experiment_id not in self._experiments:
                    raise StorageError(f"cannot queue {a.trial.name}: no such experiment")
                experiment = self._experiments[a.trial.experiment_id]
                if experiment.terminal:
                    raise StorageError(f"cannot queue {a.trial.name}: its experiment ended "
                                       f"{experiment.state.value}")
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
                result=record.result if result is None else json.loads(dumps_value(result)),
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
            if self._experiments[record.trial.experiment_id].terminal:
                # An ended experiment's evaluations never come (reentrant lock: one step).
                self.complete_attempt(attempt_id, "CANCELLED", result=result, error=ENDED_ERROR)
                return False
            self._attempts[attempt_id] = dataclasses.replace(
                record, state=AttemptState.EVALUATING, result=json.loads(dumps_value(result)),
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
                study, score=json.loads(dumps_value(dict(study.score))), update_time=self._clock())

    def studies(self, experiment_id: str) -> dict[str, StudyRecord]:
        with self._lock:
            return {s: r for (e, s), r in sorted(self._studies.items()) if e == experiment_id}
