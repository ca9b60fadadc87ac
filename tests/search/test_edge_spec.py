"""scripts/edge_spec.py: the spec that tests a results folder's best-at-edge flags.

A results folder is built by hand from a real spec: the best trial is chosen as one whose
quasi-random point lies in a known edge of the search space, so the flags (and the values past
the edges) are known in advance.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from batchlab.search import expand_studies, load_spec
from batchlab.search.study import trial_point

ROOT = Path(__file__).resolve().parents[2]
_module = importlib.util.spec_from_file_location("edge_spec", ROOT / "scripts" / "edge_spec.py")
assert _module is not None and _module.loader is not None
edge_spec = importlib.util.module_from_spec(_module)
_module.loader.exec_module(edge_spec)

SPEC = {
    "name": "edges", "search_seed": 5, "trials_per_study": 4, "max_total_trials": 8,
    "seeds_per_best": 5, "selection": "BEST_VALIDATION_METRIC",
    "workloads": [{"workload": "mnist1d_resnet1d_small", "eval_every_steps": 10,
                   "target": {"metric": "validation/accuracy", "value": 0.5, "goal": "MAXIMIZE"},
                   "points": [{"batch_size": 32, "step_budget": 20}]}],
    "optimizers": [{
        "name": "nesterov",
        "config": {"optimizer": "nesterov", "momentum": 0.9,
                   "learning_rate": {"schedule": "piecewise_polynomial", "peak_value": 0.1,
                                     "warmup_steps": 2, "warmup_power": 1.0}},
        "search_space": {"parameters": [
            {"path": "optimizer.learning_rate.peak_value", "log": {"min": 0.01, "max": 1.0}},
            {"path": "optimizer.momentum", "log": {"min": 0.01, "max": 0.3}, "one_minus": True},
            {"path": "optimizer.learning_rate.warmup_power", "linear": {"min": 0.25, "max": 4.0}},
        ]},
    }],
}


def _results(tmp_path: Path, want) -> tuple[Path, int, tuple[float, ...]]:
    """A results folder whose one study's best trial has a point for which ``want`` holds."""
    (study,) = expand_studies(load_spec(SPEC))
    best = next(i for i in range(5000) if want(trial_point(study, i)))
    folder = tmp_path / "base"
    (folder / "studies").mkdir(parents=True)
    (folder / "experiment.json").write_text(json.dumps({"spec": SPEC}))
    (folder / "studies" / f"{study.id}.json").write_text(json.dumps({"best_trial": best}))
    return folder, best, trial_point(study, best)


def test_each_flag_gets_an_arm_past_its_edge_compared_with_the_best_point(tmp_path):
    # Learning rate in the upper 10% (log), 1 - momentum in the lower 10% (log), warmup power
    # in the middle: two flags, the third dimension untouched.
    folder, best, u = _results(tmp_path, lambda u: u[0] >= 0.9 and u[1] < 0.1 and 0.3 < u[2] < 0.7)
    spec, header = edge_spec.edge_spec(folder)
    arms = {arm["name"]: arm for arm in spec["optimizers"]}
    assert sorted(arms) == ["nesterov_r0_best", "nesterov_r0_momentum_beyond",
                            "nesterov_r0_peak_value_beyond"]
    assert spec["comparisons"] == [{"a": "nesterov_r0_peak_value_beyond", "b": "nesterov_r0_best"},
                                   {"a": "nesterov_r0_momentum_beyond", "b": "nesterov_r0_best"}]
    best_lr = arms["nesterov_r0_best"]["config"]["learning_rate"]
    assert "total_steps" not in best_lr  # left to the step budget
    # A quarter of the range past the edge: 100**0.25 above 1.0; 30**0.25 below 1 - m's 0.01.
    assert arms["nesterov_r0_peak_value_beyond"]["config"]["learning_rate"]["peak_value"] == \
        pytest.approx(1.0 * 100 ** 0.25)
    assert arms["nesterov_r0_momentum_beyond"]["config"]["momentum"] == pytest.approx(1 - 0.01 / 30 ** 0.25)
    # Everything else is the best point's.
    moved = arms["nesterov_r0_peak_value_beyond"]["config"]
    assert moved["momentum"] == arms["nesterov_r0_best"]["config"]["momentum"]
    assert moved["learning_rate"]["warmup_power"] == best_lr["warmup_power"]
    assert f"best trial {best}" in header
    load_spec(spec)  # a valid spec: every arm's config passes the optimizer schema


def test_a_lower_linear_edge_stays_positive_and_a_clean_best_point_gives_no_spec(tmp_path):
    folder, _, _ = _results(tmp_path, lambda u: 0.3 < u[0] < 0.7 and 0.3 < u[1] < 0.7 and u[2] < 0.1)
    spec, _ = edge_spec.edge_spec(folder)
    (beyond,) = [a for a in spec["optimizers"] if a["name"].endswith("_beyond")]
    assert beyond["name"] == "nesterov_r0_warmup_power_beyond"
    assert beyond["config"]["learning_rate"]["warmup_power"] == pytest.approx(0.25 / 2.5)
    clean, _, _ = _results(tmp_path / "clean", lambda u: all(0.3 < x < 0.7 for x in u))
    with pytest.raises(SystemExit, match="no best-at-edge flag"):
        edge_spec.edge_spec(clean)
