"""Placement, attempts and evaluation by the service, on the scheduler with a fake pool.

  - A run the cluster cannot hold stays QUEUED (its experiment PENDING) with the reason,
    is never started, and fails as UNSCHEDULABLE after the timeout, failing its experiment;
    waiting for a Ray connection is shown too, but never fails anything.
  - Attempts lost with the controller do not count toward max_attempts; the run's own
    failures do; failures are told apart in storage and in the API.
  - With the evaluation service, a trained attempt waits (EVALUATING) for its points'
    evaluations, and its curve, final metrics and steps-to-target are the evaluator's.
"""

from __future__ import annotations

import math
import sqlite3
import subprocess

import pytest
from controller_fakes import FakePool, LostWorker, fake_result, spec_dict
from fake_context import FakeContext

from batchlab.proto.v1 import controller_pb2
from services.controller.pool import Dispatch, Finished, Lease, Placement, RayTrainerPool
from services.controller.scheduler import Scheduler
from services.controller.servicer import ExperimentServicer
from services.controller.storage import (
    AttemptState,
    ExperimentState,
    Failure,
    InMemoryStorage,
    SQLiteStorage,
)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class PlacingPool(FakePool):
    """A FakePool whose cluster cannot hold what `refused` says."""

    def __init__(self, refused=None, **kwargs):
        super().__init__(**kwargs)
        self.refused = refused
        self.requested = []

    def placement(self, resources, hosts=1):
        return self.refused or super().placement(resources, hosts)

    def request_capacity(self, demands):
        self.requested.append(list(demands))


def _ticks(scheduler, n=5):
    for _ in range(n):
        scheduler.tick()


def test_a_run_the_cluster_cannot_hold_waits_with_its_reason_then_fails_unschedulable():
    clock = Clock()
    storage = InMemoryStorage(clock=clock)
    reason = "needs 1 host with CPU 1, GPU 99 each; the Ray cluster's 1 node cannot hold that"
    pool = PlacingPool(Placement(reason, permanent=True))
    scheduler = Scheduler(storage, pool, unschedulable_after_s=60, clock=clock)
    storage.create_experiment("e1", "", spec_dict(resources={"gpus": 99}))
    servicer = ExperimentServicer(storage, studies=scheduler.studies)
    _ticks(scheduler)
    experiment = servicer.GetExperiment(controller_pb2.GetExperimentRequest(name="experiments/e1"),
                                        FakeContext())
    assert experiment.state == controller_pb2.Experiment.PENDING
    assert experiment.pending_reason == reason
    assert experiment.trial_counts.pending == 2
    assert not pool.started
    assert pool.requested[-1] == [({"gpus": 99}, 1)]  # the autoscaler is asked
    clock.now += 61
    _ticks(scheduler, 2)
    record = storage.get_experiment("e1")
    assert record.state is ExperimentState.FAILED
    assert record.error.startswith(f"unschedulable: {reason}; waited 61 s")
    attempts = storage.attempts("e1")
    assert {(a.outcome, a.failure) for a in attempts} >= {("FAILED", Failure.UNSCHEDULABLE)}
    assert all(a.state is AttemptState.COMPLETED and not a.worker for a in attempts)
    assert not pool.started


@pytest.mark.parametrize("storage_kind", ["memory", "sqlite"])
def test_a_controller_restart_does_not_reset_the_unschedulable_clock(storage_kind, tmp_path):
    """The restarted controller first finds Ray out of reach (a passing reason), then the same
    permanent refusal: the wait counts from the first permanent refusal, not from the restart."""
    clock = Clock()
    storage = InMemoryStorage(clock=clock) if storage_kind == "memory" else SQLiteStorage(
        tmp_path, clock=clock)
    reason = "needs 1 host with CPU 1, GPU 99 each; the Ray cluster's 1 node cannot hold that"
    storage.create_experiment("e1", "", spec_dict(resources={"gpus": 99}))
    _ticks(Scheduler(storage, PlacingPool(Placement(reason, permanent=True)),
                     unschedulable_after_s=60, clock=clock))
    clock.now += 40
    away = PlacingPool(Placement("waiting for the Ray cluster (connection refused)", False))
    restarted = Scheduler(storage, away, unschedulable_after_s=60, clock=clock)
    _ticks(restarted)
    clock.now += 10
    away.refused = Placement(reason, permanent=True)
    _ticks(restarted)
    assert storage.get_experiment("e1").state is ExperimentState.PENDING  # 50 s < 60 s
    clock.now += 11
    _ticks(restarted, 2)
    record = storage.get_experiment("e1")
    assert record.state is ExperimentState.FAILED
    assert record.error.startswith(f"unschedulable: {reason}; waited 61 s")


def test_waiting_for_the_ray_cluster_is_shown_and_never_fails_the_run():
    clock = Clock()
    storage = InMemoryStorage(clock=clock)
    pool = PlacingPool(Placement("waiting for the Ray cluster (connection refused)", False))
    scheduler = Scheduler(storage, pool, unschedulable_after_s=1, clock=clock)
    storage.create_experiment("e1", "", spec_dict())
    _ticks(scheduler)
    clock.now += 3600
    _ticks(scheduler)
    assert storage.get_experiment("e1").state is ExperimentState.PENDING
    (first, *_) = storage.attempts("e1")
    assert first.pending_reason.startswith("waiting for the Ray cluster")
    assert pool.requested[-1] == []  # nothing for the autoscaler: the cluster is away
    pool.refused = None
    _ticks(scheduler, 30)
    assert storage.get_experiment("e1").state is ExperimentState.SUCCEEDED
    assert all(not a.pending_reason for a in storage.attempts("e1"))


def test_attempts_lost_with_the_controller_do_not_count_toward_max_attempts():
    lost = {"left": 2}

    class ControllerLossPool(FakePool):
        def poll(self, timeout=0.0):
            finished = []
            for item in super().poll(timeout):
                if item.dispatch.refs[0]["trial_index"] == 0 and lost["left"]:
                    lost["left"] -= 1
                    item = Finished(item.dispatch, None, "the controller lost its Ray cluster",
                                    lost=True, failure=Failure.CONTROLLER)
                finished.append(item)
            return finished

    storage = InMemoryStorage()
    storage.create_experiment("e1", "", spec_dict(max_attempts=1))
    scheduler = Scheduler(storage, ControllerLossPool())
    _ticks(scheduler, 40)
    assert storage.get_experiment("e1").state is ExperimentState.SUCCEEDED
    trial0 = [a for a in storage.attempts("e1") if (a.trial.trial_index, a.trial.replica) == (0, 0)]
    assert [(a.attempt, a.outcome, a.failure, a.counted) for a in trial0] == [
        (1, "FAILED", Failure.CONTROLLER, False), (2, "FAILED", Failure.CONTROLLER, False),
        (3, "SUCCEEDED", "", True)]
    trials = ExperimentServicer(storage, studies=scheduler.studies).ListTrials(
        controller_pb2.ListTrialsRequest(parent="experiments/e1"), FakeContext()).trials
    (trial,) = [t for t in trials if t.name.endswith("/0-r0")]
    assert [(a.failure, a.counted) for a in trial.attempts] == [
        (controller_pb2.FAILURE_CONTROLLER, False), (controller_pb2.FAILURE_CONTROLLER, False),
        (controller_pb2.FAILURE_UNSPECIFIED, True)]


def test_the_runs_own_failures_and_lost_trainers_count_and_are_told_apart():
    def run(request):
        if request["trial_index"] == 0:
            raise LostWorker("node lost")
        if request["trial_index"] == 1:
            return {**fake_result(request), "outcome": "FAILED", "error": "ValueError: nan",
                    "failure": "run"}
        return fake_result(request)

    storage = InMemoryStorage()
    storage.create_experiment("e1", "", spec_dict(max_attempts=1, max_total_trials=3))
    _ticks(Scheduler(storage, FakePool(run=run)), 40)
    failures = {a.trial.trial_index: a.failure for a in storage.attempts("e1")
                if a.outcome == "FAILED"}
    assert failures == {0: Failure.INFRASTRUCTURE, 1: Failure.RUN}
    # One attempt each: both counted, so neither was retried.
    assert {a.trial.trial_index: a.attempt for a in storage.attempts("e1")
            if a.trial.trial_index in (0, 1)} == {0: 1, 1: 1}


class FakeEvaluations:
    """What the scheduler needs of an EvaluationDriver; the test plays the evaluator."""

    def __init__(self):
        self.failures = {}
        self.woken = 0

    def wake(self):
        self.woken += 1

    def failed(self, trial, step):
        return self.failures.get((trial, step))


def _trained_only(request):
    """A RunResult as a trainer evaluating by the service returns it: training metrics only."""
    result = fake_result(request)
    for point in result["curve"]:
        for key in [k for k in point if k.startswith(("validation/", "train/"))
                    and k != "train/batch_loss"]:
            del point[key]
    result["final_metrics"] = dict(result["curve"][-1])
    result["steps_to_target"] = None
    return result


def test_a_trained_attempt_waits_for_its_evaluations_and_takes_the_evaluators_numbers():
    storage = InMemoryStorage()
    evaluations = FakeEvaluations()
    storage.create_experiment("e1", "", spec_dict(trials_per_study=1, max_total_trials=1,
                                                   seeds_per_best=0))
    pool = FakePool(run=_trained_only)
    scheduler = Scheduler(storage, pool, evaluations=evaluations)
    _ticks(scheduler, 3)
    (attempt,) = storage.attempts("e1")
    assert pool.started[0]["evaluation"] == controller_pb2.EVALUATION_SERVICE
    assert attempt.state is AttemptState.EVALUATING
    # The trainer never reported (it died after uploading, say): the points are added.
    awaiting = storage.awaiting_points("e1")
    assert [p.step for p in awaiting] == [10, 20] and evaluations.woken
    storage.record_evaluation(attempt.trial, 10, {"validation/accuracy": 0.2,
                                                  "train/accuracy": 0.25})
    _ticks(scheduler, 2)
    assert storage.attempts("e1")[0].state is AttemptState.EVALUATING  # 20 still to come
    storage.record_evaluation(attempt.trial, 20, {"validation/accuracy": 0.4,
                                                  "train/accuracy": 0.5})
    _ticks(scheduler, 3)
    (attempt,) = storage.attempts("e1")
    assert (attempt.state, attempt.outcome) == (AttemptState.COMPLETED, "SUCCEEDED")
    curve = attempt.result["curve"]
    assert [(p["step"], p["validation/accuracy"]) for p in curve] == [(10, 0.2), (20, 0.4)]
    assert attempt.result["final_metrics"]["validation/accuracy"] == 0.4
    assert attempt.result["steps_to_target"] == 20  # the target is 0.3
    assert storage.get_experiment("e1").state is ExperimentState.SUCCEEDED
    (study,) = storage.studies("e1").values()
    assert study.score["seeds"]["metric"]["median"] == 0.4


def test_an_evaluation_that_failed_for_good_fails_its_attempt_as_infrastructure():
    storage = InMemoryStorage()
    evaluations = FakeEvaluations()
    storage.create_experiment("e1", "", spec_dict(trials_per_study=1, max_total_trials=1,
                                                   seeds_per_best=0, max_attempts=1))
    scheduler = Scheduler(storage, FakePool(run=_trained_only), evaluations=evaluations)
    _ticks(scheduler, 3)
    (attempt,) = storage.attempts("e1")
    evaluations.failures[(attempt.trial, 10)] = "evaluation of step 10 failed: DATA_LOSS: x"
    storage.record_evaluation(attempt.trial, 20, {"validation/accuracy": 0.4})
    _ticks(scheduler, 3)
    (attempt,) = storage.attempts("e1")
    assert (attempt.outcome, attempt.failure) == ("FAILED", Failure.INFRASTRUCTURE)
    assert "DATA_LOSS" in attempt.error


def test_cancelling_ends_attempts_waiting_for_evaluations():
    storage = InMemoryStorage()
    storage.create_experiment("e1", "", spec_dict(trials_per_study=1, max_total_trials=1,
                                                  seeds_per_best=0))
    scheduler = Scheduler(storage, FakePool(run=_trained_only), evaluations=FakeEvaluations())
    _ticks(scheduler, 3)
    servicer = ExperimentServicer(storage, studies=scheduler.studies, scheduler=scheduler)
    servicer.CancelExperiment(controller_pb2.CancelExperimentRequest(name="experiments/e1"),
                              FakeContext())
    (attempt,) = storage.attempts("e1")
    assert (attempt.state, attempt.outcome) == (AttemptState.COMPLETED, "CANCELLED")


def test_a_lost_ray_connection_ends_running_attempts_as_the_controllers():
    pool = RayTrainerPool(2, connected=True)
    lease = Lease(["t-0"], (), [None])
    pool._dispatches["ref"] = Dispatch(7, "e1", "experiments/e1/studies/s/trials/0-r0", 1,  # noqa: SLF001 - no Ray here
                                       lease, ["ref"], 0.0)
    pool.connection_lost("ConnectionError: Ray Client is not connected")
    (finished,) = pool.poll()
    assert (finished.dispatch.attempt_id, finished.failure) == (7, Failure.CONTROLLER)
    assert "lost its Ray cluster" in finished.error
    assert pool.running() == [] and pool.acquire({}, 1) is None
    refused = pool.placement({"cpus": 1}, 1)
    assert not refused.permanent and "waiting for the Ray cluster" in refused.reason
    assert pool.placement({}, 3).permanent  # more hosts than trainers: never placeable


def test_placement_counts_hosts_on_the_nodes_that_can_hold_them():
    from services.controller.pool import host_demand, hosts_that_fit

    nodes = [{"CPU": 8.0, "GPU": 8.0}, {"CPU": 4.0}]
    assert hosts_that_fit(host_demand({"cpus": 1, "gpus": 8}), nodes) == 1
    assert hosts_that_fit(host_demand({"cpus": 1, "gpus": 1}), nodes) == 8
    assert hosts_that_fit(host_demand({"cpus": 2}), nodes) == 6
    assert hosts_that_fit(host_demand({"gpus": 99}), nodes) == 0
    assert hosts_that_fit(host_demand({"memory_gib": 1}), [{"CPU": 4, "memory": 2**30}]) == 1


def test_each_host_of_a_multi_host_run_asks_for_its_share_of_the_accelerators():
    """gpus and tpus count the run, cpus and memory the host (experiment.proto, Resources): a
    32-host run of 128 TPU chips fits the 32 pods of a 4-chip-per-host slice, not fewer."""
    from services.controller.pool import host_demand, hosts_that_fit, resource_shape

    run = {"cpus": 8, "tpus": 128, "num_hosts": 32, "memory_gib": 16}
    assert host_demand(run) == {"CPU": 8.0, "TPU": 4.0, "memory": 16 * 2**30}
    assert resource_shape(run) == (("cpus", 8), ("memory_gib", 16), ("tpus", 4))
    slice_hosts = [{"CPU": 8.0, "TPU": 4.0, "memory": 32 * 2**30}] * 32
    assert hosts_that_fit(host_demand(run), slice_hosts) == 32
    assert hosts_that_fit(host_demand(run), slice_hosts[:31]) == 31  # one short of the run
    assert host_demand({"gpus": 16, "num_hosts": 2}) == {"CPU": 1.0, "GPU": 8.0}
    with pytest.raises(ValueError, match=r"resources\.gpus"):
        host_demand({"gpus": 3, "num_hosts": 2})


def test_a_pool_sized_for_many_hosts_keeps_only_its_warm_trainers_started():
    """The tpu overlay's pool must hold a 128-host run but warm only a few trainers."""
    from services.controller.server import ControllerConfig, StartupError

    env = {"BATCHLAB_EVALUATION": "in-process", "BATCHLAB_NUM_TRAINERS": "136",
           "BATCHLAB_WARM_TRAINERS": "8"}
    config = ControllerConfig.from_env(env)
    assert (config.num_trainers, config.warm_trainers) == (136, 8)
    assert ControllerConfig.from_env({"BATCHLAB_EVALUATION": "in-process"}).warm_trainers is None
    with pytest.raises(StartupError, match="BATCHLAB_WARM_TRAINERS"):
        ControllerConfig.from_env({**env, "BATCHLAB_NUM_TRAINERS": "4"})
    with pytest.raises(ValueError, match="warm_size"):
        RayTrainerPool(4, connected=False, warm_size=5)


def test_a_version_1_database_is_upgraded_and_keeps_its_attempts(tmp_path):
    old = subprocess.run(["git", "show", "b6bbdae:services/controller/storage.py"],
                         capture_output=True, text=True, check=True).stdout
    namespace: dict = {}
    exec(old.split("_ATTEMPT_COLUMNS")[0].split("_SCHEMA = ", 1)[1].join(["_SCHEMA = ", ""]),  # noqa: S102
         namespace)
    path = tmp_path / SQLiteStorage.FILENAME
    conn = sqlite3.connect(path)
    conn.executescript(namespace["_SCHEMA"])
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO experiments (id, spec, state, create_time) VALUES ('e1', '{}', "
                 "'RUNNING', 1.0)")
    conn.execute("INSERT INTO attempts (experiment_id, study_id, trial_index, replica, seed, "
                 "attempt, kind, hyperparameters, state, create_time) VALUES ('e1', 's', 0, 0, "
                 "1, 1, 'tuning', '{}', 'ACTIVE', 1.0)")
    conn.commit()
    conn.close()
    storage = SQLiteStorage(tmp_path)
    (attempt,) = storage.fail_active_attempts("restart", failure=Failure.CONTROLLER)
    assert (attempt.failure, attempt.pending_reason) == ("", "")
    assert storage.attempts("e1")[0].failure == Failure.CONTROLLER
    assert storage.awaiting_points("e1") == []
    storage.close()
    assert math.isfinite(SQLiteStorage(tmp_path).attempts("e1")[0].end_time)


@pytest.mark.parametrize("make", [InMemoryStorage, "sqlite"])
def test_evaluations_merge_into_waiting_points_with_a_new_sequence_number(make, tmp_path):
    from services.controller.storage import NewAttempt, PointRecord, TrialKey

    storage = SQLiteStorage(tmp_path) if make == "sqlite" else make()
    storage.create_experiment("e1", "", {})
    key = TrialKey("e1", "s", 0, 0)
    storage.add_attempts([NewAttempt(key, 1, 1, "tuning", {}), NewAttempt(key, 1, 2, "tuning", {})])
    storage.add_points([PointRecord(key, 1, 10, {"train/batch_loss": 1.0},
                                    awaiting_evaluation=True),
                        PointRecord(key, 2, 10, {"train/batch_loss": 1.0},
                                    awaiting_evaluation=True),
                        PointRecord(key, 2, 20, {"train/batch_loss": 0.5})])
    before = max(p.seq for p in storage.points("e1"))
    assert storage.record_evaluation(key, 10, {"validation/accuracy": 0.5}) == 2
    assert storage.awaiting_points("e1") == []
    merged = [p for p in storage.points("e1", after_seq=before)]
    assert [(p.attempt, p.step, dict(p.values)) for p in merged] == [
        (1, 10, {"train/batch_loss": 1.0, "validation/accuracy": 0.5}),
        (2, 10, {"train/batch_loss": 1.0, "validation/accuracy": 0.5})]
    assert [p.step for p in storage.trial_points(key)] == [20, 10, 10]
    assert storage.record_evaluation(key, 10, {"validation/accuracy": 0.9}) == 0


class FakeEvaluatorStub:
    """Evaluate answers from a script: a metrics dict, or a status code to fail with."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests = []

    def Evaluate(self, request, timeout=None):
        import grpc

        from batchlab.proto.v1 import evaluation_pb2

        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, grpc.StatusCode):
            error = grpc.RpcError()
            error.code = lambda: answer
            error.details = lambda: f"{answer.name} from the fake"
            raise error
        step = answer.pop("_step", request.step)
        return evaluation_pb2.EvaluateResponse(step=step, metrics=answer)


def _awaiting_trial(storage, steps=(10,)):
    from services.controller.storage import NewAttempt, PointRecord, TrialKey

    storage.create_experiment("e1", "", spec_dict())
    scheduler = Scheduler(storage, FakePool())
    study = scheduler.studies.get(storage.get_experiment("e1"))[0]
    key = TrialKey("e1", study.id, 0, 0)
    storage.add_attempts([NewAttempt(key, 5, 1, "tuning", study.hyperparameters(0))])
    storage.add_points([PointRecord(key, 1, step, {"train/batch_loss": 1.0},
                                    awaiting_evaluation=True) for step in steps])
    return scheduler.studies, key, study


def test_the_driver_asks_for_each_point_exactly_and_stores_the_answer():
    from prometheus_client import CollectorRegistry

    from batchlab.rpc.metrics import make_metrics
    from services.controller.evaluations import EvaluationDriver

    storage = InMemoryStorage()
    studies, key, study = _awaiting_trial(storage, steps=(10, 20))
    stub = FakeEvaluatorStub({"validation/accuracy": 0.5}, {"validation/accuracy": 0.6})
    metrics = make_metrics(CollectorRegistry(), roles=["controller"]).controller
    woken = []
    driver = EvaluationDriver(storage, stub, studies, on_evaluated=lambda: woken.append(1),
                              metrics=metrics)
    assert driver.dispatch() == 2  # no executor: evaluated in this thread
    first = stub.requests[0]
    assert (first.trial, first.step, list(first.splits)) == (key.name, 10,
                                                             ["train", "validation"])
    assert (first.record_metric, first.maximize) == ("validation/accuracy", True)
    assert first.workload == study.workload and first.batch_size == study.batch_size
    assert storage.awaiting_points("e1") == [] and len(woken) == 2
    assert {p.step: p.values["validation/accuracy"] for p in storage.trial_points(key)} == {
        10: 0.5, 20: 0.6}
    assert metrics.eval_metric.labels(experiment="e1", study=study.id, trial="0-r0",
                                      metric="validation/accuracy")._value.get() == 0.6  # noqa: SLF001


def test_the_driver_retries_an_unavailable_evaluator_and_gives_up_on_a_corrupt_checkpoint():
    import grpc

    from services.controller.evaluations import EvaluationDriver

    clock = Clock()
    storage = InMemoryStorage()
    studies, key, _ = _awaiting_trial(storage)
    stub = FakeEvaluatorStub(grpc.StatusCode.UNAVAILABLE, {"validation/accuracy": 0.5})
    driver = EvaluationDriver(storage, stub, studies, backoff_s=5.0, clock=clock)
    driver.dispatch()
    assert driver.failed(key, 10) is None and storage.awaiting_points("e1")
    assert driver.dispatch() == 0  # backing off
    clock.now += 5
    assert driver.dispatch() == 1 and storage.awaiting_points("e1") == []

    storage = InMemoryStorage()
    studies, key, _ = _awaiting_trial(storage)
    driver = EvaluationDriver(storage, FakeEvaluatorStub(grpc.StatusCode.DATA_LOSS), studies)
    driver.dispatch()
    assert "DATA_LOSS" in driver.failed(key, 10)
    assert driver.dispatch() == 0  # not asked again

    storage = InMemoryStorage()
    studies, key, _ = _awaiting_trial(storage)
    stub = FakeEvaluatorStub({"_step": 5, "validation/accuracy": 0.5})
    driver = EvaluationDriver(storage, stub, studies)
    driver.dispatch()
    assert "evaluated step 5, not 10" in driver.failed(key, 10)


def test_an_evaluation_whose_deadline_passes_twice_fails_rather_than_waiting_out_every_retry():
    import grpc

    from services.controller.evaluations import MAX_DEADLINE_TRIES, EvaluationDriver

    clock = Clock()
    storage = InMemoryStorage()
    studies, key, _ = _awaiting_trial(storage)
    late = grpc.StatusCode.DEADLINE_EXCEEDED
    # A deadline, then an unavailable evaluator, then a deadline again: the third try is the
    # last (max_tries is 6), since each deadline cost the whole timeout.
    stub = FakeEvaluatorStub(late, grpc.StatusCode.UNAVAILABLE, late, {"validation/accuracy": 0.5})
    driver = EvaluationDriver(storage, stub, studies, backoff_s=1.0, timeout_s=90.0, clock=clock)
    for _ in range(3):
        driver.dispatch()
        clock.now += 60
    assert MAX_DEADLINE_TRIES == 2 and len(stub.requests) == 3
    why = driver.failed(key, 10)
    assert "after 3 tries" in why and "DEADLINE_EXCEEDED" in why
    assert "no answer within 90 s, 2 times" in why and "BATCHLAB_EVALUATE_TIMEOUT_SECONDS" in why
    assert driver.dispatch() == 0  # not asked again
    assert all(r.step == 10 for r in stub.requests)


class _InProcess:
    """A gRPC stub over a servicer in this process: an abort is raised as a grpc.RpcError."""

    def __init__(self, servicer, fail=()):
        self._servicer = servicer
        self.fail = list(fail)  # status codes the next calls fail with, before reaching it

    def __getattr__(self, method):
        import grpc
        from fake_context import Aborted

        def call(request, timeout=None):
            error = grpc.RpcError()
            if self.fail:
                code = self.fail.pop(0)
                error.code, error.details = (lambda: code), (lambda: "from the test")
                raise error
            try:
                return getattr(self._servicer, method)(request, FakeContext())
            except Aborted as aborted:
                code, details = aborted.code, aborted.details
                error.code, error.details = (lambda: code), (lambda: details)
                raise error from None

        return call


class _CrashingStorage(InMemoryStorage):
    """The controller dies after the evaluator answered and before the answer is stored."""

    crash = True

    def record_evaluation(self, trial, step, values):
        if self.crash:
            raise RuntimeError("the controller was killed")
        return super().record_evaluation(trial, step, values)


def _evaluation_services(trial_name):
    """A real evaluator over a real checkpoint service (keep_latest=1), steps 100-300 held,
    100 evaluated (0.9, the best); the evaluation itself is faked (0.5 at every step)."""
    import hashlib

    from batchlab.proto.v1 import checkpoints_pb2
    from services.checkpoints.memory_storage import InMemoryCheckpointStore
    from services.checkpoints.servicer import CheckpointServicer
    from services.evaluator.servicer import EvaluationServicer

    store = InMemoryCheckpointStore(keep_latest=1)
    for step in (100, 200, 300):
        content = bytes([step % 256]) * 64
        store.save(trial_name, step, [content], sha256=hashlib.sha256(content).hexdigest(),
                   size_bytes=len(content), hold=True)
    store.record_evaluation(trial_name, 100, metric=0.9, maximize=True)
    checkpoints = _InProcess(CheckpointServicer(store))

    def load(trial, step, folder):
        with store.open(trial, step) as opened:
            folder.mkdir(parents=True)
            return opened.record

    def record(trial, step, metric, maximize):
        request = checkpoints_pb2.RecordEvaluationRequest(trial=trial, step=step,
                                                          maximize=maximize)
        if metric is not None:
            request.metric = metric
        return checkpoints.RecordEvaluation(request)

    def evaluate(config, checkpoint_dir, splits):
        (folder,) = checkpoint_dir.iterdir()
        return int(folder.name), {"train/accuracy": 0.6, "validation/accuracy": 0.5}

    evaluator = _InProcess(EvaluationServicer(load, evaluate=evaluate, record=record))
    return store, checkpoints, evaluator


def test_a_controller_killed_mid_evaluation_loses_no_trained_step():
    # The evaluator evaluated step 200 and the controller died before storing the answer.
    # The hold must outlive that: the next controller asks again and gets the answer, not
    # NOT_FOUND for a checkpoint retention deleted meanwhile.
    from services.controller.evaluations import EvaluationDriver

    storage = _CrashingStorage()
    studies, key, _ = _awaiting_trial(storage, steps=(200,))
    store, checkpoints, evaluator = _evaluation_services(key.name)
    first = EvaluationDriver(storage, evaluator, studies, checkpoints=checkpoints)
    first.dispatch()
    assert [p.step for p in storage.awaiting_points("e1")] == [200]
    assert {r.step: r.held for r in store.list(key.name)}[200]  # not released unstored

    storage.crash = False
    restarted = EvaluationDriver(storage, evaluator, studies, checkpoints=checkpoints)
    assert restarted.dispatch() == 1
    assert restarted.failed(key, 200) is None and storage.awaiting_points("e1") == []
    assert storage.trial_points(key)[0].values["validation/accuracy"] == 0.5
    # Stored, then released with its metric: 200 is neither the best nor the latest.
    assert [(r.step, r.held) for r in store.list(key.name)] == [(100, False), (300, True)]


def _stored_but_held():
    """Step 200 evaluated and stored by a controller whose release of its hold failed (then it
    died): (storage, studies, key, checkpoint store, checkpoint service, evaluator)."""
    import grpc

    from services.controller.evaluations import EvaluationDriver

    storage = InMemoryStorage()
    studies, key, _ = _awaiting_trial(storage, steps=(200,))
    store, checkpoints, evaluator = _evaluation_services(key.name)
    checkpoints.fail = [grpc.StatusCode.UNAVAILABLE]
    EvaluationDriver(storage, evaluator, studies, checkpoints=checkpoints).dispatch()
    assert storage.awaiting_points("e1") == []
    assert {r.step: r.held for r in store.list(key.name)}[200]
    return storage, studies, key, store, checkpoints, evaluator


def test_a_hold_not_released_before_a_crash_is_released_by_the_next_controller():
    from services.controller.evaluations import EvaluationDriver

    storage, studies, key, store, checkpoints, evaluator = _stored_but_held()
    EvaluationDriver(storage, evaluator, studies, checkpoints=checkpoints).dispatch()
    assert [(r.step, r.held) for r in store.list(key.name)] == [(100, False), (300, True)]


def test_the_start_up_sweep_of_held_checkpoints_is_tried_again_until_it_lists_them():
    # `batchlab up` starts the services together: the checkpoint service may not listen yet
    # when the restarted controller's first sweep lists the held checkpoints.
    import grpc

    from services.controller.evaluations import EvaluationDriver

    storage, studies, key, store, checkpoints, evaluator = _stored_but_held()
    now = [0.0]
    restarted = EvaluationDriver(storage, evaluator, studies, checkpoints=checkpoints,
                                 clock=lambda: now[0])
    checkpoints.fail = [grpc.StatusCode.UNAVAILABLE]  # the sweep's listing: not up yet
    restarted.dispatch()
    assert {r.step: r.held for r in store.list(key.name)}[200]
    restarted.dispatch()  # too soon for another try
    assert {r.step: r.held for r in store.list(key.name)}[200]
    now[0] += 10.0
    restarted.dispatch()
    assert [(r.step, r.held) for r in store.list(key.name)] == [(100, False), (300, True)]


def test_with_the_evaluation_service_a_trainer_cannot_report_evaluation_metrics():
    # A point not awaiting evaluation would take the (trial, attempt, step) key and stand in
    # for the evaluator's numbers (a spoofed 0.999 became a trial's final point).
    import grpc
    from fake_context import Aborted

    storage = InMemoryStorage()
    storage.create_experiment("e1", "", spec_dict(trials_per_study=1, max_total_trials=1,
                                                   seeds_per_best=0))
    scheduler = Scheduler(storage, FakePool(run=_trained_only), evaluations=FakeEvaluations())
    servicer = ExperimentServicer(storage, studies=scheduler.studies, scheduler=scheduler)
    _ticks(scheduler, 1)
    (attempt,) = storage.attempts("e1")
    trial = attempt.trial.name
    spoof = controller_pb2.MetricPoint(trial=trial, attempt=1, step=10,
                                       values={"validation/accuracy": 0.999})
    context = FakeContext()
    with pytest.raises(Aborted) as refused:
        servicer.ReportProgress(controller_pb2.ReportProgressRequest(points=[spoof]), context)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details.startswith("points[0].awaiting_evaluation")
    real = controller_pb2.MetricPoint(trial=trial, attempt=1, step=10, awaiting_evaluation=True,
                                      values={"train/batch_loss": 1.0})
    servicer.ReportProgress(controller_pb2.ReportProgressRequest(points=[real]), FakeContext())
    assert [(p.step, p.awaiting_evaluation, p.values) for p in storage.trial_points(
        attempt.trial)] == [(10, True, {"train/batch_loss": 1.0})]


def test_an_experiment_with_a_run_that_failed_for_good_fails_and_names_it():
    storage = InMemoryStorage()
    evaluations = FakeEvaluations()
    storage.create_experiment("e1", "", spec_dict(trials_per_study=2, max_total_trials=2,
                                                   seeds_per_best=0, max_attempts=1))
    scheduler = Scheduler(storage, FakePool(run=_trained_only), evaluations=evaluations)
    _ticks(scheduler, 3)
    attempts = {a.trial.trial_index: a for a in storage.attempts("e1")}
    assert sorted(attempts) == [0, 1]
    evaluations.failures[(attempts[1].trial, 10)] = "evaluation of step 10 failed: NOT_FOUND: x"
    for index, step in ((0, 10), (0, 20), (1, 20)):
        storage.record_evaluation(attempts[index].trial, step, {"validation/accuracy": 0.4})
    _ticks(scheduler, 5)
    experiment = storage.get_experiment("e1")
    assert experiment.state is ExperimentState.FAILED
    assert "budgets are not equal" in experiment.error
    assert "1 of 2 tuning trials feasible within max_total_trials (abandoned: trial 1)" in experiment.error
    assert storage.studies("e1")  # the scores stay readable
    assert "NOT_FOUND" in experiment.error


def _failing(indices, *, replicas=(0,)):
    def run(request):
        if request["trial_index"] in indices and request["replica"] in replicas:
            raise RuntimeError("out of memory")
        return fake_result(request)
    return run


def test_an_abandoned_tuning_trial_the_protocol_replaced_is_not_missing():
    """Trial 0 fails for good; trial 2 takes its place within max_total_trials: every study got
    its budget (review finding: the experiment ended FAILED though nothing was missing)."""
    storage = InMemoryStorage()
    storage.create_experiment("e1", "", spec_dict(trials_per_study=2, max_total_trials=3,
                                                   seeds_per_best=1, max_attempts=1))
    _ticks(Scheduler(storage, FakePool(run=_failing({0}))), 12)
    experiment = storage.get_experiment("e1")
    assert experiment.state is ExperimentState.SUCCEEDED, experiment.error
    assert sorted({a.trial.trial_index for a in storage.attempts("e1")}) == [0, 1, 2]


def test_an_abandoned_rerun_fails_the_experiment_naming_it():
    storage = InMemoryStorage()
    storage.create_experiment("e1", "", spec_dict(trials_per_study=2, max_total_trials=2,
                                                   seeds_per_best=2, max_attempts=1))
    _ticks(Scheduler(storage, FakePool(run=_failing({0, 1}, replicas=(1,)))), 12)
    experiment = storage.get_experiment("e1")
    assert experiment.state is ExperimentState.FAILED
    assert "rerun 1 of trial" in experiment.error and "out of memory" in experiment.error


def test_a_run_the_cluster_could_hold_for_a_while_restarts_the_unschedulable_clock():
    """Refused, then placeable but every trainer busy for 20 min, then refused again: the wait
    counts from the new refusal (review finding: it failed at once, 'waited 1210 s')."""
    clock = Clock()
    storage = InMemoryStorage(clock=clock)
    reason = "needs 1 host with CPU 1, GPU 99 each; the Ray cluster's 1 node cannot hold that"
    pool = PlacingPool(Placement(reason, permanent=True))
    scheduler = Scheduler(storage, pool, unschedulable_after_s=60, clock=clock)
    storage.create_experiment("e1", "", spec_dict(resources={"gpus": 99}))
    _ticks(scheduler)
    clock.now += 10
    pool.refused = None  # the autoscaler added the node; every trainer is busy
    pool.acquire = lambda resources, hosts=1: None
    _ticks(scheduler)
    assert not storage.attempts("e1")[0].pending_reason
    clock.now += 1200
    pool.refused = Placement(reason, permanent=True)  # scaled away again
    _ticks(scheduler, 2)
    assert storage.get_experiment("e1").state is ExperimentState.PENDING
    clock.now += 61
    _ticks(scheduler, 2)
    assert storage.get_experiment("e1").error.startswith(f"unschedulable: {reason}; waited 61 s")


def _cancel(storage):
    """What CancelExperiment does on its RPC thread."""
    return storage.end_experiment("e1", ExperimentState.CANCELLED,
                                  expected=[ExperimentState.PENDING, ExperimentState.RUNNING],
                                  cancel_error="experiment cancelled")


@pytest.mark.parametrize("storage_kind", ["memory", "sqlite"])
def test_a_cancel_between_planning_and_queueing_leaves_no_run_waiting(storage_kind, tmp_path):
    """A cancel that landed after the scheduler read the attempts and before it queued new ones
    left the cancelled experiment with QUEUED runs nobody would ever run (review finding)."""
    storage = InMemoryStorage() if storage_kind == "memory" else SQLiteStorage(tmp_path)
    storage.create_experiment("e1", "", spec_dict())
    queue = storage.add_attempts

    def cancel_then_queue(new):
        _cancel(storage)
        return queue(new)

    storage.add_attempts = cancel_then_queue
    scheduler = Scheduler(storage, FakePool())
    scheduler.tick()
    storage.add_attempts = queue
    _ticks(scheduler)
    assert storage.get_experiment("e1").state is ExperimentState.CANCELLED
    assert storage.attempts("e1") == []


@pytest.mark.parametrize("storage_kind", ["memory", "sqlite"])
def test_a_run_that_finishes_training_after_a_cancel_is_not_left_evaluating(storage_kind, tmp_path):
    """The trainer's result came in after the cancel: the run waited in EVALUATING for
    evaluations the driver (which serves running experiments only) never made."""
    storage = InMemoryStorage() if storage_kind == "memory" else SQLiteStorage(tmp_path)
    storage.create_experiment("e1", "", spec_dict())
    pool = FakePool()
    pool.hold = True
    scheduler = Scheduler(storage, pool, evaluations=FakeEvaluations())
    scheduler.tick()
    assert len(storage.attempts("e1", states=[AttemptState.ACTIVE])) == 2
    _cancel(storage)
    pool.hold = False
    _ticks(scheduler)
    ended = [(a.state, a.outcome, a.error) for a in storage.attempts("e1")]
    assert ended == [(AttemptState.COMPLETED, "CANCELLED",
                      "its experiment ended before the run's evaluations")] * 2
    assert all(a.result and a.result["steps_completed"] for a in storage.attempts("e1"))
