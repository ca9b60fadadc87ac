"""The scheduler: drives every running experiment's studies with the study protocol.

One background thread repeats a tick:
  1. collect attempts that ended on the trainer pool and store their results, with why a
     failed one failed (`Failure`): a run that raised or failed in training is the run's own
     failure; a lost trainer or a failing service is the infrastructure's; an attempt lost
     with the controller (a restart, a lost Ray cluster) is the controller's and does not
     count toward the spec's max_attempts. The protocol retries failed runs as a new attempt
     on whichever trainer is free, resuming from the trial's last uploaded checkpoint. With
     evaluation by the evaluation service, a run that trained to its end waits (EVALUATING)
     until every evaluation point is evaluated (services.controller.evaluations), and its
     result is built from the evaluator's numbers;
  2. for each PENDING or RUNNING experiment and each study: the stored attempts become
     protocol records, `batchlab.search.next_runs(study, records, in_flight=...,
     parallelism=...)` says what to launch, and those runs are stored as QUEUED attempts;
     the study's score (`score_study`) is stored whenever its records change; when every
     study is done the experiment SUCCEEDED (FAILED when a run failed for good: its study
     is missing a run the protocol budgeted);
  3. place QUEUED attempts, oldest first, on free trainers (QUEUED -> ACTIVE; the
     experiment is RUNNING from its first placed attempt). A run whose resources no node of
     the cluster can provide is not placed anywhere: it stays QUEUED with the reason (the
     trial's and the experiment's pending_reason, and the autoscaler is asked for the
     nodes), and after `unschedulable_after_s` it fails as UNSCHEDULABLE, failing its
     experiment with that reason;
  4. ask trainers running attempts of a cancelled or failed experiment to stop.

The protocol is a pure function of the stored records, so nothing but storage carries state
across ticks or controller restarts. On start, attempts still ACTIVE in storage belonged to a
controller that died (their trainers went with it): they are completed as FAILED (Failure
CONTROLLER) and the protocol retries them without counting them, so a controller killed at
any moment and restarted on the same state directory finishes the experiment with every
trial completed exactly once, within the same max_attempts.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

from google.protobuf import json_format

from batchlab.proto.v1 import common_pb2, controller_pb2, experiment_pb2
from batchlab.search import (
    RunRecord,
    Study,
    expand_studies,
    next_runs,
    request_differences,
    score_study,
    unfilled_runs,
)
from services.controller.evaluations import evaluated_result, target_result
from services.controller.pool import Finished, TrainerPool
from services.controller.results import run_record
from services.controller.storage import (
    AttemptRecord,
    AttemptState,
    ExperimentRecord,
    ExperimentState,
    ExperimentStorage,
    Failure,
    NewAttempt,
    PointRecord,
    StorageError,
    StudyRecord,
    TrialKey,
)

__all__ = ["Scheduler", "StudyCache", "attempt_assignment"]

log = logging.getLogger(__name__)

RESTART_ERROR = "controller restarted: the attempt's trainer belonged to the previous controller"
DEFAULT_UNSCHEDULABLE_AFTER_S = 600.0


class StudyCache:
    """Expanded studies of stored specs, computed once per experiment."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._studies: dict[str, list[Study]] = {}

    def get(self, experiment: ExperimentRecord) -> list[Study]:
        """The experiment's studies (batchlab.search.expand_studies of its stored spec)."""
        with self._lock:
            found = self._studies.get(experiment.id)
        if found is None:
            spec = json_format.ParseDict(dict(experiment.spec), experiment_pb2.ExperimentSpec())
            found = expand_studies(spec)
            with self._lock:
                self._studies[experiment.id] = found
        return found


def _check_stored_attempts(studies: Sequence[Study], attempts: Sequence[AttemptRecord]) -> None:
    """Refuse to go on with an experiment whose stored attempts are not the runs its spec asks
    for with this controller's code (e.g. it was upgraded mid-experiment and now derives other
    hyperparameters or seeds): their results would be mixed into its verdicts silently
    (batchlab.search.request_differences). Checked once per experiment and controller process.

    Raises:
      ValueError: naming the attempt and what differs (the scheduler fails the experiment).
    """
    by_id = {s.id: s for s in studies}
    for attempt in attempts:
        key = attempt.trial
        study = by_id.get(key.study_id)
        differing = (["its study is not in the spec"] if study is None else request_differences(
            study, {"trial_index": key.trial_index, "replica": key.replica, "seed": attempt.seed,
                    "kind": attempt.kind, "hyperparameters": attempt.hyperparameters},
            fields=("seed", "kind", "hyperparameters")))
        if differing:
            raise ValueError(
                f"stored attempt {attempt.attempt} of {key.name} is not the run the spec asks "
                f"for with this controller's code ({'; '.join(differing[:3])}); its results "
                "would be mixed into the verdicts: submit the experiment again")


def attempt_assignment(experiment_id: str, study: Study, attempt: AttemptRecord, *,
                       evaluation: controller_pb2.EvaluationMode = controller_pb2.EVALUATION_IN_PROCESS
                       ) -> controller_pb2.TrialAssignment:
    """The batchlab.v1.TrialAssignment a trainer runs for a stored attempt.

    Args:
      experiment_id: the experiment.
      study: the attempt's study.
      attempt: the stored attempt.
      evaluation: where its evaluation points are evaluated (an EvaluationMode).
    """
    key = attempt.trial
    # batchlab.targets' Goal and TargetReading carry the proto's numbers; the generated stubs
    # type the proto's enums as their own int subclasses, which plain ints are at run time.
    target = experiment_pb2.Target(
        metric=study.target.metric, value=study.target.value,
        goal=cast(common_pb2.Goal, int(study.target.goal)),
        reading=cast(experiment_pb2.TargetReading, int(study.target.reading)))
    resources = json_format.ParseDict(
        {k: v for k, v in dict(study.resources).items() if v}, experiment_pb2.Resources())
    return controller_pb2.TrialAssignment(
        trial=key.name, experiment_id=experiment_id, study_id=study.id,
        trial_index=key.trial_index, replica=key.replica, attempt=attempt.attempt,
        seed=attempt.seed, kind=attempt.kind, workload=study.workload,
        hyperparameters_json=json.dumps(dict(attempt.hyperparameters), sort_keys=True),
        batch_size=study.batch_size, step_budget=study.step_budget,
        eval_every_steps=study.eval_every_steps, target=target, resources=resources,
        evaluation=evaluation, stop_at_target=study.stop_at_target)


class Scheduler:
    """Runs experiments from storage on a trainer pool.

    Args:
      storage: the controller's storage.
      pool: the trainers.
      studies: a shared StudyCache (the servicer uses the same one).
      parallelism: runs of one study in flight at once (default: the pool's size).
      interval_s: time between ticks when nothing happens.
      metrics: batchlab.rpc.metrics ControllerMetrics, or None.
      metrics_interval_s: the least time between two refreshes of the gauges (they read
        the whole storage).
      evaluations: the EvaluationDriver when the evaluation service evaluates (None: the
        trainers evaluate in their own process).
      unschedulable_after_s: how long a run may wait for resources no node of the cluster
        provides before it fails as unschedulable.
      clock: unix seconds (tests pass a fake).
    """

    def __init__(self, storage: ExperimentStorage, pool: TrainerPool, *,
                 studies: StudyCache | None = None, parallelism: int | None = None,
                 interval_s: float = 0.2, metrics: Any = None,
                 metrics_interval_s: float = 1.0, evaluations: Any = None,
                 unschedulable_after_s: float = DEFAULT_UNSCHEDULABLE_AFTER_S,
                 clock: Any = time.time):
        self.storage = storage
        self.pool = pool
        self.studies = studies or StudyCache()
        self.parallelism = parallelism or pool.size
        self.interval_s = interval_s
        self.metrics = metrics
        self.metrics_interval_s = metrics_interval_s
        self.evaluations = evaluations
        self.unschedulable_after_s = unschedulable_after_s
        self._clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scores: dict[tuple[str, str], tuple[int, str]] = {}
        self._queued_since: dict[int, float] = {}
        self._pending: dict[int, str] = {}  # attempt id -> the pending reason stored
        self._checked: set[str] = set()  # experiments whose stored attempts were checked
        self._metrics_updated = -float("inf")

    @property
    def evaluation_mode(self) -> controller_pb2.EvaluationMode:
        """Where trainers' evaluation points are evaluated (a batchlab.v1.EvaluationMode)."""
        return (controller_pb2.EVALUATION_SERVICE if self.evaluations is not None
                else controller_pb2.EVALUATION_IN_PROCESS)

    # -- lifecycle --------------------------------------------------------------------------
    def recover(self) -> list[AttemptRecord]:
        """Complete as FAILED the attempts a dead controller left ACTIVE (retried later,
        not counted toward max_attempts). EVALUATING ones stay: their evaluations resume."""
        failed = self.storage.fail_active_attempts(RESTART_ERROR, failure=Failure.CONTROLLER)
        for attempt in failed:
            log.warning("%s attempt %d was ACTIVE under the previous controller: FAILED, "
                        "will be retried", attempt.trial.name, attempt.attempt)
        return failed

    def start(self) -> None:
        """Recover, then tick in a background thread until `stop`."""
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop ticking, wait for the thread, and retire the trainers."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.pool.close()

    def wake(self) -> None:
        """Tick now (a submission, a cancellation or an evaluation happened)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - keep scheduling; the error is logged
                log.exception("scheduler tick failed")
            if self._wake.is_set():
                continue  # something changed during the tick: plan again now
            if self.pool.running():
                # Wake up as soon as an attempt ends (or after the interval).
                self._record_finished(self.pool.poll(timeout=self.interval_s))
            else:
                self._wake.wait(self.interval_s)

    # -- one tick ---------------------------------------------------------------------------
    def tick(self, wait_s: float = 0.0) -> None:
        """One round: collect, plan, dispatch, stop what should stop.

        Args:
          wait_s: how long to wait for a finished attempt first.
        """
        self._record_finished(self.pool.poll(timeout=wait_s))
        active = self.storage.experiments_in([ExperimentState.PENDING, ExperimentState.RUNNING])
        for experiment in active:
            try:
                self._complete_evaluated(experiment)
                self._plan(experiment)
            except Exception as error:  # noqa: BLE001 - one bad experiment must not stop others
                log.exception("experiment %s failed", experiment.id)
                self._fail(experiment, f"{type(error).__name__}: {error}")
        self._dispatch()
        self._stop_ended()
        self._update_metrics()

    def _record_finished(self, finished: Sequence[Finished]) -> None:
        for item in finished:
            d = item.dispatch
            if item.result is not None:
                outcome = str(item.result.get("outcome", "FAILED"))
                error = item.result.get("error") or ""
                failure = ""
                if outcome == "FAILED":
                    failure = (Failure.INFRASTRUCTURE
                               if item.result.get("failure") == "infrastructure"
                               else Failure.RUN)
                if (self.evaluations is not None and outcome in ("SUCCEEDED", "DIVERGED")
                        and item.result.get("curve")):
                    # Trained: the outcome waits for the evaluations of its points.
                    changed = self.storage.finish_training(d.attempt_id, item.result)
                    log.info("%s attempt %d trained on %s (%s); %s", d.trial, d.attempt,
                             d.lease.worker, outcome, "waiting for its evaluations" if changed
                             else "its experiment has ended: not evaluated")
                    if changed:
                        self._end_trial_metrics(d.experiment_id, d.trial)
                    if self.evaluations is not None:
                        self.evaluations.wake()
                    continue
                changed = self.storage.complete_attempt(d.attempt_id, outcome,
                                                        result=item.result, error=error,
                                                        failure=failure)
            else:
                outcome = "FAILED"
                changed = self.storage.complete_attempt(d.attempt_id, outcome, error=item.error,
                                                        failure=item.failure)
            log.info("%s attempt %d ended %s on %s%s", d.trial, d.attempt, outcome,
                     d.lease.worker, f" ({item.error})" if item.error else "")
            if not changed:
                log.warning("%s attempt %d was completed already; result ignored", d.trial,
                            d.attempt)
            else:
                self._count_outcome(d.experiment_id, outcome)
                self._end_trial_metrics(d.experiment_id, d.trial)
        if finished:
            self._wake.set()

    def _count_outcome(self, experiment_id: str, outcome: str) -> None:
        if self.metrics is None:
            return
        self.metrics.runs_finished.labels(experiment=experiment_id, outcome=outcome).inc()
        if outcome == "DIVERGED":
            self.metrics.divergences.labels(experiment=experiment_id).inc()

    def _end_trial_metrics(self, experiment_id: str, trial: str) -> None:
        if self.metrics is not None:
            study, trial_label = _labels(trial)
            self.metrics.end_trial(experiment_id, study, trial_label)

    def _complete_evaluated(self, experiment: ExperimentRecord) -> None:
        """Complete the experiment's EVALUATING attempts whose evaluations are all in, and,
        with evaluation by the service, the attempts of stop_at_target studies whose
        evaluations met the target (ACTIVE ones: their trainers are stopped)."""
        states = [AttemptState.EVALUATING]
        if self.evaluations is not None:
            states.append(AttemptState.ACTIVE)
        evaluating = self.storage.attempts(experiment.id, states=states)
        if not evaluating:
            return
        studies = {s.id: s for s in self.studies.get(experiment)}
        failed = (self.evaluations.failed if self.evaluations is not None
                  else (lambda trial, step: None))
        for attempt in evaluating:
            study = studies[attempt.trial.study_id]
            # Read once: the target check and the full result must see the same evaluations.
            points = self.storage.trial_points(attempt.trial)
            if self._complete_at_target(experiment, attempt, study, points):
                continue
            if attempt.state is not AttemptState.EVALUATING:
                continue
            found = evaluated_result(attempt, study, points, failed)
            if found.missing:
                # Saved and uploaded by an attempt that died before reporting the point: the
                # resumed attempt's curve has it, so it is evaluated now.
                curve = {int(p["step"]): p for p in (attempt.result or {}).get("curve", [])}
                self.storage.add_points([
                    PointRecord(attempt.trial, attempt.attempt, step,
                                {k: v for k, v in curve[step].items() if k != "step"},
                                awaiting_evaluation=True) for step in found.missing])
                if self.evaluations is not None:
                    self.evaluations.wake()
                continue
            if found.failed:
                error = "; ".join(found.failed[s] for s in sorted(found.failed))
                changed = self.storage.complete_attempt(
                    attempt.id, "FAILED", error=error, failure=Failure.INFRASTRUCTURE,
                    expected=[AttemptState.EVALUATING])
                outcome = "FAILED"
            elif found.result is not None:
                outcome = str(found.result.get("outcome"))
                changed = self.storage.complete_attempt(
                    attempt.id, outcome, result=found.result,
                    expected=[AttemptState.EVALUATING])
            else:
                continue  # evaluations still to come
            if changed:
                log.info("%s attempt %d ended %s (evaluated by the evaluation service)",
                         attempt.trial.name, attempt.attempt, outcome)
                self._count_outcome(experiment.id, outcome)
                # The evaluation metrics exported since training ended go too.
                self._end_trial_metrics(experiment.id, attempt.trial.name)
                self._wake.set()

    def _complete_at_target(self, experiment: ExperimentRecord, attempt: AttemptRecord,
                            study: Study, points: Sequence[PointRecord]) -> bool:
        """End a stop_at_target attempt at its first evaluation meeting the target, as the
        training loop does in process (services.controller.evaluations.target_result), and
        stop its trainer if it still trains; returns whether the attempt was completed."""
        result = target_result(attempt, study, points)
        if result is None:
            return False
        if not self.storage.complete_attempt(
                attempt.id, "SUCCEEDED", result=result,
                expected=[AttemptState.ACTIVE, AttemptState.EVALUATING]):
            return False
        log.info("%s attempt %d ended SUCCEEDED at step %d: the evaluation service's numbers "
                 "met the target (stop_at_target)", attempt.trial.name, attempt.attempt,
                 result["steps_completed"])
        if attempt.state is AttemptState.ACTIVE:
            # Its result arrives later as CANCELLED and is ignored (completed already).
            for dispatch in self.pool.running():
                if dispatch.attempt_id == attempt.id:
                    self.pool.stop(dispatch)
        self._count_outcome(experiment.id, "SUCCEEDED")
        self._end_trial_metrics(experiment.id, attempt.trial.name)
        self._wake.set()
        return True

    def _plan(self, experiment: ExperimentRecord) -> None:
        if self.metrics is not None:
            # Counters that first appear already incremented lose those increments in
            # Prometheus' increase(): create the experiment's series at zero up front.
            self.metrics.divergences.labels(experiment=experiment.id)
            for outcome in ("SUCCEEDED", "DIVERGED", "FAILED", "CANCELLED"):
                self.metrics.runs_finished.labels(experiment=experiment.id, outcome=outcome)
        studies = self.studies.get(experiment)
        attempts = self.storage.attempts(experiment.id)
        by_study: dict[str, list[AttemptRecord]] = {s.id: [] for s in studies}
        numbers: dict[TrialKey, int] = {}
        for attempt in attempts:
            by_study.setdefault(attempt.trial.study_id, []).append(attempt)
            numbers[attempt.trial] = max(numbers.get(attempt.trial, 0), attempt.attempt)
        if experiment.id not in self._checked:
            _check_stored_attempts(studies, attempts)
            self._checked.add(experiment.id)
        new: list[NewAttempt] = []
        all_done = True
        unfilled: list[str] = []
        for study in studies:
            mine = by_study[study.id]
            # An attempt lost with the controller is not the run's nor the cluster's doing:
            # the protocol does not see it, so it does not count toward max_attempts.
            records = [r for r in (run_record(a) for a in mine if a.counted) if r is not None]
            in_flight = [(a.trial.trial_index, a.seed) for a in mine
                         if a.state is not AttemptState.COMPLETED]
            decision = next_runs(study, records, in_flight=in_flight,
                                 parallelism=self.parallelism)
            for request in decision.launch:
                key = TrialKey(experiment.id, study.id, request.trial_index, request.replica)
                new.append(NewAttempt(
                    key, seed=request.seed, kind=str(request.kind),
                    # The protocol numbers counted attempts; stored numbers stay unique.
                    attempt=max(request.attempt, numbers.get(key, 0) + 1),
                    hyperparameters=request.hyperparameters))
            self._store_score(experiment.id, study, records, decision.phase.value,
                              decision.best_trial)
            all_done = all_done and decision.done and not in_flight
            if decision.done:
                unfilled += unfilled_runs(study, decision.state)
        if new:
            try:
                stored = self.storage.add_attempts(new)
            except StorageError:
                ended = self.storage.get_experiment(experiment.id)
                if ended is None or not ended.terminal:
                    raise
                # Cancelled (or failed) since this round read it: nothing more to queue.
                log.info("experiment %s ended %s while its next runs were planned",
                         experiment.id, ended.state.value)
                return
            now = time.monotonic()
            for attempt in stored:
                self._queued_since[attempt.id] = now
                log.info("queued %s attempt %d (%s)", attempt.trial.name, attempt.attempt,
                         attempt.kind)
        if all_done:
            self._finish(experiment, attempts, unfilled)

    def _store_score(self, experiment_id: str, study: Study, records: list[RunRecord], phase: str,
                     best_trial: int | None) -> None:
        marker = (len(records), phase)
        if self._scores.get((experiment_id, study.id)) == marker:
            return
        score = score_study(study, records)
        self.storage.put_study(experiment_id, StudyRecord(study.id, phase, best_trial,
                                                          score.to_dict()))
        self._scores[(experiment_id, study.id)] = marker

    def _finish(self, experiment: ExperimentRecord, attempts: Sequence[AttemptRecord],
                unfilled: Sequence[str]) -> None:
        results = [a for a in attempts if a.outcome in ("SUCCEEDED", "DIVERGED")]
        if attempts and not results:
            last = next((a.error for a in reversed(attempts) if a.error), "")
            self._fail(experiment, f"every run failed; last error: {last}")
            return
        # Runs abandoned after max_attempts failures left a study short of the effort the
        # protocol budgets (batchlab.search.unfilled_runs): the comparison is not on equal
        # budgets, so the experiment FAILS (as Ray Tune ends with an error when a trial
        # errored), naming what is missing; its stored runs and scores stay readable
        # (GetReport, ListTrials). An abandoned tuning trial the protocol replaced is not
        # missing. batchlab local run applies the same rule.
        if unfilled:
            ended = {a.trial for a in results}
            last = next((a.error for a in reversed(attempts)
                         if a.error and a.trial not in ended), "")
            self._fail(experiment, f"runs were abandoned and the studies' budgets are not "
                                   f"equal: missing {'; '.join(unfilled)}; last error: {last}")
            return
        if self.storage.set_experiment_state(experiment.id, ExperimentState.SUCCEEDED,
                                             expected=[ExperimentState.PENDING,
                                                       ExperimentState.RUNNING]):
            log.info("experiment %s SUCCEEDED", experiment.id)

    def _fail(self, experiment: ExperimentRecord, error: str) -> None:
        changed, _ = self.storage.end_experiment(
            experiment.id, ExperimentState.FAILED, error=error,
            expected=[ExperimentState.PENDING, ExperimentState.RUNNING],
            cancel_error="experiment failed")
        if changed:
            log.error("experiment %s FAILED: %s", experiment.id, error)

    def _set_pending(self, attempt: AttemptRecord, reason: str, *, permanent: bool = True) -> None:
        if self._pending.get(attempt.id, attempt.pending_reason) != reason:
            self.storage.set_pending_reason(attempt.id, reason, permanent=permanent)
            if reason:
                log.warning("%s attempt %d cannot be placed: %s", attempt.trial.name,
                            attempt.attempt, reason)
        if reason:
            self._pending[attempt.id] = reason
        else:
            self._pending.pop(attempt.id, None)

    def _dispatch(self) -> None:
        waiting = self.storage.experiments_in([ExperimentState.PENDING, ExperimentState.RUNNING])
        demands: list[tuple[dict[str, Any], int]] = []
        free = True
        for experiment in waiting:
            queued = self.storage.attempts(experiment.id, states=[AttemptState.QUEUED])
            if not queued:
                continue
            studies = {s.id: s for s in self.studies.get(experiment)}
            for attempt in queued:
                study = studies[attempt.trial.study_id]
                resources = dict(study.resources)
                hosts = int(resources.get("num_hosts") or 1)
                refused = self.pool.placement(resources, hosts)
                if refused is not None:
                    self._set_pending(attempt, refused.reason, permanent=refused.permanent)
                    if refused.permanent:
                        demands.append((resources, hosts))
                        self._unschedulable(experiment, attempt, refused.reason)
                    break  # the experiment's other runs ask for the same resources
                if not free:
                    # The cluster can hold it now: whatever refused it before no longer
                    # does, so the unschedulable clock stops (it waits for a trainer).
                    self._set_pending(attempt, "")
                    continue
                lease = self.pool.acquire(resources, hosts)
                if lease is None:
                    free = False  # no trainer free: the rest wait, oldest first
                    self._set_pending(attempt, "")
                    continue
                if not self.storage.activate_attempt(attempt.id, lease.worker):
                    self.pool.release(lease)
                    continue
                self._set_pending(attempt, "")
                if self.storage.set_experiment_state(experiment.id, ExperimentState.RUNNING,
                                                     expected=[ExperimentState.PENDING]):
                    log.info("experiment %s RUNNING", experiment.id)
                try:
                    self.pool.start(lease, attempt.id, experiment.id, attempt_assignment(
                        experiment.id, study, attempt, evaluation=self.evaluation_mode))
                except Exception as error:  # noqa: BLE001 - the attempt fails; retried later
                    log.exception("starting %s attempt %d failed", attempt.trial.name,
                                  attempt.attempt)
                    self.pool.release(lease)
                    self.storage.complete_attempt(attempt.id, "FAILED",
                                                  error=f"could not start: {error}",
                                                  failure=Failure.INFRASTRUCTURE)
                    continue
                queued_at = self._queued_since.pop(attempt.id, None)
                if self.metrics is not None and queued_at is not None:
                    self.metrics.scheduling_latency.observe(time.monotonic() - queued_at)
        self.pool.request_capacity(demands)

    def _unschedulable(self, experiment: ExperimentRecord, attempt: AttemptRecord,
                       reason: str) -> None:
        """Fail the run (and its experiment) once its resources were missing for too long."""
        stored = self.storage.get_attempt(attempt.trial, attempt.attempt)
        since = stored.pending_since if stored is not None else None
        if since is None or self._clock() - since < self.unschedulable_after_s:
            return
        error = (f"unschedulable: {reason}; waited {self._clock() - since:.0f} s "
                 f"(BATCHLAB_UNSCHEDULABLE_TIMEOUT_SECONDS is {self.unschedulable_after_s:g})")
        if self.storage.complete_attempt(attempt.id, "FAILED", error=error,
                                         failure=Failure.UNSCHEDULABLE,
                                         expected=[AttemptState.QUEUED]):
            self._pending.pop(attempt.id, None)
            self._count_outcome(experiment.id, "FAILED")
            self._fail(experiment, error)

    def _stop_ended(self) -> None:
        for dispatch in self.pool.running():
            if dispatch.stop_requested:
                continue
            experiment = self.storage.get_experiment(dispatch.experiment_id)
            if experiment is None or experiment.terminal:
                self.pool.stop(dispatch)

    def _update_metrics(self) -> None:
        if (self.metrics is None or
                time.monotonic() - self._metrics_updated < self.metrics_interval_s):
            return
        self._metrics_updated = time.monotonic()
        counts = self.pool.counts()
        for state, n in counts.items():
            self.metrics.trainers.labels(state=state).set(n)
        queued = 0
        by_state: dict[str, int] = {s.value: 0 for s in ExperimentState}
        for experiment in self.storage.experiments_in(list(ExperimentState)):
            by_state[experiment.state.value] += 1
        for state, n in by_state.items():
            self.metrics.experiments.labels(state=state).set(n)
        for experiment in self.storage.experiments_in([ExperimentState.PENDING,
                                                       ExperimentState.RUNNING]):
            attempts = self.storage.attempts(experiment.id)
            queued += sum(1 for a in attempts if a.state is AttemptState.QUEUED)
            self.metrics.set_trial_counts(experiment.id, trial_state_counts(attempts))
        self.metrics.queue_depth.set(queued)


def latest_attempts(attempts: Sequence[AttemptRecord]) -> list[AttemptRecord]:
    """The latest attempt of each trial (study, trial index, replica), in creation order."""
    latest: dict[TrialKey, AttemptRecord] = {}
    first: dict[TrialKey, int] = {}
    for attempt in attempts:
        first.setdefault(attempt.trial, attempt.id)
        current = latest.get(attempt.trial)
        if current is None or attempt.attempt > current.attempt:
            latest[attempt.trial] = attempt
    return sorted(latest.values(), key=lambda a: first[a.trial])


def trial_state_counts(attempts: Sequence[AttemptRecord]) -> Mapping[tuple[str, str], int]:
    """Trials by (state, outcome) for the `batchlab_trials` gauge; outcome "none" if open."""
    counts: dict[tuple[str, str], int] = {}
    for attempt in latest_attempts(attempts):
        key = (attempt.state.value, attempt.outcome or "none")
        counts[key] = counts.get(key, 0) + 1
    return counts


def _labels(trial: str) -> tuple[str, str]:
    """(study, trial) labels of a trial resource name."""
    parts = trial.split("/")
    return (parts[3], parts[5]) if len(parts) >= 6 else ("", trial)
