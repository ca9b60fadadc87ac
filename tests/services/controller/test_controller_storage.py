"""The storage contract: every ExperimentStorage implementation passes the same tests."""

from __future__ import annotations

import math
import threading

import pytest

from services.controller.storage import (
    AttemptState,
    ExperimentState,
    InMemoryStorage,
    NewAttempt,
    PointRecord,
    SQLiteStorage,
    StorageError,
    StudyRecord,
    TrialKey,
)

SPEC = {"name": "tiny", "trials_per_study": 2}


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "memory"])
def make_storage(request, tmp_path):
    """A factory of storages of one implementation; sqlite ones share tmp_path."""
    made = []

    def make(clock=None):
        kwargs = {"clock": clock} if clock else {}
        storage = (SQLiteStorage(tmp_path, **kwargs) if request.param == "sqlite"
                   else InMemoryStorage(**kwargs))
        made.append(storage)
        return storage

    yield make
    for storage in made:
        storage.close()


@pytest.fixture
def storage(make_storage):
    return make_storage()


def _trial(experiment="e1", study="s", trial=0, replica=0) -> TrialKey:
    return TrialKey(experiment, study, trial, replica)


def _queue(storage, *keys_and_attempts, experiment="e1"):
    return storage.add_attempts([
        NewAttempt(_trial(experiment, trial=t, replica=r), seed=100 + t, attempt=a,
                   kind="tuning" if r == 0 else "rerun", hyperparameters={"lr": 0.1 * (t + 1)})
        for t, r, a in keys_and_attempts])


def test_create_is_idempotent_by_request_id(storage):
    first, created = storage.create_experiment("e1", "req-1", SPEC)
    assert created and first.state is ExperimentState.PENDING and first.name == "experiments/e1"
    again, created = storage.create_experiment("e2", "req-1", {"name": "other"})
    assert not created and again == first
    assert storage.get_experiment("e2") is None
    # No request id: never deduplicated.
    storage.create_experiment("e3", "", SPEC)
    storage.create_experiment("e4", "", SPEC)
    assert [e.id for e in storage.list_experiments()] == ["e1", "e3", "e4"]
    assert storage.get_experiment("e1").spec == SPEC
    with pytest.raises(StorageError):
        storage.create_experiment("e1", "req-2", SPEC)


def test_list_experiments_pages_by_seq(storage):
    for i in range(5):
        storage.create_experiment(f"e{i}", f"r{i}", SPEC)
    page = storage.list_experiments(limit=2)
    assert [e.id for e in page] == ["e0", "e1"]
    page = storage.list_experiments(after_seq=page[-1].seq, limit=2)
    assert [e.id for e in page] == ["e2", "e3"]
    assert [e.id for e in storage.list_experiments(after_seq=page[-1].seq)] == ["e4"]


def test_experiment_state_transitions_are_conditional_and_stamped(make_storage):
    clock = FakeClock()
    storage = make_storage(clock)
    storage.create_experiment("e1", "", SPEC)
    clock.now = 1010.0
    assert storage.set_experiment_state("e1", ExperimentState.RUNNING,
                                        expected=[ExperimentState.PENDING])
    assert not storage.set_experiment_state("e1", ExperimentState.RUNNING,
                                            expected=[ExperimentState.PENDING])
    clock.now = 1020.0
    assert storage.set_experiment_state("e1", ExperimentState.FAILED, error="boom",
                                        expected=[ExperimentState.RUNNING])
    record = storage.get_experiment("e1")
    assert (record.state, record.error, record.create_time, record.start_time,
            record.end_time) == (ExperimentState.FAILED, "boom", 1000.0, 1010.0, 1020.0)
    assert record.terminal
    assert not storage.set_experiment_state("e1", ExperimentState.CANCELLED,
                                            expected=[ExperimentState.PENDING,
                                                      ExperimentState.RUNNING])
    assert [e.id for e in storage.experiments_in([ExperimentState.FAILED])] == ["e1"]
    assert storage.experiments_in([ExperimentState.RUNNING]) == []
    assert not storage.set_experiment_state("nope", ExperimentState.RUNNING,
                                            expected=[ExperimentState.PENDING])


def test_attempt_lifecycle(storage):
    storage.create_experiment("e1", "", SPEC)
    queued = _queue(storage, (0, 0, 1), (1, 0, 1))
    assert [a.state for a in queued] == [AttemptState.QUEUED] * 2
    assert queued[0].hyperparameters == {"lr": 0.1} and queued[0].seed == 100
    first = queued[0]
    assert storage.activate_attempt(first.id, "trainer-0")
    assert not storage.activate_attempt(first.id, "trainer-1")  # already ACTIVE
    result = {"outcome": "SUCCEEDED", "steps_completed": 20, "final_metrics": {"a": math.nan}}
    assert storage.complete_attempt(first.id, "SUCCEEDED", result=result)
    assert not storage.complete_attempt(first.id, "FAILED", error="late")  # completed once
    done = storage.get_attempt(_trial(), 1)
    assert (done.state, done.outcome, done.worker, done.step) == (
        AttemptState.COMPLETED, "SUCCEEDED", "trainer-0", 20)
    assert math.isnan(done.result["final_metrics"]["a"])
    assert [a.trial.trial_index for a in storage.attempts("e1", states=[AttemptState.QUEUED])] \
        == [1]
    # A queued attempt can be completed directly when asked (e.g. cancelled before it ran).
    assert storage.complete_attempt(queued[1].id, "CANCELLED",
                                    expected=[AttemptState.QUEUED])
    assert storage.attempts("e1", study_id="other") == []
    assert len(storage.attempts("e1", study_id="s")) == 2


def test_an_attempt_is_queued_once(storage):
    storage.create_experiment("e1", "", SPEC)
    _queue(storage, (0, 0, 1))
    with pytest.raises(StorageError):
        _queue(storage, (1, 0, 1), (0, 0, 1))
    # The whole batch was refused: trial 1 was not queued either.
    assert [(a.trial.trial_index, a.attempt) for a in storage.attempts("e1")] == [(0, 1)]
    _queue(storage, (0, 0, 2))  # a retry is a new attempt number
    with pytest.raises(StorageError):
        _queue(storage, (0, 0, 1), experiment="missing")


def test_fail_active_attempts_marks_only_active_ones(storage):
    storage.create_experiment("e1", "", SPEC)
    queued = _queue(storage, (0, 0, 1), (1, 0, 1), (2, 0, 1))
    storage.activate_attempt(queued[0].id, "w0")
    storage.activate_attempt(queued[1].id, "w1")
    storage.complete_attempt(queued[1].id, "SUCCEEDED", result={"steps_completed": 3})
    failed = storage.fail_active_attempts("controller restarted")
    assert [a.id for a in failed] == [queued[0].id]
    states = {a.id: (a.state, a.outcome, a.error) for a in storage.attempts("e1")}
    assert states == {
        queued[0].id: (AttemptState.COMPLETED, "FAILED", "controller restarted"),
        queued[1].id: (AttemptState.COMPLETED, "SUCCEEDED", ""),
        queued[2].id: (AttemptState.QUEUED, None, ""),
    }


def test_end_experiment_cancels_only_waiting_attempts_with_the_state_change(make_storage):
    clock = FakeClock()
    storage = make_storage(clock)
    storage.create_experiment("e1", "", SPEC)
    storage.create_experiment("e2", "", SPEC)
    queued = _queue(storage, (0, 0, 1), (1, 0, 1), (2, 0, 1), (3, 0, 1))
    other = _queue(storage, (0, 0, 1), experiment="e2")
    storage.activate_attempt(queued[0].id, "w0")  # stays ACTIVE: its trainer is told apart
    storage.activate_attempt(queued[1].id, "w1")
    storage.finish_training(queued[1].id, {"steps_completed": 5})  # EVALUATING
    storage.activate_attempt(queued[2].id, "w2")
    storage.complete_attempt(queued[2].id, "SUCCEEDED", result={"steps_completed": 9})
    clock.now = 1050.0
    assert storage.end_experiment("e1", ExperimentState.FAILED, error="boom",
                                  expected=[ExperimentState.PENDING, ExperimentState.RUNNING],
                                  cancel_error="experiment failed") == (True, 2)
    record = storage.get_experiment("e1")
    assert (record.state, record.error, record.end_time) == (ExperimentState.FAILED, "boom",
                                                             1050.0)
    states = {a.id: (a.state, a.outcome, a.error) for a in storage.attempts("e1")}
    assert states == {
        queued[0].id: (AttemptState.ACTIVE, None, ""),
        queued[1].id: (AttemptState.COMPLETED, "CANCELLED", "experiment failed"),
        queued[2].id: (AttemptState.COMPLETED, "SUCCEEDED", ""),
        queued[3].id: (AttemptState.COMPLETED, "CANCELLED", "experiment failed"),
    }
    assert storage.get_attempt(_trial(trial=1), 1).step == 5  # what it trained is kept
    assert storage.get_attempt(_trial(trial=3), 1).end_time == 1050.0
    # Another experiment's runs are not touched; ending twice changes nothing.
    assert storage.attempts("e2")[0].state is AttemptState.QUEUED and other
    assert storage.end_experiment("e1", ExperimentState.CANCELLED,
                                  expected=[ExperimentState.PENDING, ExperimentState.RUNNING],
                                  cancel_error="experiment cancelled") == (False, 0)
    assert storage.get_experiment("e1").state is ExperimentState.FAILED
    with pytest.raises(ValueError, match="not a terminal state"):
        storage.end_experiment("e2", ExperimentState.RUNNING,
                               expected=[ExperimentState.PENDING], cancel_error="x")


def test_an_ended_experiment_takes_no_new_runs(storage):
    storage.create_experiment("e1", "", SPEC)
    storage.end_experiment("e1", ExperimentState.CANCELLED, expected=[ExperimentState.PENDING],
                           cancel_error="experiment cancelled")
    with pytest.raises(StorageError, match="ended CANCELLED"):
        _queue(storage, (0, 0, 1))
    assert storage.attempts("e1") == []


def test_a_reader_never_sees_an_ended_experiment_with_waiting_runs(storage):
    """Ending an experiment and cancelling its queued runs is one transaction: the
    controller's scheduler thread ends experiments while RPC threads read them."""
    n = 40
    for i in range(n):
        storage.create_experiment(f"e{i}", "", SPEC)
        _queue(storage, (0, 0, 1), (1, 0, 1), (2, 0, 1), experiment=f"e{i}")
    seen: list[str] = []
    done = threading.Event()

    def read():
        while not done.is_set():
            for i in range(n):
                if storage.get_experiment(f"e{i}").terminal and storage.attempts(
                        f"e{i}", states=[AttemptState.QUEUED]):
                    seen.append(f"e{i}")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(n):
            storage.end_experiment(f"e{i}", ExperimentState.FAILED, error="unschedulable",
                                   expected=[ExperimentState.PENDING],
                                   cancel_error="experiment failed")
    finally:
        done.set()
        reader.join()
    assert seen == []
    assert all(a.outcome == "CANCELLED" for i in range(n) for a in storage.attempts(f"e{i}"))


def test_points_are_keyed_by_trial_attempt_and_step(storage):
    storage.create_experiment("e1", "", SPEC)
    storage.create_experiment("e2", "", SPEC)
    _queue(storage, (0, 0, 1), (0, 0, 2))
    t = _trial()
    points = [PointRecord(t, 1, 10, {"acc": 0.5}), PointRecord(t, 1, 20, {"acc": 0.6})]
    assert storage.add_points(points) == 2
    assert storage.add_points(points) == 0  # a retried report changes nothing
    assert storage.add_points([PointRecord(t, 2, 20, {"acc": 0.7})]) == 1  # another attempt
    assert storage.add_points([PointRecord(_trial("e2"), 1, 10, {"acc": 0.1})]) == 1
    stored = storage.points("e1")
    assert [(p.attempt, p.step, dict(p.values)) for p in stored] == [
        (1, 10, {"acc": 0.5}), (1, 20, {"acc": 0.6}), (2, 20, {"acc": 0.7})]
    assert stored[0].seq < stored[1].seq < stored[2].seq
    assert [p.step for p in storage.points("e1", after_seq=stored[0].seq, limit=1)] == [20]
    assert storage.get_attempt(t, 1).step == 20


def test_studies_are_replaced(storage):
    storage.create_experiment("e1", "", SPEC)
    storage.put_study("e1", StudyRecord("s", "tuning", None, {"done": False}))
    storage.put_study("e1", StudyRecord("s", "done", 1, {"done": True, "x": math.inf}))
    stored = storage.studies("e1")
    assert list(stored) == ["s"]
    assert (stored["s"].phase, stored["s"].best_trial, stored["s"].score["done"]) == (
        "done", 1, True)
    assert storage.studies("e2") == {}


def test_concurrent_writers_never_lose_or_duplicate(storage):
    storage.create_experiment("e1", "", SPEC)
    queued = _queue(storage, *[(i, 0, 1) for i in range(8)])
    wins: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for attempt in queued:
            if storage.activate_attempt(attempt.id, f"w{n}"):
                with lock:
                    wins.append(attempt.id)
            storage.add_points([PointRecord(attempt.trial, 1, step, {"n": float(n)})
                                for step in range(5)])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [a.id for a in queued]  # each attempt activated exactly once
    assert len(storage.points("e1")) == 8 * 5


def test_sqlite_state_survives_reopening(tmp_path):
    first = SQLiteStorage(tmp_path)
    first.create_experiment("e1", "req", SPEC)
    _queue(first, (0, 0, 1))
    first.close()
    second = SQLiteStorage(tmp_path)
    try:
        assert second.create_experiment("e9", "req", SPEC)[0].id == "e1"
        assert len(second.attempts("e1")) == 1
        mode = second._connection().execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    finally:
        second.close()
