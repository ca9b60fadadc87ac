"""The batchlab-vs-Ray-Tune benchmark (benchmarks/tune.py): its fairness check catches a trial
whose numbers differ; run() turns the three paths' measurements into figures, ratios, the
fairness check and markdown (checked on fixed measurements); the quick study runs for real
through `batchlab local run` and then through Ray Tune with identical numbers; the services
path's figures are read from the controller's trials. The full three-path run is `make bench`."""

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


def _fake_paths(monkeypatch, accuracies: dict[str, float], *, tune_differs: str | None = None) -> list[str]:
    """The three paths replaced by measurements of fixed numbers: run()'s own logic alone.

    Returns the paths in the order run() called them."""
    calls: list[str] = []

    def local(root, the_spec):
        calls.append("local")
        reference, _ = _measured(accuracies)
        return {"cold_s": 10.0, "warm_s": 4.0, "execution": {"parallel": 2, "threads_per_run": {"w": 1},
                                                             "cpus": 2, "reason": "fake"},
                "cold": reference, "warm": copy.deepcopy(reference)}

    def services(root, the_spec, execution):
        calls.append("services")
        _, (round_,) = _measured(accuracies)
        trials = {key: {**trial, "span_s": 3.0} for key, trial in round_["services"]["cold"].items()}
        return {"cold_s": 15.0, "warm_s": 3.0, "startup_s": 9.0, "cold": trials,
                "warm": copy.deepcopy(trials)}

    def tune(root, the_spec, runs, execution):
        calls.append("tune")
        assert [r["request"]["trial_index"] for r in runs] == list(range(len(accuracies)))

        def fit(start: float) -> dict:
            trials = []
            for k, (key, acc) in enumerate(accuracies.items()):
                value = float(np.nextafter(acc, 1.0)) if key == tune_differs else acc
                trials.append({"key": key, "result": _result(value), "pid": 100 + k,
                               "entered_at": start + 1.0, "ready_at": start + 2.0, "ended_at": start + 4.0})
            return {"fit_start": start, "fit_end": start + 5.0, "trials": trials}

        return {"cold_s": 20.0, "warm_s": 8.0, "import_s": 1.0, "ray_start_s": 5.0,
                "cold": fit(0.0), "warm": fit(10.0)}

    monkeypatch.setattr(bench, "_local", local)
    monkeypatch.setattr(bench, "_services", services)
    monkeypatch.setattr(bench, "_tune", tune)
    return calls


def test_run_turns_the_paths_measurements_into_figures_ratios_and_markdown(monkeypatch):
    calls = _fake_paths(monkeypatch, {"t0_r0": 0.565, "t1_r0": 0.8275})
    result = bench.run(rounds=2, quick=True)
    assert calls == ["local", "services", "tune", "services", "tune", "local"]  # rotating order
    figures = result["figures"]
    assert set(figures) == {f"{p}_{phase}" for p in bench.PATHS for phase in ("cold", "warm")}
    assert figures["tune_cold"] == {"wall_s": [20.0, 20.0], "median_s": 20.0, "runs": 2,
                                    "runs_per_hour": 2 * 3600 / 20.0}
    assert figures["services_warm"]["median_s"] == 3.0 and figures["local_warm"]["median_s"] == 4.0
    assert result["ratios"] == {"services_over_tune_cold": 15.0 / 20.0, "services_over_tune_warm": 3.0 / 8.0,
                                "local_over_tune_cold": 10.0 / 20.0, "local_over_tune_warm": 4.0 / 8.0}
    cold = result["breakdown"][0]["cold"]
    assert cold["tune"]["ray_start_s"] == 5.0 and cold["services"]["stack_start_s"] == 9.0
    assert cold["tune"]["processes"] == 2 and cold["tune"]["start_wait_sum_s"] == 2.0
    assert result["fairness"]["identical"] and result["fairness"]["compared"] == 2 * 3 * 2 * 2
    md = bench.to_markdown(result)
    for label, key in [("services / Tune, cold", "services_over_tune_cold"),
                       ("services / Tune, warm", "services_over_tune_warm"),
                       ("local / Tune, cold", "local_over_tune_cold"),
                       ("local / Tune, warm", "local_over_tune_warm")]:
        assert f"| {label} | {result['ratios'][key]:.3f} |" in md
    assert "all identical." in md and "nan" not in md.lower()
    for trial in result["fairness"]["first_round"]:
        assert f"| {trial['key']} | {trial['seed']} | {trial['local']!r} | {trial['tune']!r} |" in md


def test_run_reports_a_tune_trial_whose_numbers_differ(monkeypatch):
    _fake_paths(monkeypatch, {"t0_r0": 0.565, "t1_r0": 0.8275}, tune_differs="t1_r0")
    fair = bench.run(rounds=1, quick=True)["fairness"]
    assert not fair["identical"]
    assert fair["mismatches"] == ["round 0 tune cold t1_r0", "round 0 tune warm t1_r0"]


@pytest.fixture(scope="module")
def local_then_tune(tmp_path_factory):
    """The quick study through `batchlab local run` for real, then its runs through Ray Tune."""
    from batchlab.runner.resources import plan_execution

    root = tmp_path_factory.mktemp("tune_bench")
    the_spec = bench.spec(quick=True, parallel=plan_execution([bench.SPEC["workloads"][0]["workload"]]).parallel)
    local = bench._local(root, the_spec)
    tune = bench._tune(root, the_spec, list(local["cold"].values()), local["execution"])
    return the_spec, local, tune


@pytest.mark.slow
def test_tune_runs_the_protocols_trials_with_the_numbers_local_run_stored(local_then_tune):
    the_spec, local, tune = local_then_tune
    (study,) = expand_studies(load_spec(the_spec))
    assert list(local["cold"]) == list(local["warm"]) == ["t0_r0", "t1_r0"]
    for index, (key, stored) in enumerate(local["cold"].items()):
        assert stored["request"]["seed"] == study.tuning_seed(index)
        assert stored["request"]["hyperparameters"] == study.hyperparameters(index)
        assert 0.0 <= stored["result"]["final_metrics"]["validation/accuracy"] <= 1.0
        assert bench._comparable(local["warm"][key]["result"]) == bench._comparable(stored["result"])
    for phase in ("cold", "warm"):
        trials = tune[phase]["trials"]
        assert [t["key"] for t in trials] == ["t0_r0", "t1_r0"], phase
        for trial in trials:  # bit-identical to the local run's stored numbers
            assert bench._comparable(trial["result"]) == bench._comparable(local["cold"][trial["key"]]["result"])
    assert tune["cold_s"] > 0 and tune["warm_s"] > 0 and tune["ray_start_s"] > 0
    waits = bench._tune_waits(tune["cold"], local["execution"]["parallel"])
    assert waits["processes"] >= 1 and waits["set_up_sum_s"] > 0


def test_the_services_figures_are_read_from_the_controllers_trials():
    from google.protobuf.timestamp_pb2 import Timestamp

    from batchlab.proto.v1 import common_pb2, controller_pb2

    def trial(index: int, outcome: int, steps: float, accuracy: float) -> controller_pb2.Trial:
        return controller_pb2.Trial(
            trial_index=index, replica=0, seed=40 + index, outcome=outcome,
            final_metrics={"validation/accuracy": accuracy}, steps_to_target=steps,
            start_time=Timestamp(seconds=1000 + index), end_time=Timestamp(seconds=1003 + 2 * index))

    class Client:
        def list(self):
            return [controller_pb2.Experiment(name="experiments/a", spec={"name": "other"}),
                    controller_pb2.Experiment(name="experiments/b", spec={"name": "tune-comparison"})]

        def trials(self, name):
            assert name == "experiments/b"
            return [trial(0, common_pb2.SUCCEEDED, 30.0, 0.5), trial(1, common_pb2.DIVERGED, float("inf"), 0.1)]

    assert bench._service_trials(Client(), "tune-comparison") == {
        "t0_r0": {"seed": 40, "outcome": "SUCCEEDED", "final_metrics": {"validation/accuracy": 0.5},
                  "steps_to_target": 30, "span_s": 3.0},
        "t1_r0": {"seed": 41, "outcome": "DIVERGED", "final_metrics": {"validation/accuracy": 0.1},
                  "steps_to_target": None, "span_s": 4.0},
    }
