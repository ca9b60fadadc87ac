"""What the integration tests share: a small spec and a trial request for the trainers."""

from __future__ import annotations

import copy
from typing import Any

WORKLOAD = "mnist1d_resnet1d_small"

# Two tuning trials with the same learning rate (so one compiled program serves both) and
# different seeds; no reruns. 30 steps, a checkpoint every 10.
SPEC: dict[str, Any] = {
    "name": "reliable",
    "search_seed": 1,
    "trials_per_study": 2,
    "max_total_trials": 2,
    "seeds_per_best": 0,
    "selection": "BEST_VALIDATION_METRIC",
    "resources": {"cpus": 1},
    "workloads": [{
        "workload": WORKLOAD,
        "target": {"metric": "validation/accuracy", "value": 0.05, "goal": "MAXIMIZE"},
        "eval_every_steps": 10,
        "points": [{"batch_size": 32, "step_budget": 30}],
    }],
    "optimizers": [{
        "name": "nesterov",
        "config": {"optimizer": "nesterov", "learning_rate": 0.1},
        "search_space": {"parameters": [
            {"path": "optimizer.learning_rate", "fixed": {"value": 0.1}}]},
    }],
}


def spec(**overrides: Any) -> dict[str, Any]:
    """A deep copy of SPEC with top-level fields replaced."""
    data = copy.deepcopy(SPEC)
    data.update(overrides)
    return data


def request(trial: str = "experiments/x/studies/s/trials/0-r0", *, seed: int = 5,
            steps: int = 20, workload_hparams: dict | None = None) -> dict[str, Any]:
    """A trainer request for one attempt (services.trainer.actor)."""
    return {
        "trial": trial, "experiment_id": "x", "study_id": "s", "trial_index": 0,
        "replica": 0, "attempt": 1, "seed": seed, "kind": "tuning", "workload": WORKLOAD,
        "hyperparameters": {"optimizer": {"optimizer": "nesterov", "learning_rate": 0.1},
                            "workload": dict(workload_hparams or {})},
        "batch_size": 32, "step_budget": steps, "eval_every_steps": 10,
        "target": {"metric": "validation/accuracy", "value": 0.05, "goal": "MAXIMIZE"},
    }
