"""What the integration tests share: a small spec, a trial request for the trainers, and the
port a server started with port 0 reports in its log."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from batchlab.proto.v1 import common_pb2, controller_pb2, experiment_pb2

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
            steps: int = 20, workload_hparams: dict | None = None,
            learning_rate: Any = 0.1, attempt: int = 1,
            evaluation: int = controller_pb2.EVALUATION_IN_PROCESS) -> bytes:
    """A serialized TrialAssignment for one attempt (what the controller sends trainers)."""
    hyperparameters = {"optimizer": {"optimizer": "nesterov", "learning_rate": learning_rate},
                       "workload": dict(workload_hparams or {})}
    return controller_pb2.TrialAssignment(
        trial=trial, experiment_id="x", study_id="s", trial_index=0, replica=0,
        attempt=attempt, seed=seed, kind="tuning", workload=WORKLOAD,
        hyperparameters_json=json.dumps(hyperparameters), batch_size=32, step_budget=steps,
        eval_every_steps=10, evaluation=evaluation,
        target=experiment_pb2.Target(metric="validation/accuracy", value=0.05,
                                     goal=common_pb2.MAXIMIZE),
    ).SerializeToString()


def example_log(folder, trial: str) -> dict[tuple[int, int], dict[int, list[int]]]:
    """A trainer example log: (attempt, process) -> step -> example indices read."""
    from pathlib import Path

    from services.trainer.actor import _safe_name

    found: dict[tuple[int, int], dict[int, list[int]]] = {}
    for path in sorted((Path(folder) / _safe_name(trial)).glob("a*-p*.jsonl")):
        attempt, process = path.stem[1:].split("-p")
        steps = found.setdefault((int(attempt), int(process)), {})
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            steps[entry["step"]] = entry["examples"]
    return found


def gated_storage(directory, gate_step: int):
    """A SQLiteStorage holding the progress report of trial 0's first attempt at `gate_step`
    (or later) until `.release` is set; `.reached` is set when it is held.

    A trainer evaluating in its own process reports at every evaluation before it saves
    that step's checkpoint, so while the report is held its last uploaded checkpoint is the
    previous evaluation's (once the run's checkpoint thread has uploaded it); evaluating by
    the service, it reports after the upload.
    """
    from services.controller.storage import SQLiteStorage

    class GatedStorage(SQLiteStorage):
        def add_points(self, points):
            if any(p.trial.trial_index == 0 and p.trial.replica == 0 and p.attempt == 1
                   and p.step >= gate_step for p in points):
                self.reached.set()
                self.release.wait(120)
            return super().add_points(points)

    storage = GatedStorage(directory)
    storage.reached, storage.release = threading.Event(), threading.Event()
    return storage


def logged_port(log_path: Path, what: str, process: subprocess.Popen, *, after: int = 0,
                timeout: float = 120.0) -> int:
    """The port a server bound (it was given port 0), read from its log line
    "<what> on HOST:PORT" ("controller listening", "controller metrics").

    Args:
      log_path: the server's log file.
      what: the words before " on HOST:PORT".
      process: the server (its exit ends the wait with the log).
      after: read the log from this byte offset (a restarted server appends to the same log).
      timeout: seconds to wait for the line.
    """
    pattern = re.compile(re.escape(what) + r" on [^\s:]+:(\d+)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_bytes()[after:].decode(errors="replace")
        match = pattern.search(text)
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            raise AssertionError(f"the server exited ({process.returncode}) before logging "
                                 f"{what!r}:\n{text[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {what!r} line in {log_path} after {timeout} s")
