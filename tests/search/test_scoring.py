"""Scoring: steps-to-target, NaN handling, statistics over seeds, a study's score and effort."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from batchlab.search.protocol import Outcome, RunRecord, held_steps
from batchlab.search.scoring import (
    quantile,
    score_study,
    steps_to_target,
    summarize_metric,
    summarize_seeds,
)
from batchlab.search.study import Goal, Target, TargetReading

NAN = math.nan
INF = math.inf


@pytest.mark.parametrize("steps, values, target, goal, expected", [
    ([100, 200, 300], [0.5, 0.8, 0.9], 0.75, Goal.MAXIMIZE, 200),
    ([100, 200, 300], [0.8, 0.5, 0.9], 0.75, Goal.MAXIMIZE, 100),  # first, not last
    ([100, 200, 300], [0.5, 0.6, 0.7], 0.75, Goal.MAXIMIZE, INF),  # never -> inf
    ([100, 200, 300], [0.5, 0.75, 0.7], 0.75, Goal.MAXIMIZE, 200),  # equality meets
    ([100, 200, 300], [NAN, NAN, 0.8], 0.75, Goal.MAXIMIZE, 300),  # NaN never meets
    ([100, 200], [NAN, NAN], 0.75, Goal.MINIMIZE, INF),  # ... for either goal
    ([100, 200, 300], [2.0, 1.2, 0.9], 1.2, Goal.MINIMIZE, 200),
    ([100, 200, 300], [2.0, 1.5, 1.3], 1.2, "MINIMIZE", INF),
    ([100, 200, 300], [0.1, INF, 0.2], 1.0, "maximize", 200),
    ([], [], 0.5, 1, INF),
])
def test_steps_to_target(steps, values, target, goal, expected):
    assert steps_to_target(steps, values, target, goal) == expected


def test_steps_to_target_rejects_bad_input():
    with pytest.raises(ValueError, match="length"):
        steps_to_target([1, 2], [0.1], 0.5, Goal.MAXIMIZE)
    with pytest.raises(ValueError, match="non-decreasing"):
        steps_to_target([2, 1], [0.1, 0.2], 0.5, Goal.MAXIMIZE)


@pytest.mark.parametrize("values", [
    [0.759, 0.761, 0.755, 0.762, 0.760],
    [3.0, 1.0, 2.0, 4.0],
    [5.0],
    list(np.random.default_rng(0).normal(0.76, 0.003, size=50)),
])
def test_metric_statistics_match_numpy(values):
    summary = summarize_metric(values)
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    assert summary.count == len(values) and summary.worst == 0
    assert summary.median == pytest.approx(np.median(values), abs=1e-15)
    assert (summary.q25, summary.median, summary.q75) == pytest.approx((q25, median, q75),
                                                                       abs=1e-15)
    assert (summary.min, summary.max) == (min(values), max(values))


@pytest.mark.parametrize("values, q, expected", [
    ([-INF, 0.5, 0.7, 0.9], 0.5, 0.6),  # no infinity between the neighbours
    ([-INF, 0.5, 0.7, 0.9], 0.25, -INF),
    ([-INF, -INF, 0.7, 0.9], 0.25, -INF),  # numpy gives NaN here: -inf + (-inf - -inf) * t
    ([-INF, 0.5, 0.7, 0.9], 0.0, -INF),
    ([-INF, 0.5, 0.7, 0.9], 1 / 3, 0.5),  # weight 0 takes the neighbour itself
    ([0.1, 0.2, INF], 0.75, INF),
    ([INF, INF], 0.5, INF),
])
def test_quantile_is_safe_with_infinite_worst_values(values, q, expected):
    assert quantile(sorted(values), q) == pytest.approx(expected)


def test_summarize_metric_refuses_nan():
    # A missing or NaN metric must be resolved by the caller (a diverged seed is the worst
    # value), never silently dropped: the AlgoPerf bug `x != np.nan` dropped nothing, and
    # dropping diverged seeds favours the optimizer that diverges.
    with pytest.raises(ValueError, match="worst value"):
        summarize_metric([0.7, NAN])
    with pytest.raises(ValueError, match="worst value"):
        summarize_metric([None])
    assert summarize_metric([]).median is None


def test_diverged_seed_counts_at_the_worst_value_and_as_not_reaching():
    summary = summarize_seeds(
        metric_values=[0.77, 0.74, NAN, 0.76, 0.2],
        steps=[2000, INF, 1500, 2400, 100],
        diverged=[False, False, True, False, True],
        worst_value=0.0,
    )
    assert (summary.finished, summary.succeeded, summary.diverged) == (5, 3, 2)
    # The median is over all five seeds, the two diverged ones at accuracy 0:
    # sorted [0, 0, 0.74, 0.76, 0.77] -> 0.74 (dropping them would give 0.76).
    assert summary.metric.count == 5 and summary.metric.worst == 2
    assert summary.metric.median == pytest.approx(0.74)
    assert summary.metric.min == 0.0
    assert summary.values == (0.77, 0.74, 0.0, 0.76, 0.0)
    assert summary.diverged_mask == (False, False, True, False, True)
    assert summary.reached_target == 2  # a diverged seed never reaches, whatever it reported
    assert summary.reached == (True, False, False, True, False)
    assert summary.fraction_reaching_target == pytest.approx(2 / 5)
    assert summary.median_steps_to_target == INF  # 2 of 5 reached: fewer than half


def test_diverged_seed_of_a_minimised_metric_is_infinite():
    summary = summarize_seeds([1.2, 1.0, NAN], [INF, 100, INF], [False, False, True],
                              worst_value=INF)
    assert summary.metric.max == INF and summary.metric.median == pytest.approx(1.2)
    assert summary.metric.q75 == INF  # interpolating towards +inf stays +inf, not NaN


@pytest.mark.parametrize("steps, expected", [
    ([100, 200, 300], 200.0),
    ([100, 200, INF], 200.0),  # 2 of 3 reached: more than half
    ([100, INF, INF], INF),
    ([100, 200, INF, INF], INF),  # exactly half: the median sits between a step and inf
    ([100, 200, 300, INF], 250.0),
])
def test_median_steps_to_target(steps, expected):
    summary = summarize_seeds([0.8] * len(steps), steps, [False] * len(steps), worst_value=0.0)
    assert summary.median_steps_to_target == expected


def test_nan_metric_in_a_finished_seed_counts_as_diverged():
    summary = summarize_seeds([0.8, NAN], [100, 100], [False, False], worst_value=0.0)
    assert (summary.diverged, summary.reached_target) == (1, 1)
    assert summary.metric.median == pytest.approx(0.4)


def test_nothing_finished():
    summary = summarize_seeds([], [], [], worst_value=0.0, abandoned=2, planned=5)
    assert (summary.finished, summary.abandoned, summary.planned) == (0, 2, 5)
    assert summary.fraction_reaching_target is None and summary.median_steps_to_target is None


@pytest.mark.parametrize("metric, goal, worst", [
    ("validation/accuracy", Goal.MAXIMIZE, 0.0),
    ("validation/mlm_accuracy", Goal.MAXIMIZE, 0.0),
    ("validation/f1", Goal.MAXIMIZE, -INF),
    ("validation/loss", Goal.MINIMIZE, INF),
])
def test_worst_value_by_metric(metric, goal, worst):
    assert Target(metric, 0.5, goal).worst_value() == worst


def test_study_score_end_to_end(make_study, simulator):
    simulate, succeed = simulator
    study = make_study(trials_per_study=3, max_total_trials=6, seeds_per_best=4, max_attempts=3)
    steps = {0: 60, 1: INF, 2: 40, 3: 30, 4: INF}
    records, decisions = simulate(
        study, succeed(diverge=frozenset({1}), fail={2: 1}, steps_of=lambda t: steps.get(t, INF),
                       metric_of=lambda t: {0: 0.81, 2: 0.85, 3: 0.83}.get(t, 0.5)))
    score = score_study(study, records)
    assert score.done and score.best_trial == 2
    assert score.best_hyperparameters == study.hyperparameters(2)
    assert (score.seeds.planned, score.seeds.finished, score.seeds.reached_target) == (4, 4, 4)
    assert score.seeds.metric.median == pytest.approx(0.85 + 0.0025)  # replicas add 0.001*r
    effort = score.effort
    assert (effort.total_trials, effort.feasible_trials, effort.diverged_trials) == (4, 3, 1)
    assert effort.failed_attempts == 1 and effort.runs == len(records) == 4 + 1 + 4
    # Successful runs use the whole budget (100); failed and diverged ones 7 steps (simulator).
    assert effort.tuning_steps == 3 * 100 + 2 * 7 and effort.rerun_steps == 4 * 100
    assert effort.total_examples == effort.total_steps * 128
    assert decisions[-1].best_trial == score.best_trial


def test_study_score_with_a_diverged_rerun(make_study):
    study = make_study(trials_per_study=1, seeds_per_best=3)
    metric = "validation/accuracy"
    a, b, c = study.rerun_seeds(0)
    records = [
        RunRecord(0, study.tuning_seed(0), Outcome.SUCCEEDED, {metric: 0.9}, 50, 100),
        RunRecord(0, a, Outcome.SUCCEEDED, {metric: 0.85}, 60, 100),
        RunRecord(0, b, Outcome.DIVERGED, {}, None, 30),
        RunRecord(0, c, Outcome.SUCCEEDED, {metric: 0.7}, None, 100),
    ]
    score = score_study(study, records)
    assert (score.seeds.diverged, score.seeds.succeeded, score.seeds.reached_target) == (1, 2, 1)
    # Counted, not dropped: [0.0 (diverged), 0.7, 0.85] -> 0.7 (dropping it gave 0.775).
    assert score.seeds.metric.median == pytest.approx(0.7)
    assert score.seeds.median_steps_to_target == INF


def test_end_of_budget_reading_needs_the_target_held_to_the_end(make_study):
    first = make_study(trials_per_study=1, seeds_per_best=2)
    held = dataclasses.replace(first, target=dataclasses.replace(
        first.target, reading=TargetReading.END_OF_BUDGET))
    metric = "validation/accuracy"
    dipped = [{"step": 10, metric: 0.85}, {"step": 20, metric: 0.7}]
    stayed = [{"step": 10, metric: 0.7}, {"step": 20, metric: 0.82}, {"step": 30, metric: 0.9}]

    def records(study):
        a, b = study.rerun_seeds(0)
        return [RunRecord(0, study.tuning_seed(0), Outcome.SUCCEEDED, {metric: 0.9}, 30, 30,
                          curve=stayed),
                RunRecord(0, a, Outcome.SUCCEEDED, {metric: 0.7}, 10, 20, curve=dipped),
                RunRecord(0, b, Outcome.SUCCEEDED, {metric: 0.9}, 20, 30, curve=stayed)]

    # First evaluation: both reruns met 0.8 at some evaluation (steps 10 and 20).
    assert score_study(first, records(first)).seeds.steps == (10.0, 20.0)
    # End of budget: the dip to 0.7 means the first rerun did not reach it; the second held
    # it from step 20 to the end.
    seeds = score_study(held, records(held)).seeds
    assert seeds.reached == (False, True) and seeds.steps == (INF, 20.0)
    assert held_steps(stayed, held.target) == 20.0
    assert held_steps(dipped, held.target) == INF


def test_tuning_trials_carry_worst_values_for_diverged_ones(make_study, simulator):
    simulate, succeed = simulator
    study = make_study(trials_per_study=3, max_total_trials=6, seeds_per_best=1)
    records, _ = simulate(study, succeed(diverge=frozenset({1}),
                                         metric_of=lambda t: 0.5 + 0.1 * t))
    tuning = score_study(study, records).tuning
    assert [t.trial_index for t in tuning] == [0, 1, 2, 3]
    assert [t.diverged for t in tuning] == [False, True, False, False]
    assert tuning[1].value == 0.0 and tuning[1].counted is False
    assert [t.counted for t in tuning] == [True, False, True, True]


def test_to_dict_is_json_with_inf_as_a_string(make_study):
    study = make_study(trials_per_study=1, seeds_per_best=1)
    records = [RunRecord(0, study.tuning_seed(0), Outcome.SUCCEEDED, {"validation/accuracy": 0.5}),
               RunRecord(0, study.rerun_seeds(0)[0], Outcome.SUCCEEDED,
                         {"validation/accuracy": 0.6})]
    data = score_study(study, records).to_dict()
    text = json.dumps(data, allow_nan=False)  # no NaN or Infinity tokens
    assert data["seeds"]["median_steps_to_target"] == "inf"
    assert float(data["seeds"]["median_steps_to_target"]) == INF
    assert json.loads(text)["target"] == {"metric": "validation/accuracy", "value": 0.8,
                                          "goal": "MAXIMIZE", "reading": "FIRST_EVALUATION",
                                          "equivalence_margin": pytest.approx(0.008),
                                          "fraction_margin": 0.25}


def test_score_before_tuning_is_complete(make_study):
    study = make_study()
    score = score_study(study, [])
    assert not score.done and score.phase == "tuning" and score.best_trial is None
    assert score.seeds.planned == 0 and score.seeds.metric.count == 0
