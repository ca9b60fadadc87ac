"""Warm starts through `batchlab local run`: phase B continues the kept best run of phase A.

Phase A keeps the final states of its tuning runs; phase B names A's study in its workload's
warm_start and finds A's results next to its own folder. Every run of B (tuning and rerun)
must start from exactly the final parameters of A's best trial's tuning run, with a fresh
optimizer state; bad references fail with errors that name the spec field.
"""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest
from google.protobuf import json_format

import batchlab.train
from batchlab.proto.v1 import experiment_pb2
from batchlab.runner import ResultStore, run_experiment
from batchlab.search import expand_studies, load_spec
from batchlab.search.protocol import RunKind
from batchlab.search.space import SpecError
from batchlab.search.warm_start import warm_start_problems
from batchlab.train import loop as loop_module
from batchlab.train.checkpoint import restore_initial_variables

NESTEROV = {
    "name": "nesterov",
    "config": {"optimizer": "nesterov", "momentum": 0.9,
               "learning_rate": {"schedule": "cosine", "peak_value": 0.1}},
    "search_space": {"parameters": [{"path": "optimizer.learning_rate.peak_value",
                                     "log": {"min": 0.03, "max": 0.3}}]},
}
PHASE_A = {
    "name": "phase-a",
    "search_seed": 1,
    "trials_per_study": 2,
    "max_total_trials": 3,
    "seeds_per_best": 1,
    "selection": "BEST_VALIDATION_METRIC",
    "workloads": [{
        "workload": "mnist1d_resnet1d_small",
        "target": {"metric": "validation/accuracy", "value": 0.3, "goal": "MAXIMIZE"},
        "eval_every_steps": 10,
        "points": [{"batch_size": 32, "step_budget": 20}],
        "keep_final_state": True,
    }],
    "optimizers": [NESTEROV],
}
PHASE_B = {
    **copy.deepcopy(PHASE_A),
    "name": "phase-b",
    "trials_per_study": 1,
    "max_total_trials": 1,
    "workloads": [{
        "workload": "mnist1d_resnet1d_small",
        "target": {"metric": "validation/accuracy", "value": 0.3, "goal": "MAXIMIZE"},
        "eval_every_steps": 10,
        "points": [{"batch_size": 64, "step_budget": 10}],
        "warm_start": {"experiment": "phase-a", "workload": "mnist1d_resnet1d_small"},
    }],
}


def _with_workload(spec, name, **fields):
    out = copy.deepcopy(spec)
    out["name"] = name
    out["workloads"][0].update(fields)
    return out


@pytest.fixture(scope="module")
def phase_a(tmp_path_factory, small_data_dir):
    """Phase A run for real; the final state of every run recorded by its seed."""
    root = tmp_path_factory.mktemp("results")
    finals = {}
    original = batchlab.train.train_and_evaluate

    def recording(config, **kwargs):
        result = original(config, **{**kwargs, "return_state": True})
        finals[config.seed] = jax.device_get(result.final_state)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batchlab.train, "train_and_evaluate", recording)
        run_experiment(PHASE_A, root / "a", data_dir=small_data_dir, progress=False,
                       write_report=False, in_process=True)
    return root, finals


def test_phase_a_keeps_the_final_state_of_its_tuning_runs_only(phase_a):
    root, finals = phase_a
    store = ResultStore(root / "a")
    (study,) = expand_studies(load_spec(PHASE_A))
    kept = sorted(p.name for p in (root / "a" / "states" / study.id).iterdir())
    assert kept == ["t0", "t1"]  # two tuning trials; the rerun of the best keeps nothing
    for trial in (0, 1):
        final = finals[study.tuning_seed(trial)]
        wanted = {"params": final.params, "batch_stats": final.batch_stats}
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), wanted)
        stored = restore_initial_variables(store.state_dir(study.id, trial), abstract)
        for got, want in zip(jax.tree.leaves(stored), jax.tree.leaves(wanted), strict=True):
            assert np.array_equal(got, want)


def test_phase_b_starts_every_run_from_the_best_trial_of_phase_a(phase_a, small_data_dir, monkeypatch):
    root, finals = phase_a
    store_a = ResultStore(root / "a")
    (study_a,) = expand_studies(load_spec(PHASE_A))
    best = store_a.read_study(study_a.id)["best_trial"]
    source = finals[study_a.tuning_seed(best)]

    starts = []
    warm_start = loop_module._Run.warm_start

    def spy(run, state):
        state = warm_start(run, state)
        starts.append(jax.device_get(state))  # a copy: the train step donates the state
        return state

    monkeypatch.setattr(loop_module._Run, "warm_start", spy)
    out = run_experiment(PHASE_B, root / "b", data_dir=small_data_dir, progress=False,
                         write_report=False, in_process=True)

    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").rglob("*.json"))]
    assert {r["request"]["kind"] for r in runs} == {RunKind.TUNING, RunKind.RERUN}
    assert len(starts) == len(runs) == 2
    for run, start in zip(runs, starts, strict=True):
        assert run["result"]["outcome"] == "SUCCEEDED"
        assert run["result"]["initialised_from"] == f"phase-a: {study_a.id} trial {best}"
        assert int(start.step) == 0
        for got, want in zip(jax.tree.leaves((start.params, start.batch_stats)),
                             jax.tree.leaves((source.params, source.batch_stats)), strict=True):
            assert np.array_equal(got, want)
        assert all(not np.any(x) for x in jax.tree.leaves(start.opt_state))
    # The source's momentum was not zero: a copied optimizer state would have shown.
    assert any(np.any(x) for x in jax.tree.leaves(source.opt_state))
    assert not (out / "states").exists()  # phase B keeps nothing


def test_a_source_of_another_architecture_fails_naming_the_field(phase_a, small_data_dir):
    """Through the worker processes `batchlab local run` trains in (the source is found there)."""
    root, _ = phase_a
    spec = _with_workload(PHASE_B, "phase-c", workload="digits_resnet20")
    with pytest.raises(ValueError, match=r"init_checkpoint: .*/a/states/.* does not match the model"):
        run_experiment(spec, root / "c", data_dir=small_data_dir, progress=False, write_report=False)


@pytest.mark.parametrize(
    "warm_start, match",
    [
        ({"experiment": "phase-z", "workload": "mnist1d_resnet1d_small"},
         r"workloads\[0\]\.warm_start\.experiment: no results of experiment 'phase-z'"),
        ({"experiment": "phase-a", "workload": "mnist1d_resnet1d"},
         r"workloads\[0\]\.warm_start\.workload: experiment 'phase-a' has no workload"),
        ({"experiment": "phase-a", "workload": "mnist1d_resnet1d_small", "optimizer": "adam"},
         r"workloads\[0\]\.warm_start\.optimizer: experiment 'phase-a' has no study"),
        ({"experiment": "phase-a", "workload": "mnist1d_resnet1d_small", "batch_size": 32, "step_budget": 30},
         r"workloads\[0\]\.warm_start\.batch_size: experiment 'phase-a' has no study"),
        ({"experiment": "phase-a", "workload": "mnist1d_resnet1d_small", "trial": 5},
         r"workloads\[0\]\.warm_start\.trial: no kept final state for trial 5"),
    ],
)
def test_a_reference_to_nothing_kept_fails_naming_the_field(phase_a, small_data_dir, tmp_path, warm_start, match):
    root, _ = phase_a
    spec = _with_workload(PHASE_B, "phase-d", warm_start=warm_start)
    with pytest.raises(ValueError, match=match):
        run_experiment(spec, root / f"d{len(list(root.iterdir()))}", data_dir=small_data_dir,
                       progress=False, write_report=False, in_process=True)


def _fake_train(request, study, data_dir):
    curve = [{"step": 10.0, "validation/accuracy": 0.5, "train/accuracy": 0.5}]
    return {"outcome": "SUCCEEDED", "steps_completed": 20, "curve": curve,
            "final_metrics": curve[-1], "steps_to_target": 10}


def test_a_source_that_keeps_no_states_or_has_not_finished_fails_naming_the_field(tmp_path, small_data_dir):
    unkept = _with_workload(PHASE_A, "phase-a", keep_final_state=False)
    run_experiment(unkept, tmp_path / "a", train_fn=_fake_train, progress=False, write_report=False,
                   in_process=True)
    with pytest.raises(ValueError, match=r"warm_start\.experiment: experiment 'phase-a' does not keep final states"):
        run_experiment(PHASE_B, tmp_path / "b", data_dir=small_data_dir, progress=False, write_report=False,
                       in_process=True)

    kept = tmp_path / "kept"
    kept.mkdir()
    run_experiment(PHASE_A, kept / "a", train_fn=_fake_train, progress=False, write_report=False,
                   in_process=True)
    (study_id,) = [s["id"] for s in ResultStore(kept / "a").read_experiment()["studies"]]
    ResultStore(kept / "a").study_path(study_id).unlink()
    with pytest.raises(ValueError, match=r"warm_start\.experiment: study .* has not finished"):
        run_experiment(PHASE_B, kept / "b", data_dir=small_data_dir, progress=False, write_report=False,
                       in_process=True)


def test_the_warm_start_fields_are_checked_with_the_spec():
    assert warm_start_problems(load_spec(PHASE_B)) == []
    bad = _with_workload(PHASE_B, "phase-b", warm_start={"experiment": "phase-b", "batch_size": 64})
    expected = [
        ("workloads[0].warm_start.experiment", "names this experiment ('phase-b'): a run cannot start "
         "from a result of its own experiment"),
        ("workloads[0].warm_start.workload", "required: the source study's workload, e.g. 'bert_large_phase1'"),
        ("workloads[0].warm_start.step_budget", "give the source point whole (batch_size and step_budget) "
         "or leave both out for the source workload's only point"),
    ]
    assert warm_start_problems(json_format.ParseDict(bad, experiment_pb2.ExperimentSpec())) == expected
    with pytest.raises(SpecError) as info:  # spec validation runs the same checks
        load_spec(bad)
    for field, reason in expected:
        assert f"{field}: {reason}" in str(info.value)
