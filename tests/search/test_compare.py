"""Bootstrap verdicts on synthetic seeds with known answers, and the expected best after k trials."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from batchlab.search.compare import (
    MIN_SEEDS,
    Arm,
    Verdict,
    combine,
    compare_arms,
    decide,
)
from batchlab.search.scoring import expected_best
from batchlab.search.study import Goal

MARGIN, FRACTION = 0.005, 0.25


def _arm(label, *replicates, target=0.9, goal=Goal.MAXIMIZE):
    values = tuple(tuple(float(v) for v in r) for r in replicates)
    reached = tuple(tuple((v >= target) if goal is Goal.MAXIMIZE else (v <= target) for v in r)
                    for r in values)
    return Arm(label, values, reached)


def _seeds(mean, std, n, seed):
    return np.random.default_rng(seed).normal(mean, std, size=n)


def test_clearly_different_arms_put_the_better_one_ahead():
    a = _arm("a", _seeds(0.95, 0.003, 7, 0), _seeds(0.951, 0.003, 7, 1))
    b = _arm("b", _seeds(0.92, 0.003, 7, 2), _seeds(0.921, 0.003, 7, 3))
    verdict = compare_arms(a, b, goal=Goal.MAXIMIZE, metric_margin=MARGIN,
                           fraction_margin=FRACTION)
    assert verdict.verdict is Verdict.A_AHEAD and verdict.named == "`a` ahead"
    assert verdict.metric.verdict is Verdict.A_AHEAD
    # Two replicates per arm: the interval also covers Welch's t over the replicate medians.
    assert 0.015 < verdict.metric.low < verdict.metric.estimate < verdict.metric.high < 0.045
    assert verdict.fraction.verdict is Verdict.MATCHED  # every seed of both reaches 0.9
    # Swapping the arms swaps the verdict.
    swapped = compare_arms(b, a, goal=Goal.MAXIMIZE, metric_margin=MARGIN,
                           fraction_margin=FRACTION)
    assert swapped.verdict is Verdict.B_AHEAD
    assert swapped.metric.estimate == pytest.approx(-verdict.metric.estimate)


def test_identical_arms_are_matched():
    seeds = _seeds(0.95, 0.002, 7, 4)
    a, b = _arm("a", seeds), _arm("b", seeds)
    verdict = compare_arms(a, b, goal=Goal.MAXIMIZE, metric_margin=MARGIN,
                           fraction_margin=FRACTION)
    assert verdict.verdict is Verdict.MATCHED
    assert -MARGIN <= verdict.metric.low <= 0 <= verdict.metric.high <= MARGIN
    assert verdict.metric.estimate == 0.0


def test_equal_distributions_with_noise_are_matched_when_precise_enough():
    # Three replicates per arm: two leave too few degrees of freedom to show equivalence
    # within 0.005 unless the replicates agree very closely.
    a = _arm("a", _seeds(0.95, 0.001, 7, 5), _seeds(0.95, 0.001, 7, 6), _seeds(0.95, 0.001, 7, 11))
    b = _arm("b", _seeds(0.95, 0.001, 7, 7), _seeds(0.95, 0.001, 7, 8), _seeds(0.95, 0.001, 7, 12))
    assert compare_arms(a, b, goal=Goal.MAXIMIZE, metric_margin=MARGIN,
                        fraction_margin=FRACTION).verdict is Verdict.MATCHED


def test_noisy_small_difference_is_not_enough_evidence():
    # A 0.004 difference with seed noise of 0.02: the interval straddles 0 and the margin.
    a = _arm("a", _seeds(0.954, 0.02, 7, 9))
    b = _arm("b", _seeds(0.950, 0.02, 7, 10))
    verdict = compare_arms(a, b, goal=Goal.MAXIMIZE, metric_margin=MARGIN,
                           fraction_margin=FRACTION)
    assert verdict.metric.verdict is Verdict.NOT_ENOUGH_EVIDENCE
    assert verdict.verdict is Verdict.NOT_ENOUGH_EVIDENCE


def test_too_few_seeds_is_never_a_verdict():
    few = _seeds(0.95, 0.0, MIN_SEEDS - 1, 11)
    a = _arm("a", few + 0.05)
    b = _arm("b", _seeds(0.90, 0.0, 7, 12))
    verdict = compare_arms(a, b, goal=Goal.MAXIMIZE, metric_margin=MARGIN,
                           fraction_margin=FRACTION)
    assert verdict.verdict is Verdict.NOT_ENOUGH_EVIDENCE
    assert "too few seeds" in verdict.reason
    assert math.isnan(verdict.metric.low) and verdict.metric.estimate == pytest.approx(0.1)


def test_a_minimised_metric_orients_the_difference():
    a = _arm("a", _seeds(1.0, 0.01, 7, 13), target=1.2, goal=Goal.MINIMIZE)
    b = _arm("b", _seeds(1.5, 0.01, 7, 14), target=1.2, goal=Goal.MINIMIZE)
    verdict = compare_arms(a, b, goal=Goal.MINIMIZE, metric_margin=0.05,
                           fraction_margin=FRACTION)
    assert verdict.metric.verdict is Verdict.A_AHEAD and verdict.metric.estimate > 0.45


def test_diverged_seeds_at_the_worst_value_count_against_their_arm():
    # Same good seeds, but b diverged on 3 of 7 (accuracy 0): never matched (dropping the
    # diverged seeds would make it so); on 4 of 7 its median is the worst value: b is behind.
    good = list(_seeds(0.95, 0.002, 7, 15))
    a = _arm("a", good)
    three = compare_arms(a, _arm("b", good[:4] + [0.0] * 3), goal=Goal.MAXIMIZE,
                         metric_margin=MARGIN, fraction_margin=FRACTION)
    assert three.verdict is not Verdict.MATCHED
    assert three.fraction.estimate == pytest.approx(3 / 7)
    four = compare_arms(a, _arm("b", good[:3] + [0.0] * 4), goal=Goal.MAXIMIZE,
                        metric_margin=MARGIN, fraction_margin=FRACTION)
    assert four.verdict is Verdict.A_AHEAD


def test_arms_that_both_diverged_everywhere_are_not_called_matched():
    dead = _arm("a", [0.0] * 7)
    verdict = compare_arms(dead, _arm("b", [0.0] * 7), goal=Goal.MAXIMIZE, metric_margin=MARGIN,
                           fraction_margin=FRACTION, worst=0.0)
    assert verdict.verdict is Verdict.NOT_ENOUGH_EVIDENCE
    assert "worst value" in verdict.reason


def test_tuning_luck_across_replicates_is_in_the_interval():
    # Two identical optimizers whose search replicates landed at different levels (tuning
    # luck, sd 0.01) with tight seeds (sd 0.002). Resampling seeds only within fixed replicates
    # called most such pairs "ahead" (230 of 300 in a review's simulation); the two-stage
    # bootstrap with the replicate-level Welch cover keeps false verdicts rare.
    rng = np.random.default_rng(7)
    wrong = 0
    pairs = 60
    for i in range(pairs):
        arms = []
        for label in ("a", "b"):
            groups = tuple(tuple(0.95 + rng.normal(0, 0.01) + rng.normal(0, 0.002, 7))
                           for _ in range(2))
            arms.append(Arm(label, groups, tuple((True,) * 7 for _ in groups)))
        verdict = compare_arms(*arms, goal=Goal.MAXIMIZE, metric_margin=0.005,
                               fraction_margin=FRACTION, samples=2000, context=str(i))
        wrong += verdict.verdict in (Verdict.A_AHEAD, Verdict.B_AHEAD)
    assert wrong <= 0.1 * pairs, f"{wrong} of {pairs} identical pairs called ahead"


def test_the_context_seeds_independent_resamples():
    a = _arm("a", list(_seeds(0.95, 0.01, 25, 1)))
    b = _arm("b", list(_seeds(0.95, 0.01, 25, 2)))
    kwargs = dict(goal=Goal.MAXIMIZE, metric_margin=MARGIN, fraction_margin=FRACTION)
    same = [compare_arms(a, b, context="p1", **kwargs).metric for _ in range(2)]
    other = compare_arms(a, b, context="p2", **kwargs).metric
    assert same[0] == same[1]
    assert (other.low, other.high) != (same[0].low, same[0].high)


def test_infinite_worst_values_give_no_nan():
    a = _arm("a", [1.0, 1.1, 1.0, 1.2, 1.1], target=1.5, goal=Goal.MINIMIZE)
    b = _arm("b", [1.0, math.inf, math.inf, math.inf, 1.1], target=1.5, goal=Goal.MINIMIZE)
    verdict = compare_arms(a, b, goal=Goal.MINIMIZE, metric_margin=0.05,
                           fraction_margin=FRACTION)
    assert not math.isnan(verdict.metric.low) and not math.isnan(verdict.metric.high)
    assert verdict.verdict is Verdict.A_AHEAD


def test_the_same_inputs_give_the_same_interval():
    a = _arm("a", _seeds(0.95, 0.01, 7, 16))
    b = _arm("b", _seeds(0.94, 0.01, 7, 17))
    first = compare_arms(a, b, goal=Goal.MAXIMIZE, metric_margin=MARGIN,
                         fraction_margin=FRACTION)
    assert compare_arms(a, b, goal=Goal.MAXIMIZE, metric_margin=MARGIN,
                        fraction_margin=FRACTION) == first


@pytest.mark.parametrize("low, high, expected", [
    (-0.004, 0.004, Verdict.MATCHED),
    (0.001, 0.004, Verdict.MATCHED),  # significant but practically equivalent
    (0.001, 0.02, Verdict.A_AHEAD),
    (-0.02, -0.001, Verdict.B_AHEAD),
    (-0.001, 0.02, Verdict.NOT_ENOUGH_EVIDENCE),
])
def test_decide_against_the_margin(low, high, expected):
    assert decide(low, high, 0.005) is expected


def test_combine_needs_both_for_matched_and_no_contradiction():
    m, a, b, n = (Verdict.MATCHED, Verdict.A_AHEAD, Verdict.B_AHEAD,
                  Verdict.NOT_ENOUGH_EVIDENCE)
    assert combine(m, m) is m
    assert combine(a, m) is a and combine(m, a) is a and combine(a, n) is a
    assert combine(b, m) is b
    assert combine(a, b) is n and combine(m, n) is n and combine(n, n) is n


def test_coverage_of_the_interval_on_a_known_difference():
    # 200 experiments with a true median difference of 0.01: the 95% interval should contain it
    # in most of them (percentile bootstraps of a median under-cover a little at n = 14).
    covered = 0
    for trial in range(200):
        a = _arm("a", _seeds(0.96, 0.01, 7, 1000 + trial), _seeds(0.96, 0.01, 7, 2000 + trial))
        b = _arm(f"b{trial}", _seeds(0.95, 0.01, 7, 3000 + trial),
                 _seeds(0.95, 0.01, 7, 4000 + trial))
        v = compare_arms(a, b, goal=Goal.MAXIMIZE, metric_margin=MARGIN,
                         fraction_margin=FRACTION, samples=2000)
        covered += v.metric.low <= 0.01 <= v.metric.high
    assert covered >= 170


@pytest.mark.parametrize("values", [[0.3, 0.9, 0.5], [0.1, 0.1, 0.7, 0.2], [0.42]])
@pytest.mark.parametrize("goal", [Goal.MAXIMIZE, Goal.MINIMIZE])
def test_expected_best_equals_brute_force_over_all_draws(values, goal):
    best = max if goal is Goal.MAXIMIZE else min
    mean, std = expected_best(values, goal)
    for k in range(1, len(values) + 1):
        draws = [best(c) for c in itertools.product(values, repeat=k)]
        assert mean[k - 1] == pytest.approx(np.mean(draws))
        assert std[k - 1] == pytest.approx(np.std(draws), abs=1e-7)


def test_expected_best_starts_at_the_mean_and_ends_below_the_best():
    values = [0.5, 0.7, 0.9, 0.6]
    mean, _ = expected_best(values, Goal.MAXIMIZE)
    assert mean[0] == pytest.approx(np.mean(values))
    assert np.all(np.diff(mean) > 0) and mean[-1] < 0.9
