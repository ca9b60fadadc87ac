"""The scheduler on a fake trainer pool: protocol progress, retries, restarts, divergence."""

from __future__ import annotations

import pytest
from controller_fakes import FakePool, LostWorker, fake_result, spec_dict
from tiny_spec import derive_other_learning_rates

from services.controller.scheduler import Scheduler, latest_attempts
from services.controller.storage import (
    AttemptState,
    ExperimentState,
    InMemoryStorage,
    SQLiteStorage,
)


def _submit(storage, spec=None, experiment_id="e1"):
    storage.create_experiment(experiment_id, "", spec or spec_dict())
    return experiment_id


def _run_until_done(scheduler, storage, experiment_id="e1", ticks=50):
    for _ in range(ticks):
        scheduler.tick()
        if storage.get_experiment(experiment_id).terminal:
            return storage.get_experiment(experiment_id)
    raise AssertionError(f"not done after {ticks} ticks: {storage.attempts(experiment_id)}")


def _completed_once(storage, experiment_id="e1"):
    """Trials (study, trial, replica) -> number of attempts with a result."""
    counts = {}
    for attempt in storage.attempts(experiment_id):
        if attempt.outcome in ("SUCCEEDED", "DIVERGED"):
            counts[attempt.trial] = counts.get(attempt.trial, 0) + 1
    return counts


def test_experiment_runs_tuning_then_reruns_and_succeeds():
    storage, pool = InMemoryStorage(), FakePool(size=2)
    scheduler = Scheduler(storage, pool)
    _submit(storage)
    scheduler.tick()
    assert storage.get_experiment("e1").state is ExperimentState.RUNNING
    assert [r["trial"].rsplit("/", 1)[1] for r in pool.started] == ["0-r0", "1-r0"]
    experiment = _run_until_done(scheduler, storage)
    assert experiment.state is ExperimentState.SUCCEEDED and experiment.end_time
    kinds = [(a.trial.trial_index, a.trial.replica, a.kind) for a in storage.attempts("e1")]
    assert kinds == [(0, 0, "tuning"), (1, 0, "tuning"), (1, 1, "rerun")]
    (study,) = storage.studies("e1").values()
    assert study.phase == "done" and study.best_trial == 1
    assert study.score["seeds"]["finished"] == 1
    first = pool.started[0]
    assert first["target"] == {"metric": "validation/accuracy", "value": 0.3,
                               "goal": "MAXIMIZE"}
    assert (first["batch_size"], first["step_budget"], first["eval_every_steps"]) == (32, 20, 10)
    assert set(_completed_once(storage).values()) == {1}


def test_lost_worker_fails_the_attempt_and_retries_it():
    lost = {"left": 1}

    def run(request):
        if request["trial_index"] == 0 and lost["left"]:
            lost["left"] -= 1
            raise LostWorker("actor died")
        return fake_result(request)

    storage, pool = InMemoryStorage(), FakePool(run=run)
    _submit(storage)
    experiment = _run_until_done(Scheduler(storage, pool), storage)
    assert experiment.state is ExperimentState.SUCCEEDED
    trial0 = [a for a in storage.attempts("e1") if a.trial.trial_index == 0 and
              a.trial.replica == 0]
    assert [(a.attempt, a.outcome) for a in trial0] == [(1, "FAILED"), (2, "SUCCEEDED")]
    assert "lost" in trial0[0].error
    assert set(_completed_once(storage).values()) == {1}


def test_restart_fails_active_attempts_and_completes_every_trial_once(tmp_path):
    storage = SQLiteStorage(tmp_path)
    pool = FakePool()
    pool.hold = True  # the first controller dies with both tuning runs in flight
    first = Scheduler(storage, pool)
    _submit(storage)
    first.tick()
    assert len(storage.attempts("e1", states=[AttemptState.ACTIVE])) == 2
    storage.close()

    storage = SQLiteStorage(tmp_path)
    second = Scheduler(storage, FakePool())
    failed = second.recover()
    assert len(failed) == 2
    experiment = _run_until_done(second, storage)
    assert experiment.state is ExperimentState.SUCCEEDED
    by_trial = {}
    for attempt in storage.attempts("e1"):
        by_trial.setdefault((attempt.trial.trial_index, attempt.trial.replica), []).append(
            (attempt.attempt, attempt.outcome))
    assert by_trial[(0, 0)] == [(1, "FAILED"), (2, "SUCCEEDED")]
    assert by_trial[(1, 0)] == [(1, "FAILED"), (2, "SUCCEEDED")]
    assert set(_completed_once(storage).values()) == {1}
    storage.close()


def test_a_controller_whose_code_derives_other_hyperparameters_fails_the_experiment(
        tmp_path, monkeypatch):
    """Upgraded mid-experiment to code that derives other hyperparameters, a controller mixed
    the stored runs into new verdicts without a word."""
    storage = SQLiteStorage(tmp_path)
    pool = FakePool()
    pool.hold = True
    _submit(storage)
    Scheduler(storage, pool).tick()
    stored = {a.id: (a.state, a.outcome) for a in storage.attempts("e1")}
    assert len(stored) == 2
    storage.close()

    derive_other_learning_rates(monkeypatch, 2)
    storage = SQLiteStorage(tmp_path)
    second = Scheduler(storage, FakePool())
    second.recover()
    experiment = _run_until_done(second, storage)
    assert experiment.state is ExperimentState.FAILED
    assert ("stored attempt 1 of experiments/e1/studies/" in experiment.error
            and "hyperparameters.optimizer.learning_rate.peak_value: stored" in experiment.error
            and "submit the experiment again" in experiment.error), experiment.error
    # No run of the new code was queued next to the old ones.
    assert len(storage.attempts("e1")) == 2
    storage.close()


def test_diverging_trial_is_diverged_and_the_study_goes_on():
    spec = spec_dict(max_total_trials=4)
    # Base-2 stratification of the first Halton dimension: of any two consecutive trials
    # exactly one draws each half, so one of trials 0 and 1 (and of 2 and 3) gets lr 0.95,
    # which the fake pool diverges.
    spec["optimizers"][0]["search_space"] = {"parameters": [
        {"path": "optimizer.learning_rate.peak_value", "discrete": {"values": [0.95, 0.1]}}]}
    storage, pool = InMemoryStorage(), FakePool()
    _submit(storage, spec)
    experiment = _run_until_done(Scheduler(storage, pool), storage)
    assert experiment.state is ExperimentState.SUCCEEDED
    attempts = [a for a in latest_attempts(storage.attempts("e1")) if a.kind == "tuning"]
    outcomes = {a.trial.trial_index: a.outcome for a in attempts}
    rates = {a.trial.trial_index: a.hyperparameters["optimizer"]["learning_rate"]["peak_value"]
             for a in attempts}
    assert {i for i, o in outcomes.items() if o == "DIVERGED"} == {
        i for i, lr in rates.items() if lr == 0.95}
    assert sum(1 for lr in (rates[0], rates[1]) if lr == 0.95) == 1
    # Two feasible trials were still found (diverged ones do not count toward the budget).
    assert sum(1 for o in outcomes.values() if o == "SUCCEEDED") == 2


def test_every_run_failing_fails_the_experiment():
    def run(request):
        raise RuntimeError("dataset missing")

    storage = InMemoryStorage()
    _submit(storage)
    experiment = _run_until_done(Scheduler(storage, FakePool(run=run)), storage)
    assert experiment.state is ExperimentState.FAILED
    assert "dataset missing" in experiment.error
    # Each run was tried max_attempts (3) times.
    assert max(a.attempt for a in storage.attempts("e1")) == 3


def test_cancelled_experiment_stops_running_attempts():
    storage, pool = InMemoryStorage(), FakePool()
    scheduler = Scheduler(storage, pool)
    _submit(storage)
    pool.hold = True
    scheduler.tick()
    storage.set_experiment_state("e1", ExperimentState.CANCELLED,
                                 expected=[ExperimentState.RUNNING])
    scheduler.tick()
    assert sorted(t.rsplit("/", 1)[1] for t, _ in pool.stopped) == ["0-r0", "1-r0"]
    pool.hold = False
    scheduler.tick()
    assert {a.outcome for a in storage.attempts("e1")} == {"CANCELLED"}
    assert storage.get_experiment("e1").state is ExperimentState.CANCELLED


@pytest.mark.parametrize("hosts", [2])
def test_multi_host_runs_take_that_many_trainers(hosts):
    spec = spec_dict(resources={"cpus": 1, "num_hosts": hosts})
    storage, pool = InMemoryStorage(), FakePool(size=2)
    scheduler = Scheduler(storage, pool)
    _submit(storage, spec)
    pool.hold = True
    scheduler.tick()
    # Two hosts per run, two trainers: one run at a time.
    assert len(pool.running()) == 1
    assert pool.running()[0].lease.worker.count("+") == hosts - 1
    pool.hold = False
    assert _run_until_done(scheduler, storage).state is ExperimentState.SUCCEEDED


def test_controller_metrics_follow_the_experiment():
    from prometheus_client import CollectorRegistry

    from batchlab.rpc.metrics import make_metrics

    metrics = make_metrics(CollectorRegistry(), roles=["controller"])
    storage = InMemoryStorage()
    scheduler = Scheduler(storage, FakePool(), metrics=metrics.controller,
                          metrics_interval_s=0.0)
    _submit(storage)
    scheduler.tick()
    value = metrics.registry.get_sample_value
    assert value("batchlab_experiments", {"state": "RUNNING"}) == 1
    assert value("batchlab_queue_depth") == 0
    assert value("batchlab_trainers", {"state": "busy"}) == 2
    assert value("batchlab_trials", {"experiment": "e1", "state": "ACTIVE",
                                     "outcome": "none"}) == 2
    _run_until_done(scheduler, storage)
    scheduler.tick()
    assert value("batchlab_experiments", {"state": "SUCCEEDED"}) == 1
    assert value("batchlab_trial_runs_finished_total",
                 {"experiment": "e1", "outcome": "SUCCEEDED"}) == 3
    assert value("batchlab_scheduling_latency_seconds_count") == 3
