"""Test doubles for the controller: a trainer pool that runs a function instead of Ray actors,
and the small spec the controller tests share."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from tiny_spec import TINY, tiny_spec
from tiny_spec import WORKLOAD as WORKLOAD  # re-exported: the controller tests name it

from batchlab.search.study import Goal
from services.controller.pool import Dispatch, Finished, Lease, TrainerPool, resource_shape

SPEC = TINY


def spec_dict(**overrides: Any) -> dict[str, Any]:
    """A deep copy of the shared tiny spec with top-level fields replaced."""
    return tiny_spec(**overrides)


def request_of(assignment) -> dict[str, Any]:
    """A batchlab.v1.TrialAssignment as the plain dict the fake runs read."""
    return {
        "trial": assignment.trial, "experiment_id": assignment.experiment_id,
        "study_id": assignment.study_id, "trial_index": assignment.trial_index,
        "replica": assignment.replica, "attempt": assignment.attempt, "seed": assignment.seed,
        "kind": assignment.kind, "workload": assignment.workload,
        "hyperparameters": json.loads(assignment.hyperparameters_json),
        "batch_size": assignment.batch_size, "step_budget": assignment.step_budget,
        "eval_every_steps": assignment.eval_every_steps,
        "target": {"metric": assignment.target.metric, "value": assignment.target.value,
                   "goal": Goal(assignment.target.goal).name},
        "evaluation": assignment.evaluation,
    }


class LostWorker(Exception):
    """Raised by a fake run to say its trainer died."""


def fake_result(request: Mapping[str, Any]) -> dict[str, Any]:
    """A deterministic RunResult dict: accuracy from the trial and seed; lr > 0.9 diverges."""
    lr = request["hyperparameters"]["optimizer"]["learning_rate"]["peak_value"]
    accuracy = 0.2 + 0.1 * request["trial_index"] + 0.01 * (request["seed"] % 7)
    steps = request["step_budget"]
    curve = [{"step": float(s), "validation/accuracy": accuracy, "train/accuracy": accuracy,
              "learning_rate": lr, "train/batch_loss": 1.0}
             for s in range(request["eval_every_steps"], steps + 1,
                            request["eval_every_steps"])]
    diverged = lr > 0.9
    return {
        "outcome": "DIVERGED" if diverged else "SUCCEEDED",
        "steps_completed": steps,
        "curve": curve,
        "final_metrics": dict(curve[-1]),
        "steps_to_target": (None if diverged or accuracy < request["target"]["value"]
                            else request["eval_every_steps"]),
        "error": None,
        "wall_time_s": 0.1,
        "examples_per_second": 1000.0,
        "resumed_from_step": None,
    }


class FakePool(TrainerPool):
    """Runs each started attempt with `run(request)` when polled (no processes).

    Args:
      size: trainers.
      run: request -> result dict; raising LostWorker makes the attempt lost, any other
        exception a run that raised.
    """

    def __init__(self, size: int = 2,
                 run: Callable[[Mapping[str, Any]], dict[str, Any]] = fake_result):
        self._size = size
        self.run = run
        self._running: list[Dispatch] = []
        self.started: list[dict[str, Any]] = []
        self.stopped: list[tuple[str, int]] = []
        self.hold = False
        self._names = itertools.count()
        self.closed = False

    @property
    def size(self) -> int:
        return self._size

    def acquire(self, resources, hosts=1):
        if len(self._running) + hosts > self._size:
            return None
        names = [f"fake-{next(self._names)}" for _ in range(hosts)]
        return Lease(names, resource_shape(resources), [None] * hosts)

    def release(self, lease):
        pass

    def start(self, lease, attempt_id, experiment_id, assignment):
        request = request_of(assignment)
        dispatch = Dispatch(attempt_id, experiment_id, request["trial"], request["attempt"],
                            lease, [dict(request)], time.monotonic())
        self._running.append(dispatch)
        self.started.append(dict(request))
        return dispatch

    def poll(self, timeout=0.0):
        if self.hold or not self._running:
            return []
        finished = []
        for dispatch in self._running:
            request = dispatch.refs[0]
            if dispatch.stop_requested:
                result = {**fake_result(request), "outcome": "CANCELLED"}
                finished.append(Finished(dispatch, result))
                continue
            try:
                finished.append(Finished(dispatch, self.run(request)))
            except LostWorker as error:
                finished.append(Finished(dispatch, None, f"lost: {error}", lost=True))
            except Exception as error:  # noqa: BLE001 - a run that raised
                finished.append(Finished(dispatch, None, f"raised: {error}"))
        self._running = []
        return finished

    def stop(self, dispatch):
        dispatch.stop_requested = True
        self.stopped.append((dispatch.trial, dispatch.attempt))

    def running(self):
        return list(self._running)

    def counts(self):
        return {"idle": self._size - len(self._running), "busy": len(self._running)}

    def close(self):
        self.closed = True
