"""Evaluation as a service: the controller has the evaluation service evaluate every point.

Trainers in EVALUATION_SERVICE mode save a checkpoint at every evaluation point (held in the
checkpoint service until evaluated) and report the point with training metrics only, marked
as awaiting evaluation; they go on training. `EvaluationDriver` (its own threads) finds the
points awaiting evaluation in storage, asks the evaluation service to evaluate each one
(trial, exact step, the training loop's splits; the target metric is recorded with the
checkpoint, so the checkpoint service keeps the best checkpoint by the evaluator's numbers),
and merges the answer into the stored point. Evaluation thus runs concurrently with training,
on the evaluator's own devices.

An attempt whose training ended waits in state EVALUATING; `evaluated_result` turns its
training result and the stored evaluations into the final result (curve points, final
metrics and steps-to-target from the evaluator's numbers, ordered by step), or says what is
still missing. Everything is read from storage, so a controller restart loses nothing: the
next controller evaluates what is still awaiting.

The checkpoint's evaluation hold is released only after the answer is stored: with
`checkpoints` the evaluator is asked not to record (recording releases the hold, and
retention may then delete the checkpoint at once), and the driver records the target
metric with the checkpoint service itself once the answer is in storage. A controller that
dies, or an Evaluate call that fails, between the evaluation and the stored answer thus
finds the checkpoint still there and asks again; a release that did not happen (a crash
after storing) is done by the next controller's first round, which releases every held
checkpoint whose step already has a stored evaluation.

Transient failures of the evaluation service (UNAVAILABLE, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED, ABORTED) are retried with backoff; an evaluation that keeps failing, or
fails for good (a corrupt checkpoint: DATA_LOSS), fails its attempt as an infrastructure
failure. A deadline that passes twice counts as failing for good: each try waited the whole
deadline (30 minutes by default), so retrying it to max_tries would hold the attempt for hours
behind an evaluator that is stuck or too slow for the deadline.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import struct_pb2

from batchlab.proto.v1 import checkpoints_pb2, evaluation_pb2
from batchlab.search import Study
from batchlab.search.scoring import steps_to_target
from services.controller.storage import (
    AttemptRecord,
    ExperimentState,
    ExperimentStorage,
    PointRecord,
    TrialKey,
)

if TYPE_CHECKING:
    from services.controller.scheduler import StudyCache

__all__ = ["EVALUATION_SPLITS", "EvaluationDriver", "Evaluated", "evaluated_result",
           "evaluation_steps", "target_result"]

log = logging.getLogger(__name__)

# What the training loop evaluates at every point (batchlab.train.evaluate.LOOP_SPLITS).
EVALUATION_SPLITS = ("train", "validation")
# Tries of one evaluation that may run out of time before its attempt fails.
MAX_DEADLINE_TRIES = 2
# Seconds between two tries of the start-up sweep of held checkpoints while a listing fails.
_SWEEP_RETRY_S = 5.0
_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                      grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """What `evaluated_result` found for an EVALUATING attempt.

    Attributes:
      result: the final result (evaluations merged in), when every point is evaluated.
      missing: curve steps with no stored point at all (their point must be added).
      waiting: curve steps whose evaluation is still to come.
      failed: step -> why its evaluation failed for good.
    """

    result: dict[str, Any] | None
    missing: tuple[int, ...] = ()
    waiting: tuple[int, ...] = ()
    failed: Mapping[int, str] = dataclasses.field(default_factory=dict)


def evaluated_result(attempt: AttemptRecord, study: Study, points: Sequence[PointRecord],
                     failed: Callable[[TrialKey, int], str | None]) -> Evaluated:
    """The final result of a trained attempt, from the evaluations stored for its points.

    A checkpoint step is the same state whichever attempt of the trial saved it (a resumed
    attempt is bit-identical), so an evaluation of any attempt's point at that step counts.

    Args:
      attempt: the EVALUATING attempt (its result is the trainer's).
      study: its study (the target).
      points: every point of the trial (storage.trial_points).
      failed: (trial, step) -> why its evaluation failed for good, or None.
    """
    result = dict(attempt.result or {})
    curve = sorted((dict(p) for p in result.get("curve") or []), key=lambda p: p["step"])
    evaluated: dict[int, Mapping[str, float]] = {}
    reported: set[int] = set()
    for stored in points:
        reported.add(stored.step)
        if not stored.awaiting_evaluation:
            evaluated.setdefault(stored.step, stored.values)
    missing, waiting, failures = [], [], {}
    for point in curve:
        step = int(point["step"])
        if step in evaluated:
            continue
        why = failed(attempt.trial, step)
        if why is not None:
            failures[step] = why
        elif step in reported:
            waiting.append(step)
        else:
            missing.append(step)
    if missing or waiting or failures:
        return Evaluated(None, tuple(missing), tuple(waiting), failures)
    for point in curve:
        values = evaluated[int(point["step"])]
        # The evaluator's metrics; the trainer's own (learning rate, training loss) stay.
        point.update({k: v for k, v in values.items() if k.split("/", 1)[0] in
                      EVALUATION_SPLITS and k != "train/batch_loss"})
    target = study.target
    stt = math.inf
    if curve:
        stt = steps_to_target([int(p["step"]) for p in curve],
                              [p.get(target.metric, math.nan) for p in curve],
                              target.value, target.goal)
    result.update(curve=curve, final_metrics=dict(curve[-1]) if curve else {},
                  steps_to_target=None if math.isinf(stt) else int(stt),
                  evaluated_by="service")
    return Evaluated(result)


def evaluation_steps(study: Study) -> list[int]:
    """The steps the training loop evaluates at: every eval_every_steps, and the last step."""
    every, last = int(study.eval_every_steps), int(study.step_budget)
    return sorted({*range(every, last + 1, every), last})


def target_result(attempt: AttemptRecord, study: Study,
                  points: Sequence[PointRecord]) -> dict[str, Any] | None:
    """A stop_at_target attempt's final result, once the evaluator's numbers meet the target.

    The training loop (batchlab.train.loop, ``stop_at_target``) ends a run SUCCEEDED right
    after the first evaluation meeting the target: its curve, steps completed, final metrics
    and steps-to-target stop there. A trainer evaluated by the service cannot tell, so it
    trains on; this gives the result the loop would have given, from the stored evaluations:
    the first evaluation step (in step order) meeting the target, once every earlier step is
    evaluated and none of them meets it. Later points are left out.

    Args:
      attempt: the ACTIVE or EVALUATING attempt (its trainer's result, if any, gives the
        fields evaluation does not: wall time, throughput, resumed-from step).
      study: its study; nothing is decided unless ``study.stop_at_target``.
      points: every point of the trial (storage.trial_points); a step's evaluation counts
        whichever attempt reported it, as in `evaluated_result`.

    Returns:
      The result (a RunResult dict, ``evaluated_by: "service"``), or None while no evaluated
      step meets the target or an earlier step is not evaluated yet.
    """
    if not study.stop_at_target:
        return None
    evaluated: dict[int, Mapping[str, float]] = {}
    for point in points:
        if not point.awaiting_evaluation:
            evaluated.setdefault(point.step, point.values)
    target = study.target
    curve: list[dict[str, float]] = []
    for step in evaluation_steps(study):
        values = evaluated.get(step)
        if values is None:
            return None  # not reported or not evaluated yet: an earlier step decides first
        curve.append({**dict(values), "step": float(step)})
        if target.is_met(float(values.get(target.metric, math.nan))):
            break
    else:
        return None  # every step evaluated, none met: the trainer's own result stands
    result = dict(attempt.result or {})
    # The trainer's final state is a later step's: no digest of the state this result ends at.
    result.pop("state_sha256", None)
    result.update(outcome="SUCCEEDED", steps_completed=step, curve=curve,
                  final_metrics=dict(curve[-1]), steps_to_target=step, diverged_step=None,
                  error=None, failure=None, evaluated_by="service")
    return result


def _maximize(study: Study) -> bool:
    return int(study.target.goal) != 2  # Goal.MINIMIZE


def _struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(dict(data))
    return struct


@dataclasses.dataclass
class _Job:
    trial: TrialKey
    step: int
    attempt: int
    tries: int = 0
    deadlines: int = 0  # tries that ran out of time
    not_before: float = 0.0


class EvaluationDriver:
    """Sends the points awaiting evaluation to the evaluation service and stores the answers.

    Args:
      storage: the controller's storage.
      stub: an EvaluationServiceStub.
      studies: the StudyCache (a point's study gives its workload, batch size, budget and
        target).
      concurrency: evaluations in flight at once (the service runs one at a time per
        replica; more help with several replicas).
      interval_s: how often storage is read for new points (and at once on `wake`).
      timeout_s: deadline of one Evaluate call.
      max_tries: tries of one evaluation before its attempt fails (at most
        MAX_DEADLINE_TRIES of them may run out of time).
      backoff_s: the first wait after a retried failure (doubled each try, at most 60 s).
      on_evaluated: called after each stored evaluation (the scheduler's wake).
      checkpoints: a CheckpointServiceStub: the driver records the target metric (and so
        releases the hold) after storing the answer. None: the evaluator records it, and a
        crash between its release and the stored answer can lose the checkpoint.
      metrics: batchlab.rpc.metrics ControllerMetrics (the trial's evaluation metrics are
        exported there, as a trainer exports its own), or None.
      clock: monotonic seconds.
    """

    def __init__(self, storage: ExperimentStorage, stub: Any, studies: StudyCache, *,
                 concurrency: int = 2, interval_s: float = 0.5, timeout_s: float = 1800.0,
                 max_tries: int = 6, backoff_s: float = 1.0,
                 on_evaluated: Callable[[], None] | None = None, metrics: Any = None,
                 checkpoints: Any = None, clock: Callable[[], float] = time.monotonic):
        self.storage = storage
        self._stub = stub
        self.studies = studies
        self.concurrency = max(1, concurrency)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.max_tries = max(1, max_tries)
        self.backoff_s = backoff_s
        self._on_evaluated = on_evaluated
        self._checkpoints = checkpoints
        # (trial, step) -> (metric name, maximize, metrics): stored, hold not released yet.
        self._unreleased: dict[tuple[TrialKey, int], tuple[str, bool, dict[str, float]]] = {}
        self._swept = False
        self._sweep_after = 0.0
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[tuple[TrialKey, int], _Job] = {}
        self._in_flight: set[tuple[TrialKey, int]] = set()
        self._failed: dict[tuple[TrialKey, int], str] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.evaluations = 0

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Evaluate in the background until `stop`."""
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.concurrency, thread_name_prefix="evaluation")
        self._thread = threading.Thread(target=self._loop, name="evaluations", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop sending; evaluations in flight are abandoned (the next controller redoes them)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        """Look for new points now (a trainer reported one)."""
        self._wake.set()

    def failed(self, trial: TrialKey, step: int) -> str | None:
        """Why the evaluation of (trial, step) failed for good, or None."""
        with self._lock:
            return self._failed.get((trial, step))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.dispatch()
            except Exception:  # noqa: BLE001 - keep evaluating; the error is logged
                log.exception("evaluation dispatch failed")
            self._wake.wait(self.interval_s)

    # -- one round --------------------------------------------------------------------------
    def dispatch(self) -> int:
        """Send every due point awaiting evaluation (oldest first); returns how many went."""
        now = self._clock()
        active = self.storage.experiments_in([ExperimentState.PENDING, ExperimentState.RUNNING])
        if self._checkpoints is not None:
            if not self._swept and now >= self._sweep_after:
                # Until every listing succeeded: the checkpoint service may start after the
                # controller (`batchlab up` starts the services together), or be restarting.
                self._swept = self._sweep(active)
                self._sweep_after = now + _SWEEP_RETRY_S
            self._release_pending()
        sent = 0
        for experiment in active:
            for point in self.storage.awaiting_points(experiment.id):
                key = (point.trial, point.step)
                with self._lock:
                    if key in self._in_flight or key in self._failed:
                        continue
                    job = self._jobs.setdefault(key, _Job(point.trial, point.step,
                                                          point.attempt))
                    if job.not_before > now or len(self._in_flight) >= self.concurrency:
                        continue
                    self._in_flight.add(key)
                sent += 1
                if self._executor is None:
                    self._run(job, experiment)
                else:
                    self._executor.submit(self._run, job, experiment)
        return sent

    def _study(self, experiment: Any, trial: TrialKey) -> Study:
        return next(s for s in self.studies.get(experiment) if s.id == trial.study_id)

    def _request(self, job: _Job, experiment: Any) -> evaluation_pb2.EvaluateRequest:
        attempt = self.storage.get_attempt(job.trial, job.attempt)
        if attempt is None:
            raise LookupError(f"{job.trial.name} attempt {job.attempt} is not stored")
        study = self._study(experiment, job.trial)
        return evaluation_pb2.EvaluateRequest(
            trial=job.trial.name, step=job.step, workload=study.workload,
            hyperparameters=_struct(attempt.hyperparameters), batch_size=study.batch_size,
            step_budget=study.step_budget, splits=list(EVALUATION_SPLITS),
            # With a checkpoint service the driver records (and releases) after storing.
            record_metric="" if self._checkpoints is not None else study.target.metric,
            maximize=_maximize(study))

    # -- releasing evaluation holds ---------------------------------------------------------
    def _release(self, trial: TrialKey, step: int, metric_name: str, maximize: bool,
                 metrics: Mapping[str, float]) -> bool:
        """Records the target metric of a stored evaluation (releasing the hold).

        Returns whether the checkpoint service answered (a checkpoint already gone counts).
        """
        request = checkpoints_pb2.RecordEvaluationRequest(trial=trial.name, step=step,
                                                          maximize=maximize)
        value = metrics.get(metric_name)
        # A diverged run's NaN must not become the best checkpoint: only release then.
        if value is not None and math.isfinite(value):
            request.metric = value
        try:
            self._checkpoints.RecordEvaluation(request, timeout=60.0)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return True
            log.warning("releasing %s step %d failed (%s: %s); trying again", trial.name, step,
                        error.code().name, error.details())
            return False
        return True

    def _release_pending(self) -> None:
        with self._lock:
            pending = list(self._unreleased.items())
        for (trial, step), (metric_name, maximize, metrics) in pending:
            if self._release(trial, step, metric_name, maximize, metrics):
                with self._lock:
                    self._unreleased.pop((trial, step), None)

    def _sweep(self, active: Sequence[Any]) -> bool:
        """Releases held checkpoints whose evaluation is already stored (a crash in between).

        Returns whether every trial's checkpoints could be listed (else it is tried again).
        """
        complete = True
        for experiment in active:
            evaluated: dict[TrialKey, dict[int, Mapping[str, float]]] = {}
            for point in self.storage.points(experiment.id):
                if not point.awaiting_evaluation:
                    evaluated.setdefault(point.trial, {}).setdefault(point.step, point.values)
            for trial, steps in evaluated.items():
                try:
                    listed = self._checkpoints.ListCheckpoints(
                        checkpoints_pb2.ListCheckpointsRequest(trial=trial.name), timeout=60.0)
                except grpc.RpcError as error:
                    log.warning("listing %s's checkpoints failed (%s); its held checkpoints "
                                "stay held until a later try", trial.name, error.code().name)
                    complete = False
                    continue
                study = self._study(experiment, trial)
                for info in listed.checkpoints:
                    if info.held_for_evaluation and int(info.step) in steps:
                        with self._lock:
                            self._unreleased[(trial, int(info.step))] = (
                                study.target.metric, _maximize(study),
                                dict(steps[int(info.step)]))
        return complete

    def _run(self, job: _Job, experiment: Any) -> None:
        key = (job.trial, job.step)
        try:
            request = self._request(job, experiment)
            response = self._stub.Evaluate(request, timeout=self.timeout_s)
            if response.step != job.step:
                raise RuntimeError(f"the evaluator evaluated step {response.step}, not "
                                   f"{job.step}")
            changed = self.storage.record_evaluation(job.trial, job.step,
                                                     dict(response.metrics))
            if self._checkpoints is not None:
                # Stored: only now may retention delete the checkpoint.
                study = self._study(experiment, job.trial)
                released = (study.target.metric, _maximize(study), dict(response.metrics))
                if not self._release(job.trial, job.step, *released):
                    with self._lock:
                        self._unreleased[key] = released
            if self._metrics is not None:
                self._metrics.report_eval(
                    job.trial.experiment_id, job.trial.study_id,
                    f"{job.trial.trial_index}-r{job.trial.replica}",
                    {k: v for k, v in response.metrics.items() if k != "train/batch_loss"})
            with self._lock:
                self._jobs.pop(key, None)
                self.evaluations += 1
            log.info("%s step %d evaluated (%d point%s)%s", job.trial.name, job.step, changed,
                     "" if changed == 1 else "s", " best so far" if response.is_best else "")
            if self._on_evaluated is not None:
                self._on_evaluated()
        except Exception as error:  # noqa: BLE001 - retried, or the attempt fails
            self._failure(job, error)
        finally:
            with self._lock:
                self._in_flight.discard(key)
            self._wake.set()

    def _failure(self, job: _Job, error: Exception) -> None:
        if isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)):
            code = error.code()
            details = error.details() if code is not None else str(error)
        else:
            code, details = None, str(error)
        job.tries += 1
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            job.deadlines += 1
            details = (f"{details} (no answer within {self.timeout_s:g} s, "
                       f"{job.deadlines} time{'s' if job.deadlines > 1 else ''}; "
                       "BATCHLAB_EVALUATE_TIMEOUT_SECONDS sets the deadline)")
        retried = (code in _RETRIED and job.tries < self.max_tries
                   and job.deadlines < MAX_DEADLINE_TRIES)
        with self._lock:
            if retried:
                job.not_before = self._clock() + min(self.backoff_s * 2 ** (job.tries - 1), 60.0)
            else:
                self._failed[(job.trial, job.step)] = (
                    f"evaluation of step {job.step} failed"
                    f"{f' after {job.tries} tries' if job.tries > 1 else ''}: "
                    f"{getattr(code, 'name', type(error).__name__)}: {details}")
                self._jobs.pop((job.trial, job.step), None)
        log_level = logging.WARNING if retried else logging.ERROR
        log.log(log_level, "evaluating %s step %d failed (%s: %s)%s", job.trial.name, job.step,
                getattr(code, "name", type(error).__name__), details,
                "; trying again" if retried else "")
        if not retried and self._on_evaluated is not None:
            self._on_evaluated()
