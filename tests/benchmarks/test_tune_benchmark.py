"""The batchlab-vs-Ray-Tune benchmark (benchmarks/tune.py): its fairness check catches a trial
whose numbers differ, and its quick run drives all three paths over the protocol's trials with
identical numbers and renders the ratios against Tune."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from batchlab.runner.store import ResultStore
from batchlab.search import RunKind, RunRequest, expand_studies, load_spec
from benchmarks import tune as bench


def _result(accuracy: float) -> dict:
    return {"outcome": "SUCCEEDED", "curve": [{"step": 30.0, "validation/accuracy": accuracy}],
            "final_metrics": {"validation/accuracy": accuracy}, "steps_to_target": 30,
            "diverged_step": None, "wall_time_s": 1.0}


def _measured(accuracies: dict[str, float]) -> tuple[dict, list[dict]]:
    """A round where every path stored the same numbers for trials {key: accuracy}."""
    local = {key: {"request": {"trial_index": int(key[1]), "replica": 0, "seed": 7 + int(key[1]),
                               "hyperparameters": {}},
                   "result": _result(acc)} for key, acc in accuracies.items()}
    tune = {"trials": [{"key": key, "result": _result(acc)} for key, acc in accuracies.items()]}
    services = {key: {"final_metrics": {"validation/accuracy": acc}, "outcome": "SUCCEEDED",
                      "steps_to_target": 30} for key, acc in accuracies.items()}
    round_ = {"round": 0, "local": {"cold": local, "warm": copy.deepcopy(local)},
              "tune": {"cold": tune, "warm": copy.deepcopy(tune)},
              "services": {"cold": services, "warm": copy.deepcopy(services)}}
    return local, [round_]


def test_the_fairness_check_passes_identical_numbers_and_names_any_that_differ():
    reference, measured = _measured({"t0_r0": 0.565, "t1_r0": 0.8275})
    fair = bench._fairness(reference, measured)
    assert fair["identical"] and fair["compared"] == 12 and fair["mismatches"] == []
    assert [(t["key"], t["local"], t["tune"], t["services"]) for t in fair["first_round"]] == [
        ("t0_r0", 0.565, 0.565, 0.565), ("t1_r0", 0.8275, 0.8275, 0.8275)]

    # One ulp in one Tune run's final metric, and a services trial with another outcome.
    measured[0]["tune"]["warm"]["trials"][1]["result"]["final_metrics"]["validation/accuracy"] = float(
        np.nextafter(0.8275, 1.0))
    measured[0]["services"]["cold"]["t0_r0"]["outcome"] = "DIVERGED"
    fair = bench._fairness(reference, measured)
    assert not fair["identical"]
    assert fair["mismatches"] == ["round 0 services cold t0_r0", "round 0 tune warm t1_r0"]


def test_tunes_waits_are_measured_from_the_slot_becoming_free():
    # Two slots: trials a and b start 1 s and 2 s after the fit; c takes the slot a freed at 5 s.
    fit = {"fit_start": 100.0, "fit_end": 110.5, "trials": [
        {"pid": 1, "entered_at": 101.0, "ready_at": 103.0, "ended_at": 105.0},
        {"pid": 2, "entered_at": 102.0, "ready_at": 103.5, "ended_at": 107.0},
        {"pid": 3, "entered_at": 106.0, "ready_at": 107.0, "ended_at": 110.0},
    ]}
    waits = bench._tune_waits(fit, parallel=2)
    assert waits == {"start_wait_sum_s": 1.0 + 2.0 + 1.0, "set_up_sum_s": 2.0 + 1.5 + 1.0,
                     "trial_span_sum_s": 4.0 + 5.0 + 4.0, "wind_down_s": 0.5, "processes": 3}


def test_stored_runs_keep_the_last_attempt_tuning_first_in_trial_order(tmp_path):
    store = ResultStore(tmp_path)

    def request(trial: int, replica: int, attempt: int) -> RunRequest:
        kind = RunKind.TUNING if replica == 0 else RunKind.RERUN
        return RunRequest("s", kind, trial, replica, 10 * trial + replica, attempt, {}, 64, 60, 30)

    for trial, replica, attempt, outcome in [(10, 0, 1, "SUCCEEDED"), (2, 1, 1, "SUCCEEDED"),
                                             (2, 0, 1, "FAILED"), (2, 0, 2, "SUCCEEDED")]:
        store.write_run(request(trial, replica, attempt), {"outcome": outcome})
    runs = bench._stored_runs(tmp_path)
    assert list(runs) == ["t2_r0", "t10_r0", "t2_r1"]
    assert runs["t2_r0"]["request"]["attempt"] == 2 and runs["t2_r0"]["result"]["outcome"] == "SUCCEEDED"


@pytest.mark.parametrize("parallel", [1, 2, 3, 16])
def test_the_study_fills_the_slots_in_whole_waves(parallel):
    # The protocol starts reruns only after tuning; Tune gets the list whole. In whole waves of
    # P neither gains from that (see the module docstring).
    spec = bench.spec(parallel=parallel)
    assert spec["trials_per_study"] == spec["max_total_trials"] == 2 * parallel
    assert spec["seeds_per_best"] == parallel
    (study,) = expand_studies(load_spec(spec))
    assert study.step_budget == 150 and study.eval_every_steps == 50  # system.SPEC's point
    quick = bench.spec(quick=True, parallel=parallel)
    assert (quick["trials_per_study"], quick["seeds_per_best"]) == (2, 0)
    assert (bench.SPEC["trials_per_study"], bench.SPEC["seeds_per_best"]) == (4, 2)


@pytest.fixture(scope="module")
def quick_run():
    return bench.run(rounds=1, quick=True)


@pytest.mark.slow
def test_the_quick_run_measures_every_path_cold_and_warm(quick_run):
    figures = quick_run["figures"]
    assert set(figures) == {f"{p}_{phase}" for p in bench.PATHS for phase in ("cold", "warm")}
    for name, fig in figures.items():
        assert fig["runs"] == 2, name
        assert fig["median_s"] > 0 and len(fig["wall_s"]) == 1, name
        assert fig["runs_per_hour"] == pytest.approx(2 * 3600 / fig["median_s"]), name
    for path in ("services", "local"):
        for phase in ("cold", "warm"):
            assert quick_run["ratios"][f"{path}_over_tune_{phase}"] == pytest.approx(
                figures[f"{path}_{phase}"]["median_s"] / figures[f"tune_{phase}"]["median_s"])
    cold_tune = quick_run["breakdown"][0]["cold"]["tune"]
    assert cold_tune["runs"] == 2 and cold_tune["ray_start_s"] > 0 and cold_tune["startup_time_s_sum_s"] > 0
    # The same P on every path: batchlab's plan for this machine.
    assert quick_run["setup"]["parallel"] >= 1


@pytest.mark.slow
def test_tune_ran_the_protocols_trials_with_the_same_numbers(quick_run):
    fair = quick_run["fairness"]
    assert fair["mismatches"] == [] and fair["identical"]
    assert fair["compared"] == 3 * 2 * 2  # three paths, cold and warm, two runs
    (study,) = expand_studies(load_spec(bench.spec(quick=True)))
    assert [t["key"] for t in fair["first_round"]] == ["t0_r0", "t1_r0"]
    for index, trial in enumerate(fair["first_round"]):
        assert trial["seed"] == study.tuning_seed(index)
        assert trial["hyperparameters"] == study.hyperparameters(index)
        assert isinstance(trial["local"], float) and 0.0 <= trial["local"] <= 1.0
        assert trial["tune"] == trial["local"] and trial["services"] == trial["local"]


@pytest.mark.slow
def test_the_markdown_renders_the_ratio_rows_and_the_fairness_check(quick_run):
    md = bench.to_markdown(quick_run)
    ratios = quick_run["ratios"]
    for label, key in [("services / Tune, cold", "services_over_tune_cold"),
                       ("services / Tune, warm", "services_over_tune_warm"),
                       ("local / Tune, cold", "local_over_tune_cold"),
                       ("local / Tune, warm", "local_over_tune_warm")]:
        assert f"| {label} | {ratios[key]:.3f} |" in md
    assert "all identical." in md
    for trial in quick_run["fairness"]["first_round"]:
        assert f"| {trial['key']} | {trial['seed']} | {trial['local']!r} | {trial['tune']!r} |" in md
    assert "nan" not in md.lower()
