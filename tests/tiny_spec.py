"""The small experiment spec that runner and controller tests share: one Nesterov study on
mnist1d_resnet1d_small at batch 32 for 20 steps, 2 feasible trials (3 at most) and 1 rerun."""

from __future__ import annotations

import copy
from typing import Any

WORKLOAD = "mnist1d_resnet1d_small"

TINY: dict[str, Any] = {
    "name": "tiny",
    "search_seed": 3,
    "trials_per_study": 2,
    "max_total_trials": 3,
    "seeds_per_best": 1,
    "selection": "BEST_VALIDATION_METRIC",
    "workloads": [{
        "workload": WORKLOAD,
        "target": {"metric": "validation/accuracy", "value": 0.3, "goal": "MAXIMIZE"},
        "eval_every_steps": 10,
        "points": [{"batch_size": 32, "step_budget": 20}],
    }],
    "optimizers": [{
        "name": "nesterov",
        "config": {"optimizer": "nesterov",
                   "learning_rate": {"schedule": "cosine", "peak_value": 0.1}},
        "search_space": {"parameters": [
            {"path": "optimizer.learning_rate.peak_value", "log": {"min": 0.01, "max": 1.0}}]},
    }],
}


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """A deep copy of TINY with top-level fields replaced."""
    spec = copy.deepcopy(TINY)
    spec.update(overrides)
    return spec


def derive_other_learning_rates(monkeypatch: Any, factor: float) -> None:
    """Make batchlab derive every trial's peak learning rate `factor` times larger, as a code
    change to the search space's mapping would: stored runs then no longer match their trials."""
    from batchlab.search.study import Study

    derive = Study.hyperparameters

    def shifted(self: Study, trial_index: int) -> dict[str, Any]:
        mapping = derive(self, trial_index)
        mapping["optimizer"]["learning_rate"]["peak_value"] *= factor
        return mapping

    monkeypatch.setattr(Study, "hyperparameters", shifted)
