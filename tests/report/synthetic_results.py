"""Builds a synthetic results folder with known values, written by hand as a runner would store it.

2 optimizers (nesterov; lars_pipeline = LARS on weights, heavy ball on bias/BN) x 2 batch
sizes. Every study: tuning trial 0 (its first attempt FAILED, the retry SUCCEEDED), trial 1
DIVERGED, trial 2 SUCCEEDED and best; then 5 reruns of trial 2 with the final metrics below.
Seeds and hyperparameters come from batchlab.search.expand_studies, the authoritative path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchlab.proto import generate

generate.ensure_generated()

from batchlab.paths import get_path  # noqa: E402
from batchlab.search import expand_studies, load_spec, spec_to_dict  # noqa: E402
from batchlab.search.protocol import Outcome, RunRecord  # noqa: E402
from batchlab.search.scoring import score_study  # noqa: E402

TARGET = 0.6
EVAL_EVERY = 10
DIVERGED = None  # a rerun seed that diverged

SPEC: dict[str, Any] = {
    "name": "synthetic",
    "description": "Nesterov vs the LARS pipeline, two batch sizes (synthetic results).",
    "search_seed": 3,
    "trials_per_study": 2,
    "max_total_trials": 4,
    "seeds_per_best": 5,
    "selection": "BEST_VALIDATION_METRIC",
    "max_attempts": 2,
    "workloads": [{
        "workload": "mnist1d_resnet1d",
        "hyperparameters": {"label_smoothing": 0.0},
        "target": {"metric": "validation/accuracy", "value": TARGET, "goal": "MAXIMIZE"},
        "eval_every_steps": EVAL_EVERY,
        "points": [{"batch_size": 128, "step_budget": 100},
                   {"batch_size": 512, "step_budget": 50}],
    }],
    "optimizers": [
        {"name": "nesterov",
         "config": {"optimizer": "nesterov", "momentum": 0.9,
                    "learning_rate": {"schedule": "cosine", "peak_value": 0.1}},
         "search_space": {"parameters": [
             {"path": "optimizer.learning_rate.peak_value", "log": {"min": 0.01, "max": 1.0}},
             {"path": "optimizer.momentum", "log": {"min": 0.01, "max": 0.3},
              "one_minus": True},
             {"path": "workload.label_smoothing", "linear": {"min": 0.0, "max": 0.2}},
         ]}},
        {"name": "lars_pipeline",
         "config": {
             "weights": {"optimizer": "lars", "momentum": 0.9, "weight_decay": 1e-4,
                         "learning_rate": {"schedule": "cosine", "peak_value": 1.0}},
             "bias_bn": {"optimizer": "heavy_ball", "momentum": 0.9,
                         "learning_rate": {"schedule": "cosine", "peak_value": 1.0}}},
         "search_space": {"parameters": [
             {"path": "optimizer.weights.learning_rate.peak_value",
              "tied_paths": ["optimizer.bias_bn.learning_rate.peak_value"],
              "log": {"min": 0.1, "max": 30.0}},
             {"path": "optimizer.weights.weight_decay", "log": {"min": 1e-5, "max": 1e-3}},
             {"path": "optimizer.weights.momentum", "fixed": {"value": 0.929}},
         ]}},
    ],
}

# Final (validation, train) metric of the 5 reruns of each study's best trial.
SEEDS: dict[str, list[tuple[float, float] | None]] = {
    "nesterov.b128": [(0.70, 0.80), (0.72, 0.82), (0.68, 0.79), (0.71, 0.81), (0.69, 0.83)],
    "lars_pipeline.b128": [(0.705, 0.75), (0.69, 0.74), (0.715, 0.77), (0.70, 0.76),
                           (0.72, 0.78)],
    # never reaches the target 0.6
    "nesterov.b512": [(0.58, 0.61), (0.55, 0.60), (0.57, 0.62), (0.59, 0.63), (0.56, 0.59)],
    # one seed diverged, one far below the target; IQR above nesterov's
    "lars_pipeline.b512": [(0.66, 0.70), (0.63, 0.68), (0.64, 0.69), (0.45, 0.50), DIVERGED],
}
# Final validation metric of tuning trials 0 and 2 (trial 1 diverges); trial 2 is the best.
TUNING = {0: 0.62, 2: 0.66}


def _curve(final_val: float, final_train: float, budget: int, peak: float,
           stop: int | None = None) -> list[dict[str, float]]:
    """Linear climb from 0.1 to the final values; a cosine learning rate."""
    points = []
    for step in range(EVAL_EVERY, (stop or budget) + 1, EVAL_EVERY):
        frac = step / budget
        points.append({
            "step": float(step),
            "learning_rate": peak * 0.5 * (1 + math.cos(math.pi * frac)),
            "train/batch_loss": 2.0 - frac,
            "train/accuracy": 0.1 + (final_train - 0.1) * frac,
            "train/loss": 2.0 - frac,
            "validation/accuracy": 0.1 + (final_val - 0.1) * frac,
            "validation/loss": 2.1 - frac,
        })
    return points


def first_step_reaching(curve: list[dict[str, float]]) -> int | None:
    """The first evaluation step with validation/accuracy >= TARGET (None = never)."""
    for point in curve:
        if point["validation/accuracy"] >= TARGET:
            return int(point["step"])
    return None


@dataclass
class Synthetic:
    """The folder and what was written, for tests to compare against."""

    root: Path
    studies: dict[str, Any]  # short key ("nesterov.b128") -> batchlab.search Study
    records: dict[str, list[RunRecord]] = field(default_factory=dict)
    steps_to_target: dict[str, list[float]] = field(default_factory=dict)


def _write(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=True))


def _study_entry(study: Any) -> dict[str, Any]:
    return {"id": study.id, "workload": study.workload, "optimizer": study.optimizer,
            "optimizer_config": study.optimizer_config, "batch_size": study.batch_size,
            "step_budget": study.step_budget, "eval_every_steps": study.eval_every_steps,
            "target": study.target.to_dict()}


def _peak(hyperparameters: dict[str, Any]) -> float:
    return (get_path(hyperparameters, "optimizer.learning_rate.peak_value")
            or get_path(hyperparameters, "optimizer.weights.learning_rate.peak_value"))


def build_results(root: Path, *, without_scores: tuple[str, ...] = (),
                  reruns_done: int = 5, status: str = "SUCCEEDED",
                  spec: dict[str, Any] | None = None,
                  seeds: dict[str, list[tuple[float, float] | None]] | None = None) -> Synthetic:
    """Write experiment.json, runs/ and studies/ under root.

    Args:
      root: the results folder.
      without_scores: short study keys whose studies/<id>.json is not written.
      reruns_done: reruns written per study (fewer than 5: the study is still running).
      status: the experiment status stored.
      spec: another spec of the same shape as SPEC (e.g. more points).
      seeds: rerun values of studies SEEDS does not have, or replacing its own (default:
        lars_pipeline.b128's, for studies SEEDS lacks).
    """
    data = spec or SPEC
    spec = load_spec(data)
    rerun_values = {**SEEDS, **(seeds or {})}
    studies = {f"{s.optimizer}.b{s.batch_size}": s for s in expand_studies(spec)}
    out = Synthetic(root, studies)
    _write(root / "experiment.json", {
        "name": data["name"], "spec": spec_to_dict(spec), "status": status,
        "started_at": "2025-01-02T03:04:05+00:00",
        "finished_at": "2025-01-02T04:05:06+00:00" if status == "SUCCEEDED" else None,
        "command": "batchlab local run synthetic.yaml --out results/synthetic",
        "studies": [_study_entry(s) for s in studies.values()],
    })
    for key, study in studies.items():
        records: list[RunRecord] = []
        out.steps_to_target[key] = []

        def run(trial: int, replica: int, attempt: int, kind: str, outcome: str,
                values: tuple[float, float] | None, stop: int | None = None,
                study: Any = study, records: list[RunRecord] = records) -> float:
            hyperparameters = study.hyperparameters(trial)
            seed = study.tuning_seed(trial) if replica == 0 else \
                study.rerun_seeds(trial)[replica - 1]
            budget = study.step_budget
            curve = []
            final: dict[str, Any] = {}
            steps = None
            if outcome == "SUCCEEDED":
                curve = _curve(*values, budget, _peak(hyperparameters))
                final = dict(curve[-1])
                steps = first_step_reaching(curve)
            elif outcome == "DIVERGED":
                curve = _curve(0.2, 0.2, budget, _peak(hyperparameters), stop=stop)
                final = {k: math.nan for k in curve[-1]}
            completed = {"SUCCEEDED": budget, "DIVERGED": stop or 0, "FAILED": 7}[outcome]
            payload = {
                "request": {"study_id": study.id, "kind": kind, "trial_index": trial,
                            "replica": replica, "seed": seed, "attempt": attempt,
                            "hyperparameters": hyperparameters, "batch_size": study.batch_size,
                            "step_budget": budget, "eval_every_steps": study.eval_every_steps},
                "result": {"outcome": outcome, "steps_completed": completed, "curve": curve,
                           "steps_to_target": steps,
                           "diverged_step": stop if outcome == "DIVERGED" else None,
                           "error": "worker lost" if outcome == "FAILED" else None,
                           "wall_time_s": 1.5, "train_time_s": 1.2, "input_wait_s": 0.1,
                           "examples_per_second": 1000.0, "final_metrics": final},
            }
            # NaN as null, as a JSON writer without NaN support would store it.
            text = json.dumps(payload, indent=1, sort_keys=True).replace("NaN", "null")
            path = root / "runs" / study.id / f"t{trial}_r{replica}_a{attempt}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            records.append(RunRecord(
                trial_index=trial, seed=seed, outcome=Outcome[outcome],
                final_metrics={k: (math.nan if v is None else v) for k, v in final.items()},
                steps_to_target=math.inf if steps is None else steps, steps_run=completed))
            return math.inf if steps is None else float(steps)

        run(0, 0, 1, "tuning", "FAILED", None)
        run(0, 0, 2, "tuning", "SUCCEEDED", (TUNING[0], TUNING[0] + 0.1))
        run(1, 0, 1, "tuning", "DIVERGED", None, stop=30)
        run(2, 0, 1, "tuning", "SUCCEEDED", (TUNING[2], TUNING[2] + 0.1))
        values_of_key = rerun_values.get(key) or SEEDS["lars_pipeline.b128"]
        for replica, values in enumerate(values_of_key[:reruns_done], start=1):
            if values is DIVERGED:
                run(2, replica, 1, "rerun", "DIVERGED", None, stop=20)
                out.steps_to_target[key].append(math.inf)
            else:
                out.steps_to_target[key].append(run(2, replica, 1, "rerun", "SUCCEEDED", values))
        out.records[key] = records
        if key not in without_scores:
            score = score_study(study, records)
            _write(root / "studies" / f"{study.id}.json", {
                "study": _study_entry(study), "best_trial": score.best_trial,
                "best_hyperparameters": score.best_hyperparameters, "score": score.to_dict()})
    return out
