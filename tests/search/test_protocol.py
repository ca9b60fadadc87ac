"""The study protocol as a state machine, driven by simulated results."""

from __future__ import annotations

import math
import random

import pytest

from batchlab.search.protocol import (
    Outcome,
    Phase,
    ProtocolError,
    RunKey,
    RunKind,
    RunRecord,
    RunStatus,
    next_runs,
    study_state,
)

S = Outcome.SUCCEEDED
D = Outcome.DIVERGED
F = Outcome.FAILED


def _launched_trials(decisions, kind=RunKind.TUNING):
    return [r.trial_index for d in decisions for r in d.launch if r.kind is kind]


def test_first_decision_launches_trial_zero(make_study):
    study = make_study()
    decision = next_runs(study, [])
    (request,) = decision.launch
    assert (request.kind, request.trial_index, request.replica, request.attempt) == (
        RunKind.TUNING, 0, 0, 1)
    assert request.seed == study.tuning_seed(0)
    assert request.hyperparameters == study.hyperparameters(0)
    assert (request.batch_size, request.step_budget, request.eval_every_steps) == (128, 100, 10)
    assert not decision.done and decision.phase is Phase.TUNING


def test_all_feasible_runs_exactly_the_budget_then_reruns(make_study, simulator):
    simulate, succeed = simulator
    study = make_study(trials_per_study=4, seeds_per_best=3)
    records, decisions = simulate(study, succeed())
    assert _launched_trials(decisions) == [0, 1, 2, 3]
    reruns = [r for d in decisions for r in d.launch if r.kind is RunKind.RERUN]
    assert [r.trial_index for r in reruns] == [3, 3, 3]  # metric grows with the trial index
    assert [r.replica for r in reruns] == [1, 2, 3]
    seeds = [r.seed for r in reruns]
    assert len(set(seeds)) == 3 and study.tuning_seed(3) not in seeds
    assert all(r.hyperparameters == study.hyperparameters(3) for r in reruns)
    final = decisions[-1]
    assert final.done and final.phase is Phase.DONE and final.best_trial == 3
    assert len(records) == 7


def test_diverged_trials_do_not_count_toward_the_feasible_budget(make_study, simulator):
    simulate, succeed = simulator
    study = make_study(trials_per_study=4, max_total_trials=8, seeds_per_best=1)
    _, decisions = simulate(study, succeed(diverge=frozenset({1, 3})))
    assert _launched_trials(decisions) == [0, 1, 2, 3, 4, 5]
    state = decisions[-1].state
    assert (state.feasible_trials, state.diverged_trials) == (4, 2)
    assert state.counted_trials == (0, 2, 4, 5)
    assert decisions[-1].best_trial == 5


def test_max_total_trials_caps_a_study_that_keeps_diverging(make_study, simulator):
    simulate, succeed = simulator
    study = make_study(trials_per_study=4, max_total_trials=6, seeds_per_best=2)
    _, decisions = simulate(study, succeed(diverge=frozenset(range(100))))
    assert _launched_trials(decisions) == list(range(6))
    final = decisions[-1]
    assert final.done and final.best_trial is None
    assert "max_total_trials (6)" in final.reason and "no feasible trial" in final.reason
    assert _launched_trials(decisions, RunKind.RERUN) == []


def test_cap_reached_with_some_feasible_still_selects_and_reruns(make_study, simulator):
    simulate, succeed = simulator
    study = make_study(trials_per_study=4, max_total_trials=5, seeds_per_best=2)
    _, decisions = simulate(study, succeed(diverge=frozenset({0, 2, 3})))
    final = decisions[-1]
    assert final.state.counted_trials == (1, 4)
    assert final.best_trial == 4 and final.done
    assert _launched_trials(decisions, RunKind.RERUN) == [4, 4]


def test_failed_runs_are_retried_with_the_same_seed_and_not_counted(make_study, simulator):
    simulate, succeed = simulator
    study = make_study(trials_per_study=3, max_attempts=3, seeds_per_best=0)
    records, decisions = simulate(study, succeed(fail={1: 2}))
    attempts = [r for d in decisions for r in d.launch if r.trial_index == 1]
    assert [r.attempt for r in attempts] == [1, 2, 3]
    assert len({r.seed for r in attempts}) == 1
    assert all(r.hyperparameters == attempts[0].hyperparameters for r in attempts)
    final = decisions[-1].state
    assert (final.feasible_trials, final.diverged_trials, final.abandoned_trials) == (3, 0, 0)
    assert _launched_trials(decisions) == [0, 1, 1, 1, 2]
    assert [r.outcome for r in records].count(F) == 2


def test_a_run_failing_every_attempt_is_abandoned_and_replaced(make_study, simulator):
    simulate, succeed = simulator
    study = make_study(trials_per_study=3, max_attempts=2, seeds_per_best=0)
    _, decisions = simulate(study, succeed(fail={0: 99}))
    state = decisions[-1].state
    assert state.tuning[0].status is RunStatus.ABANDONED
    assert (state.feasible_trials, state.abandoned_trials) == (3, 1)
    assert state.counted_trials == (1, 2, 3)


def test_failed_reruns_are_retried(make_study):
    study = make_study(trials_per_study=1, seeds_per_best=2, max_attempts=2)
    tuning = RunRecord(0, study.tuning_seed(0), S, {"validation/accuracy": 0.9})
    first, second = study.rerun_seeds(0)
    records = [tuning, RunRecord(0, first, F)]
    decision = next_runs(study, records, parallelism=4)
    assert [(r.replica, r.attempt) for r in decision.launch] == [(1, 2), (2, 1)]
    records += [RunRecord(0, first, F), RunRecord(0, second, S, {"validation/accuracy": 0.8})]
    decision = next_runs(study, records)
    assert decision.done and decision.state.reruns[0].status is RunStatus.ABANDONED


@pytest.mark.parametrize("goal, metrics, best", [
    ("MAXIMIZE", [0.70, 0.91, 0.85, 0.91], 1),  # tie -> lower trial index
    ("MINIMIZE", [0.70, 0.91, 0.65, 0.80], 2),
    ("MAXIMIZE", [0.70, math.nan, 0.60, 0.50], 0),  # a NaN metric is a divergence
])
def test_best_validation_metric(make_study, goal, metrics, best):
    study = make_study(trials_per_study=3, max_total_trials=4, seeds_per_best=0,
                       target={"metric": "validation/accuracy", "value": 0.75, "goal": goal})
    records = [RunRecord(i, study.tuning_seed(i), S, {"validation/accuracy": m})
               for i, m in enumerate(metrics)]
    decision = next_runs(study, records)
    assert decision.done and decision.best_trial == best


@pytest.mark.parametrize("steps, metrics, best", [
    ([400, 300, math.inf], [0.80, 0.76, 0.95], 1),  # fewest steps wins over a better metric
    ([300, 300, 500], [0.76, 0.80, 0.90], 1),  # equal steps -> better metric
    ([math.inf, math.inf, math.inf], [0.50, 0.70, 0.60], 1),  # nobody reaches -> best metric
])
def test_fewest_steps_to_target(make_study, steps, metrics, best):
    study = make_study(trials_per_study=3, seeds_per_best=0, selection="FEWEST_STEPS_TO_TARGET")
    records = [RunRecord(i, study.tuning_seed(i), S, {"validation/accuracy": m},
                         steps_to_target=s) for i, (s, m) in enumerate(zip(steps, metrics, strict=True))]
    assert next_runs(study, records).best_trial == best


def test_selection_counts_only_the_first_feasible_trials(make_study):
    # More feasible records than the budget (e.g. recorded before the spec was tightened):
    # the fair comparison uses the first trials_per_study of them.
    study = make_study(trials_per_study=2, seeds_per_best=0)
    records = [RunRecord(i, study.tuning_seed(i), S, {"validation/accuracy": m})
               for i, m in enumerate([0.5, 0.6, 0.99])]
    decision = next_runs(study, records)
    assert decision.state.counted_trials == (0, 1) and decision.best_trial == 1


def test_done_only_when_every_rerun_finished(make_study):
    study = make_study(trials_per_study=1, seeds_per_best=2)
    records = [RunRecord(0, study.tuning_seed(0), S, {"validation/accuracy": 0.9})]
    first, second = study.rerun_seeds(0)
    decision = next_runs(study, records, parallelism=2)
    assert decision.phase is Phase.RERUNS and len(decision.launch) == 2
    records.append(RunRecord(0, first, D))
    decision = next_runs(study, records, in_flight=[RunKey(0, second)], parallelism=2)
    assert not decision.done and decision.launch == () and "waiting" in decision.reason
    records.append(RunRecord(0, second, S, {"validation/accuracy": 0.7}))
    assert next_runs(study, records).done


def test_zero_reruns_finishes_after_tuning(make_study, simulator):
    simulate, succeed = simulator
    study = make_study(seeds_per_best=0)
    records, decisions = simulate(study, succeed())
    assert decisions[-1].done and len(records) == study.trials_per_study


@pytest.mark.parametrize("parallelism", [1, 2, 3, 8])
def test_parallelism_limits_runs_in_flight(make_study, simulator, parallelism):
    simulate, succeed = simulator
    study = make_study(trials_per_study=4, max_total_trials=8, seeds_per_best=3)
    first = next_runs(study, [], parallelism=parallelism)
    # Never more tuning runs than could still be needed.
    assert [r.trial_index for r in first.launch] == list(range(min(parallelism, 4)))
    _, decisions = simulate(study, succeed(diverge=frozenset({2})), parallelism=parallelism)
    assert decisions[-1].done and decisions[-1].state.feasible_trials == 4
    assert len(_launched_trials(decisions)) == 5


def test_in_flight_runs_are_not_relaunched(make_study):
    study = make_study()
    running = next_runs(study, [], parallelism=2).launch
    decision = next_runs(study, [], in_flight=running, parallelism=3)
    assert [r.trial_index for r in decision.launch] == [2]
    # in_flight also takes RunKeys and (trial, seed) pairs.
    as_pairs = [(r.trial_index, r.seed) for r in running]
    assert next_runs(study, [], in_flight=as_pairs, parallelism=3).launch == decision.launch


def _full_history(make_study, simulator, parallelism):
    simulate, succeed = simulator
    study = make_study(trials_per_study=4, max_total_trials=8, seeds_per_best=3, max_attempts=2)
    outcomes = succeed(diverge=frozenset({1, 4}), fail={2: 1, 5: 2})
    records, decisions = simulate(study, outcomes, parallelism=parallelism)
    return study, records, decisions


def test_resume_from_any_prefix_gives_the_same_decisions(make_study, simulator):
    study, records, decisions = _full_history(make_study, simulator, parallelism=1)
    # With parallelism 1, decision k was taken after exactly k records.
    for k, decision in enumerate(decisions):
        again = next_runs(study, records[:k])
        assert again.launch == decision.launch
        assert (again.done, again.phase, again.best_trial) == (
            decision.done, decision.phase, decision.best_trial)


def test_record_order_does_not_matter(make_study, simulator):
    study, records, decisions = _full_history(make_study, simulator, parallelism=3)
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    assert next_runs(study, shuffled).state == next_runs(study, records).state
    assert next_runs(study, shuffled).best_trial == decisions[-1].best_trial


def test_decisions_are_the_same_on_a_fresh_study_object(make_study):
    a, b = make_study(), make_study()
    assert next_runs(a, [], parallelism=3).launch == next_runs(b, [], parallelism=3).launch


def test_unknown_seed_is_a_protocol_error(make_study):
    study = make_study()
    with pytest.raises(ProtocolError, match="never assigned"):
        next_runs(study, [RunRecord(0, study.tuning_seed(0) + 1, S, {"validation/accuracy": 1})])
    with pytest.raises(ProtocolError, match="never assigned"):
        next_runs(study, [], in_flight=[RunKey(3, 12345)])


def test_succeeded_record_without_target_metric_is_a_protocol_error(make_study):
    study = make_study()
    with pytest.raises(ProtocolError, match="lacks the target metric"):
        next_runs(study, [RunRecord(0, study.tuning_seed(0), S, {"train/loss": 0.3})])


def test_two_results_for_one_run_is_a_protocol_error(make_study):
    study = make_study()
    record = RunRecord(0, study.tuning_seed(0), S, {"validation/accuracy": 0.5})
    with pytest.raises(ProtocolError, match="2 results"):
        next_runs(study, [record, record])


def test_rerun_records_of_another_trial_are_ignored_but_kept(make_study):
    study = make_study(trials_per_study=2, seeds_per_best=1)
    records = [RunRecord(0, study.tuning_seed(0), S, {"validation/accuracy": 0.9}),
               RunRecord(1, study.tuning_seed(1), S, {"validation/accuracy": 0.5}),
               RunRecord(1, study.rerun_seeds(1)[0], S, {"validation/accuracy": 0.5})]
    state = study_state(study, records)
    assert state.best_trial == 0 and state.stray_records == (records[2],)


@pytest.mark.parametrize("kwargs, error", [
    ({"outcome": 0}, "outcome must be one of"),
    ({"outcome": S, "steps_to_target": math.nan}, "steps_to_target"),
    ({"outcome": S, "steps_to_target": -1}, "steps_to_target"),
    ({"outcome": S, "steps_run": -5}, "steps_run"),
])
def test_run_record_validation(kwargs, error):
    with pytest.raises(ValueError, match=error):
        RunRecord(trial_index=0, seed=1, **kwargs)


def test_run_record_accepts_proto_numbers_and_none_steps():
    record = RunRecord(0, 1, 2, steps_to_target=None)
    assert record.outcome is Outcome.DIVERGED and record.steps_to_target == math.inf


def test_parallelism_must_be_positive(make_study):
    with pytest.raises(ValueError, match="parallelism"):
        next_runs(make_study(), [], parallelism=0)


def test_request_names_are_stable(make_study):
    (request,) = next_runs(make_study(), []).launch
    assert request.name == "mnist1d_resnet1d.nesterov.b128.s100/t0/r0/a1"
