"""stop_at_target with evaluation by the service ends a run where the training loop would.

In process, batchlab.train.loop stops a stop_at_target run right after the first evaluation
meeting the target: SUCCEEDED, steps_completed and steps-to-target at that step, the curve and
final metrics ending there. A trainer evaluated by the service cannot tell, so the controller
does it from the evaluator's answers: it ends the attempt at that step (not before every
earlier step is evaluated), stops the trainer, and leaves later points out.
"""

from __future__ import annotations

from controller_fakes import FakePool, spec_dict
from test_controller_attempts import FakeEvaluations, _trained_only

from services.controller.scheduler import Scheduler
from services.controller.storage import AttemptState, InMemoryStorage, PointRecord

# Target 0.3 on validation/accuracy (controller_fakes.SPEC), evaluated every 10 of 30 steps.
SPEC = spec_dict(trials_per_study=1, max_total_trials=1, seeds_per_best=0,
                 selection="FEWEST_STEPS_TO_TARGET", stop_at_target=True)
SPEC["workloads"][0]["points"] = [{"batch_size": 32, "step_budget": 30}]


def _ticks(scheduler, n=3):
    for _ in range(n):
        scheduler.tick()


def _started(pool):
    storage = InMemoryStorage()
    storage.create_experiment("e1", "", SPEC)
    scheduler = Scheduler(storage, pool, evaluations=FakeEvaluations())
    _ticks(scheduler)
    return storage, scheduler


def test_a_training_run_ends_at_the_first_evaluation_meeting_the_target_and_is_stopped():
    pool = FakePool(run=_trained_only)
    pool.hold = True  # the trainer is still training
    storage, scheduler = _started(pool)
    (attempt,) = storage.attempts("e1")
    assert attempt.state is AttemptState.ACTIVE and pool.started[0]["evaluation"] == 2
    # It reported steps 10 and 20 awaiting evaluation (training metrics only).
    storage.add_points([PointRecord(attempt.trial, 1, step, {"learning_rate": 0.1,
                                                            "train/batch_loss": 1.0},
                                    awaiting_evaluation=True) for step in (10, 20)])
    storage.record_evaluation(attempt.trial, 20, {"validation/accuracy": 0.5})
    _ticks(scheduler)
    # Step 20 meets the target, but step 10 is not evaluated: it may meet it first.
    assert storage.attempts("e1")[0].state is AttemptState.ACTIVE and not pool.stopped
    storage.record_evaluation(attempt.trial, 10, {"validation/accuracy": 0.2})
    _ticks(scheduler, 1)
    (attempt,) = storage.attempts("e1")
    assert (attempt.state, attempt.outcome) == (AttemptState.COMPLETED, "SUCCEEDED")
    assert pool.stopped == [(attempt.trial.name, 1)]
    result = attempt.result
    assert result["steps_completed"] == 20 and result["steps_to_target"] == 20
    assert [(p["step"], p["validation/accuracy"]) for p in result["curve"]] == [
        (10, 0.2), (20, 0.5)]
    assert result["final_metrics"] == {"step": 20.0, "validation/accuracy": 0.5,
                                       "learning_rate": 0.1, "train/batch_loss": 1.0}
    # The stopped trainer's CANCELLED result arrives later and changes nothing.
    pool.hold = False
    _ticks(scheduler)
    (attempt,) = storage.attempts("e1")
    assert (attempt.outcome, attempt.result["steps_completed"]) == ("SUCCEEDED", 20)
    assert storage.get_experiment("e1").state.value == "SUCCEEDED"
    (study,) = storage.studies("e1").values()
    assert study.score["seeds"]["median_steps_to_target"] == 20
    assert study.score["effort"]["total_steps"] == 20  # the steps the run counts as trained


def test_a_run_that_trained_to_its_end_is_cut_at_the_target_without_waiting_for_later_points():
    storage, scheduler = _started(FakePool(run=_trained_only))
    (attempt,) = storage.attempts("e1")
    assert attempt.state is AttemptState.EVALUATING  # trained all 30 steps
    assert [p.step for p in storage.awaiting_points("e1")] == [10, 20, 30]
    storage.record_evaluation(attempt.trial, 10, {"validation/accuracy": 0.3})  # met: >=
    _ticks(scheduler, 1)
    (attempt,) = storage.attempts("e1")
    assert (attempt.state, attempt.outcome) == (AttemptState.COMPLETED, "SUCCEEDED")
    assert attempt.result["steps_completed"] == 10 and attempt.result["steps_to_target"] == 10
    assert [p["step"] for p in attempt.result["curve"]] == [10]
    assert attempt.result["final_metrics"]["validation/accuracy"] == 0.3


def test_without_stop_at_target_every_point_counts():
    spec = spec_dict(trials_per_study=1, max_total_trials=1, seeds_per_best=0,
                     selection="FEWEST_STEPS_TO_TARGET")
    spec["workloads"][0]["points"] = [{"batch_size": 32, "step_budget": 30}]
    storage = InMemoryStorage()
    storage.create_experiment("e1", "", spec)
    scheduler = Scheduler(storage, FakePool(run=_trained_only), evaluations=FakeEvaluations())
    _ticks(scheduler)
    (attempt,) = storage.attempts("e1")
    storage.record_evaluation(attempt.trial, 10, {"validation/accuracy": 0.4})
    _ticks(scheduler, 1)
    assert storage.attempts("e1")[0].state is AttemptState.EVALUATING
    for step, value in ((20, 0.2), (30, 0.35)):
        storage.record_evaluation(attempt.trial, step, {"validation/accuracy": value})
    _ticks(scheduler, 1)
    (attempt,) = storage.attempts("e1")
    assert attempt.result["steps_completed"] == 30 and attempt.result["steps_to_target"] == 10
    assert attempt.result["final_metrics"]["validation/accuracy"] == 0.35
