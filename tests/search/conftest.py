"""Shared fixtures for tests/search: generated protos, a spec builder and a study simulator."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest

from batchlab.proto import generate

# The generated code is git-ignored (made by `make setup`); regenerate it when a .proto changed.
generate.ensure_generated()

from batchlab.search import protocol, spec  # noqa: E402  (needs the generated code)

BASE_SPEC: dict[str, Any] = {
    "name": "unit",
    "search_seed": 7,
    "trials_per_study": 4,
    "max_total_trials": 8,
    "seeds_per_best": 3,
    "selection": "BEST_VALIDATION_METRIC",
    "max_attempts": 2,
    "workloads": [{
        "workload": "mnist1d_resnet1d",
        "target": {"metric": "validation/accuracy", "value": 0.8, "goal": "MAXIMIZE"},
        "eval_every_steps": 10,
        "points": [{"batch_size": 128, "step_budget": 100}],
    }],
    "optimizers": [{
        "name": "nesterov",
        "config": {"optimizer": "nesterov", "momentum": 0.9,
                   "learning_rate": {"schedule": "cosine", "peak_value": 0.1}},
        "search_space": {"parameters": [
            {"path": "optimizer.learning_rate.peak_value", "log": {"min": 1e-3, "max": 1.0}},
            {"path": "optimizer.momentum", "log": {"min": 1e-3, "max": 0.5}, "one_minus": True},
        ]},
    }],
}


@pytest.fixture
def base_spec() -> dict[str, Any]:
    """A fresh copy of a small valid spec as plain data."""
    return copy.deepcopy(BASE_SPEC)


@pytest.fixture
def make_study() -> Callable[..., Any]:
    """Build the single study of BASE_SPEC with top-level fields overridden."""

    def build(**overrides: Any):
        data = copy.deepcopy(BASE_SPEC)
        target = overrides.pop("target", None)
        if target is not None:
            data["workloads"][0]["target"] = target
        data.update(overrides)
        (study,) = spec.expand_studies(spec.load_spec(data))
        return study

    return build


Outcomes = Callable[[int, int, int, int], tuple[protocol.Outcome, float, float]]


def simulate(study, outcome_of: Outcomes, *, parallelism: int = 1,
             max_calls: int = 1000) -> tuple[list[protocol.RunRecord], list[Any]]:
    """Drive a study to completion; runs finish in launch order (oldest first).

    outcome_of(trial_index, replica, attempt, seed) -> (outcome, final metric, steps_to_target).
    Returns (records, decisions).
    """
    records: list[protocol.RunRecord] = []
    running: list[protocol.RunRequest] = []
    decisions = []
    for _ in range(max_calls):
        decision = protocol.next_runs(study, records, in_flight=running, parallelism=parallelism)
        decisions.append(decision)
        running.extend(decision.launch)
        if decision.done:
            assert not decision.launch
            return records, decisions
        assert running, f"stuck: {decision.reason}"
        request = running.pop(0)
        outcome, metric, steps = outcome_of(request.trial_index, request.replica,
                                            request.attempt, request.seed)
        metrics = {} if outcome is not protocol.Outcome.SUCCEEDED else {
            study.target.metric: metric, "train/loss": 0.1}
        records.append(protocol.RunRecord(
            trial_index=request.trial_index, seed=request.seed, outcome=outcome,
            final_metrics=metrics, steps_to_target=steps,
            steps_run=study.step_budget if outcome is protocol.Outcome.SUCCEEDED else 7))
    raise AssertionError("the study did not finish")


def succeed(metric_of: Callable[[int], float] = lambda trial: 0.5 + 0.01 * trial,
            diverge: frozenset[int] = frozenset(), fail: dict[int, int] | None = None,
            steps_of: Callable[[int], float] = lambda trial: math.inf) -> Outcomes:
    """An outcome function: trials in `diverge` diverge; trial t in `fail` fails fail[t] times."""
    fail = fail or {}

    def outcome_of(trial: int, replica: int, attempt: int, seed: int):
        if replica == 0 and attempt <= fail.get(trial, 0):
            return protocol.Outcome.FAILED, math.nan, math.inf
        if replica == 0 and trial in diverge:
            return protocol.Outcome.DIVERGED, math.nan, math.inf
        return protocol.Outcome.SUCCEEDED, metric_of(trial) + 0.001 * replica, steps_of(trial)

    return outcome_of


@pytest.fixture
def simulator():
    """The `simulate` and `succeed` helpers."""
    return simulate, succeed
