"""Search-space diagnostics: each fires on a constructed case and stays silent on a clean one."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest

from batchlab.search import spec
from batchlab.search.compare import Arm, Interval, PairVerdict, Verdict, compare_arms
from batchlab.search.diagnostics import (
    EDGE_FRACTION,
    replicate_spread_diagnostic,
    spec_diagnostics,
    study_diagnostics,
)
from batchlab.search.protocol import Outcome
from batchlab.search.scoring import score_study
from batchlab.search.study import Goal, trial_point

DATA = Path(__file__).parent / "data"
OLD_SHOWCASE = DATA / "cpu_reality_check_2025.yaml"


def _codes(found):
    return [d.code for d in found]


def _lars_spec(base_spec, *, tie: bool):
    data = copy.deepcopy(base_spec)
    data["trials_per_study"] = 12
    data["max_total_trials"] = 16
    data["seeds_per_best"] = 5
    data["search_replicates"] = 2
    group = {"momentum": 0.9, "learning_rate": {"schedule": "cosine", "peak_value": 1.0}}
    lr = {"path": "optimizer.weights.learning_rate.peak_value", "log": {"min": 1.0, "max": 50.0}}
    parameters = [lr, {"path": "optimizer.weights.momentum", "tied_paths":
                       ["optimizer.bias_bn.momentum"], "log": {"min": 0.01, "max": 0.3},
                       "one_minus": True}]
    if tie:
        lr["tied_paths"] = ["optimizer.bias_bn.learning_rate.peak_value"]
    else:
        parameters.append({"path": "optimizer.bias_bn.learning_rate.peak_value",
                           "log": {"min": 0.01, "max": 3.0}})
    data["optimizers"] = [{
        "name": "lars_pipeline",
        "config": {"weights": {"optimizer": "lars", **group},
                   "bias_bn": {"optimizer": "heavy_ball", **copy.deepcopy(group)}},
        "search_space": {"parameters": parameters}}]
    return spec.load_spec(data)


def test_spec_check_warns_on_the_old_showcase_tied_learning_rate():
    found = spec_diagnostics(spec.load_spec(OLD_SHOWCASE))
    tied = [d for d in found if d.code == "tied-across-kinds"]
    assert [d.where for d in tied] == ["optimizers[1].search_space.parameters[0]",
                                       "optimizers[3].search_space.parameters[0]"]
    assert "weights (LARS), bias_bn (momentum)" in tied[0].message
    assert "weights (LAMB), bias_bn (Adam)" in tied[1].message
    # Its 8 trials over 4 dimensions are flagged too, and the resolution across batch sizes.
    assert "few-trials-per-dimension" in _codes(found)
    assert "eval-resolution-differs" in _codes(found)


def test_spec_check_command_prints_the_warning_and_exits_zero():
    done = subprocess.run([sys.executable, "-m", "batchlab.cli", "spec", "check",
                           str(OLD_SHOWCASE)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "[tied-across-kinds] optimizers[1].search_space.parameters[0]" in done.stdout
    strict = subprocess.run([sys.executable, "-m", "batchlab.cli", "spec", "check", "--strict",
                             str(OLD_SHOWCASE)], capture_output=True, text=True, timeout=300)
    assert strict.returncode == 1


def test_tied_learning_rate_fires_and_a_separate_one_is_clean(base_spec):
    assert "tied-across-kinds" in _codes(spec_diagnostics(_lars_spec(base_spec, tie=True)))
    assert spec_diagnostics(_lars_spec(base_spec, tie=False)) == []


def test_tied_schedule_shape_and_same_kind_ties_are_fine(base_spec):
    data = copy.deepcopy(base_spec)
    data["trials_per_study"] = 12
    data["max_total_trials"] = 12
    data["seeds_per_best"] = 5
    data["search_replicates"] = 2
    group = {"optimizer": "nesterov", "momentum": 0.9,
             "learning_rate": {"schedule": "piecewise_polynomial", "peak_value": 1.0,
                               "warmup_steps": 5}}
    data["optimizers"] = [{
        "name": "nesterov", "config": {"weights": group, "bias_bn": copy.deepcopy(group)},
        "search_space": {"parameters": [
            {"path": "optimizer.weights.learning_rate.peak_value",
             "tied_paths": ["optimizer.bias_bn.learning_rate.peak_value"],
             "log": {"min": 0.01, "max": 3.0}},
            {"path": "optimizer.weights.learning_rate.warmup_power",
             "tied_paths": ["optimizer.bias_bn.learning_rate.warmup_power"],
             "linear": {"min": 0.5, "max": 3.0}}]}}]
    assert spec_diagnostics(spec.load_spec(data)) == []
    lars = copy.deepcopy(data)
    lars["optimizers"][0]["config"]["weights"]["optimizer"] = "lars"
    lars["optimizers"][0]["search_space"]["parameters"].pop(0)
    assert spec_diagnostics(spec.load_spec(lars)) == []  # warmup power: shape, not scale


def test_few_trials_per_dimension_and_few_seeds(base_spec):
    data = copy.deepcopy(base_spec)  # 4 trials over 2 dimensions, 3 seeds, one replicate
    codes = _codes(spec_diagnostics(spec.load_spec(data)))
    assert codes == ["few-trials-per-dimension", "few-seeds", "single-replicate"]
    data.update(trials_per_study=8, max_total_trials=8, seeds_per_best=5, search_replicates=2)
    assert spec_diagnostics(spec.load_spec(data)) == []


def test_evaluation_resolution_in_examples_is_clean(base_spec):
    data = copy.deepcopy(base_spec)
    data.update(trials_per_study=8, max_total_trials=8, seeds_per_best=5, search_replicates=2)
    data["workloads"][0]["points"].append({"batch_size": 512, "step_budget": 50})
    assert _codes(spec_diagnostics(spec.load_spec(data))) == ["eval-resolution-differs"]
    del data["workloads"][0]["eval_every_steps"]
    data["workloads"][0]["eval_every_examples"] = 2048
    assert spec_diagnostics(spec.load_spec(data)) == []


def _scored(study, simulator, best_trial, *, diverge=frozenset(), steps_of=None):
    simulate, succeed = simulator
    records, _ = simulate(study, succeed(
        metric_of=lambda t: 0.9 if t == best_trial else 0.5 + 0.001 * t, diverge=diverge,
        steps_of=steps_of or (lambda t: 100 if t == best_trial else math.inf)))
    score = score_study(study, records)
    assert score.best_trial == best_trial
    return score


def _trial_with(study, predicate):
    return next(i for i in range(study.trials_per_study) if predicate(trial_point(study, i)[0]))


def test_best_at_the_edge_of_a_log_range(make_study, simulator):
    study = make_study(trials_per_study=8, max_total_trials=8, seeds_per_best=1)
    edge = _trial_with(study, lambda u: u < EDGE_FRACTION or u >= 1 - EDGE_FRACTION)
    flags = study_diagnostics(study, _scored(study, simulator, edge))
    assert "best-at-edge" in [f.code for f in flags]
    assert any("learning_rate.peak_value" in f.message and "log scale" in f.message
               for f in flags)
    inside = next(i for i in range(8) if all(EDGE_FRACTION < u < 1 - EDGE_FRACTION
                                             for u in trial_point(study, i)))
    assert study_diagnostics(study, _scored(study, simulator, inside)) == []


def test_best_at_an_extreme_discrete_choice(make_study, simulator, base_spec):
    data = copy.deepcopy(base_spec)
    data.update(trials_per_study=6, max_total_trials=6, seeds_per_best=1)
    data["optimizers"][0]["search_space"]["parameters"] = [
        {"path": "optimizer.learning_rate.peak_value", "discrete": {"values": [0.01, 0.1, 1.0]}}]
    (study,) = spec.expand_studies(spec.load_spec(data))
    values = {i: study.hyperparameters(i)["optimizer"]["learning_rate"]["peak_value"]
              for i in range(6)}
    top = next(i for i, v in values.items() if v == 1.0)
    middle = next(i for i, v in values.items() if v == 0.1)
    assert [f.code for f in study_diagnostics(study, _scored(study, simulator, top))] == [
        "best-at-edge"]
    assert study_diagnostics(study, _scored(study, simulator, middle)) == []


def test_mostly_diverged_and_target_never_reached(make_study, simulator):
    study = make_study(trials_per_study=3, max_total_trials=9, seeds_per_best=1)
    score = _scored(study, simulator, 4, diverge=frozenset({0, 1, 2, 3}),
                    steps_of=lambda t: math.inf)
    assert [t.trial_index for t in score.tuning] == [0, 1, 2, 3, 4, 5, 6]
    codes = [f.code for f in study_diagnostics(study, score)]
    assert "mostly-diverged" in codes and "target-never-reached" in codes
    clean = _scored(study, simulator, 1)
    codes = [f.code for f in study_diagnostics(study, clean)]
    assert "mostly-diverged" not in codes and "target-never-reached" not in codes


def test_best_not_reproduced_by_its_reruns(make_study, simulator):
    simulate, succeed = simulator
    study = make_study(trials_per_study=3, max_total_trials=3, seeds_per_best=3)

    def collapsing(best_rerun_value):
        def outcome_of(trial, replica, attempt, seed):
            value = 0.9 if trial == 1 else 0.6 + 0.01 * trial
            if replica > 0:
                value = best_rerun_value
            return Outcome.SUCCEEDED, value, math.inf
        return outcome_of

    collapsed, _ = simulate(study, collapsing(0.5))  # 0.9 in tuning, 0.5 in every rerun
    flags = study_diagnostics(study, score_study(study, collapsed))
    assert [f.code for f in flags if f.code == "best-not-reproduced"] == ["best-not-reproduced"]
    assert "0.9 in tuning but 0.5" in next(f.message for f in flags
                                            if f.code == "best-not-reproduced")
    # A shortfall within 5 margins (0.008 each for a 0.8 target) is the usual winner's curse.
    usual, _ = simulate(study, collapsing(0.87))
    assert "best-not-reproduced" not in [
        f.code for f in study_diagnostics(study, score_study(study, usual))]


def test_a_study_selecting_by_steps_is_judged_on_steps(make_study, simulator):
    simulate, _ = simulator
    study = make_study(trials_per_study=3, max_total_trials=3, seeds_per_best=3,
                       selection="FEWEST_STEPS_TO_TARGET")
    period = study.eval_every_steps

    def reruns_at(rerun_steps):
        def outcome_of(trial, replica, attempt, seed):
            # Trial 1 is fastest in tuning (2 periods); its reruns take rerun_steps. Under
            # stop_at_target the final metric is the one at the stopping evaluation: the
            # tuning run's overshoot (0.95) against the reruns' 0.81 says nothing here.
            steps = 2 * period if trial == 1 else 4 * period
            value = 0.95 if replica == 0 else 0.81
            return Outcome.SUCCEEDED, value, rerun_steps if replica > 0 else steps
        return outcome_of

    def flags(rerun_steps):
        records, _ = simulate(study, reruns_at(rerun_steps))
        return [f for f in study_diagnostics(study, score_study(study, records))
                if f.code == "best-not-reproduced"]

    # One evaluation period later is the measurement's resolution: not flagged, although the
    # final metric fell by far more than 5 margins.
    assert flags(3 * period) == []
    (late,) = flags(4 * period)
    assert f"in {2 * period:g} steps in tuning" in late.message
    assert f"their median is {4 * period:g} steps" in late.message
    (never,) = flags(math.inf)
    assert "never reached it" in never.message
    # Reruns faster than the tuning run: nothing to flag.
    assert flags(period) == []


def test_a_study_selecting_by_steps_whose_trials_never_reached_falls_back_to_the_metric(
        make_study, simulator):
    simulate, _ = simulator
    study = make_study(trials_per_study=3, max_total_trials=3, seeds_per_best=3,
                       selection="FEWEST_STEPS_TO_TARGET")

    def outcome_of(trial, replica, attempt, seed):
        # No run reaches the target; trial 1 is best on the metric, its reruns collapse.
        value = (0.7 if trial == 1 else 0.5) if replica == 0 else 0.3
        return Outcome.SUCCEEDED, value, math.inf

    records, _ = simulate(study, outcome_of)
    (flag,) = [f for f in study_diagnostics(study, score_study(study, records))
               if f.code == "best-not-reproduced"]
    assert "0.7 in tuning but 0.3" in flag.message


def _verdict(a_medians, b_medians, estimate):
    interval = Interval(estimate, estimate - 0.001, estimate + 0.001, 0.001, Verdict.A_AHEAD)
    matched = Interval(0.0, 0.0, 0.0, 0.25, Verdict.MATCHED)
    return PairVerdict("a", "b", 10, 10, interval, matched, Verdict.A_AHEAD, "",
                       a_medians, b_medians)


def test_replicate_spread_flag():
    # A ahead by 0.02 with replicate medians within 0.001 of each other: a solid win.
    assert replicate_spread_diagnostic(_verdict((0.95, 0.951), (0.93, 0.931), 0.02)) is None
    # The same margin when one optimizer's two searches ended 0.03 apart: luck could flip it.
    flag = replicate_spread_diagnostic(_verdict((0.95, 0.92), (0.93, 0.931), 0.02))
    assert flag is not None and flag.code == "margin-within-replicate-spread"
    assert "0.03" in flag.message
    # One replicate: the spread is unknown, and spec_diagnostics says so instead.
    assert replicate_spread_diagnostic(_verdict((0.95,), (0.93,), 0.02)) is None
    # Computed from real arms: compare_arms carries each replicate's median.
    lucky = compare_arms(Arm("a", ((0.95,) * 5, (0.92,) * 5), ((True,) * 5,) * 2),
                         Arm("b", ((0.93,) * 5, (0.93,) * 5), ((True,) * 5,) * 2),
                         goal=Goal.MAXIMIZE, metric_margin=0.001, fraction_margin=0.25)
    assert lucky.replicate_medians_a == (0.95, 0.92)


@pytest.mark.parametrize("path", sorted(Path("experiments").rglob("*.yaml")))
def test_every_shipped_spec_can_be_checked(path):
    loaded = spec.load_spec(path)
    for diagnostic in spec_diagnostics(loaded):
        assert diagnostic.where and diagnostic.message
