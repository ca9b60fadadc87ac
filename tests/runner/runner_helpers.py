"""Specs and train functions for the parallel runner tests.

The train functions are module-level so worker processes can import them by name (this folder
is on sys.path under pytest, and worker processes inherit sys.path). Test-only behaviour is
switched on by environment variables, which workers inherit from the process that starts them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from batchlab.runner.local import _train

BARRIER_ENV = "BATCHLAB_TEST_BARRIER"  # a folder: the first runs wait there for each other
GATE_ENV = "BATCHLAB_TEST_GATE"  # a file: reruns wait until it exists
OUT_ENV = "BATCHLAB_TEST_OUT"  # the results folder, for runs that look at what is stored
CRASH_ENV = "BATCHLAB_TEST_CRASH"  # a file created by the run that crashed once
BARRIER_TIMEOUT_S = 120.0

def _spec(name: str, optimizers: list[dict], *, trials: int, reruns: int, step_budget: int,
          **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "trials_per_study": trials,
        "max_total_trials": trials,
        "seeds_per_best": reruns,
        "selection": "BEST_VALIDATION_METRIC",
        "workloads": [{
            "workload": "mnist1d_resnet1d_small",
            "target": {"metric": "validation/accuracy", "value": 0.3, "goal": "MAXIMIZE"},
            "eval_every_steps": 10,
            "points": [{"batch_size": 32, "step_budget": step_budget}],
        }],
        "optimizers": optimizers,
        **fields,
    }


def _nesterov(name: str, learning_rate: Any, path: str, low: float, high: float) -> dict[str, Any]:
    return {
        "name": name,
        "config": {"optimizer": "nesterov", "momentum": 0.9, "learning_rate": learning_rate},
        "search_space": {"parameters": [{"path": path, "log": {"min": low, "max": high}}]},
    }


# Two studies on the tiny workload: a healthy Nesterov study (1 trial + 1 rerun) and one whose
# learning rate jumps to ~3e38 at step 15: the update overflows, the loss is non-finite from
# step 17, and the run ends DIVERGED at the divergence check of step 20, after one evaluation.
# With two runs at once, the diverging run trains beside the healthy study's tuning run.
PAIR = _spec(
    "pair",
    [
        _nesterov("nesterov", {"schedule": "cosine", "peak_value": 0.1},
                  "optimizer.learning_rate.peak_value", 0.05, 0.5),
        _nesterov("overflow", {"schedule": "piecewise_polynomial", "peak_value": 3e38,
                               "end_value": 1e19, "warmup_steps": 15, "warmup_power": 1000,
                               "decay_power": 1},
                  "optimizer.learning_rate.peak_value", 2.5e38, 3e38),
    ],
    trials=1, reruns=1, step_budget=30, search_seed=3,
)


def fake_spec(name: str, *, optimizers: int, trials: int, reruns: int) -> dict[str, Any]:
    """A spec for fake train functions: ``optimizers`` studies of ``trials`` + ``reruns`` runs."""
    return _spec(name, [_nesterov(f"opt{i}", 0.1, "optimizer.learning_rate", 0.01, 1.0)
                        for i in range(optimizers)],
                 trials=trials, reruns=reruns, step_budget=20, search_seed=0, max_attempts=2)


def _result(request, **extra: Any) -> dict[str, Any]:
    acc = 0.5 + 0.01 * request.trial_index + 0.001 * (request.seed % 7)
    point = {"step": 20.0, "validation/accuracy": acc}
    return {"outcome": "SUCCEEDED", "steps_completed": 20, "curve": [point],
            "final_metrics": point, "steps_to_target": 10, **extra}


def _worker_facts() -> dict[str, Any]:
    allowed = os.sched_getaffinity(0)
    narrowed = sum(1 for tid in os.listdir("/proc/self/task")
                   if os.sched_getaffinity(int(tid)) != allowed)
    return {"pid": os.getpid(), "cpus": len(allowed), "narrowed_threads": narrowed}


def barrier_train(request, study, data_dir) -> dict[str, Any]:
    """The first two runs to arrive wait for each other (proving they ran at the same time)."""
    folder = Path(os.environ[BARRIER_ENV])
    arrived = len(list(folder.glob("*.arrived")))
    (folder / f"{request.study_id}.t{request.trial_index}.r{request.replica}.arrived").touch()
    met = None
    if arrived < 2:
        deadline = time.monotonic() + BARRIER_TIMEOUT_S
        while time.monotonic() < deadline:
            names = sorted(p.stem for p in folder.glob("*.arrived"))
            if len(names) >= 2:
                met = names
                break
            time.sleep(0.05)
    return _result(request, barrier={"first_two": arrived < 2, "met": met}, worker=_worker_facts())


def stored_runs_train(request, study, data_dir) -> dict[str, Any]:
    """Reports which of its study's runs were stored when it started."""
    folder = Path(os.environ[OUT_ENV]) / "runs" / request.study_id
    stored = sorted(p.name for p in folder.glob("*.json")) if folder.exists() else []
    return _result(request, stored_at_start=stored)


def crash_once_train(request, study, data_dir) -> dict[str, Any]:
    """Kills its worker process during the first attempt of trial 0's tuning run."""
    marker = Path(os.environ[CRASH_ENV])
    if request.trial_index == 0 and request.replica == 0 and not marker.exists():
        marker.write_text(json.dumps({"attempt": request.attempt, "pid": os.getpid()}))
        os._exit(9)
    return _result(request)


def invalid_config_train(request, study, data_dir) -> dict[str, Any]:
    """Raises as an invalid run configuration does (before training)."""
    raise ValueError("optimizer.learning_rate: must be >= 0, got -1")


def gated_train(request, study, data_dir) -> dict[str, Any]:
    """The real training loop; with GATE_ENV set, reruns first wait for the gate."""
    gate = os.environ.get(GATE_ENV)
    if gate and request.replica >= 1:
        while not os.path.exists(gate):
            time.sleep(0.05)
    return _train(request, study, data_dir)


def comparable(result: dict[str, Any]) -> dict[str, Any]:
    """What must not depend on what ran beside a run: curve, outcome, metrics, steps."""
    keys = ("outcome", "curve", "final_metrics", "steps_to_target", "steps_completed",
            "diverged_step", "error")
    return {k: result.get(k) for k in keys}


def stored_results(out: Path) -> dict[str, dict[str, Any]]:
    """Every stored run of a results folder, by study/file name."""
    return {
        f"{p.parent.name}/{p.name}": json.loads(p.read_text())
        for p in sorted((Path(out) / "runs").rglob("*.json"))
    }
