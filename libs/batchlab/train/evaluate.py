"""Evaluate a stored checkpoint apart from training (what the evaluation service runs)."""

from __future__ import annotations

import collections
import json
import threading
from pathlib import Path

from batchlab.train.checkpoint import RunCheckpointer
from batchlab.train.loop import RunConfig, _Run
from batchlab.train.parallel import DataParallel
from batchlab.train.steps import TrainState

__all__ = ["CheckpointEvaluator", "evaluate_checkpoint", "evaluation_splits"]

# The splits the training loop evaluates at every point (no registered workload has a test
# split; one that gets one adds it to _Run.evaluate and here).
LOOP_SPLITS = ("train", "validation")


def evaluation_splits(workload: str) -> tuple[str, ...]:
    """The splits an evaluation point of ``workload`` reports (what the training loop
    evaluates: the training-evaluation subset and validation).

    Args:
      workload: a registered workload name (ValueError for another).
    """
    from batchlab.train.workloads import get_workload

    get_workload(workload)
    return LOOP_SPLITS


def evaluate_checkpoint(
    config: RunConfig,
    checkpoint_dir: str | Path,
    *,
    step: int | None = None,
    splits: tuple[str, ...] = ("validation",),
    data_parallel: DataParallel | None = None,
) -> tuple[int, dict[str, float]]:
    """Restore the run's checkpoint and evaluate it, exactly as the training loop evaluates.

    Args:
      config: the run that wrote the checkpoint (workload, hyperparameters, optimizer, batch,
        budget): it fixes the model and the structure of the saved state.
      checkpoint_dir: the run's orbax checkpoint folder (step subfolders).
      step: the step to load (default: the newest).
      splits: "validation" and/or "train".
      data_parallel: the devices to use (default: all).

    Returns:
      (step, metrics) with metric names like the training curve's ("validation/accuracy").

    Raises:
      FileNotFoundError: when the folder holds no checkpoint.
      ValueError: for an invalid config or split.
    """
    run = _Run(config, data_parallel)
    checkpointer = RunCheckpointer(checkpoint_dir)
    try:
        state, meta = checkpointer.restore(run.init_state(), step)
    finally:
        checkpointer.close()
    state = run.dp.put_replicated(state)
    return int(meta["step"]), run.evaluate(state, splits)


class CheckpointEvaluator:
    """Evaluates checkpoints of many runs, keeping the model, jitted evaluation step and
    evaluation data of the last few workloads.

    Only a checkpoint's parameters and batch statistics are read: evaluation does not depend
    on the optimizer, batch size or step budget, so every trial of a workload (whatever its
    hyperparameters) shares one compiled evaluation step and one copy of the evaluation data.
    The metrics are those of the training loop's evaluation of the same state (same function,
    same data, same order).

    Args:
      data_dir: the tfds data folder (None: the default).
      cached: how many workloads' machinery to keep.
      data_parallel: the devices to use (default: all).
    """

    def __init__(self, data_dir: str | None = None, *, cached: int = 4,
                 data_parallel: DataParallel | None = None):
        self.data_dir = data_dir
        self.cached = max(1, cached)
        self._dp = data_parallel
        self._runs: collections.OrderedDict[str, _Run] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _run(self, config: RunConfig) -> _Run:
        key = json.dumps([config.workload, dict(config.hyperparameters)], sort_keys=True,
                         default=str)
        with self._lock:
            run = self._runs.pop(key, None)
            if run is None:
                run = _Run(config, self._dp)
            self._runs[key] = run
            while len(self._runs) > self.cached:
                self._runs.popitem(last=False)
        return run

    def evaluate(self, config: RunConfig, checkpoint_dir: str | Path, *, step: int | None = None,
                 splits: tuple[str, ...] = LOOP_SPLITS) -> tuple[int, dict[str, float]]:
        """(step, metrics) of the checkpoint at ``step`` (default: the newest) of a run.

        Args:
          config: the run that wrote the checkpoint (its workload and workload
            hyperparameters fix the model).
          checkpoint_dir: the run's checkpoint folder (RunCheckpointer layout).
          step: the step to evaluate.
          splits: the splits (see evaluation_splits).

        Raises:
          FileNotFoundError: no checkpoint at that step.
          ValueError: an invalid config or split.
        """
        run = self._run(config)
        checkpointer = RunCheckpointer(checkpoint_dir)
        try:
            step = checkpointer.latest_step() if step is None else step
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
            variables = checkpointer.restore_variables(run.abstract_variables(), step)
        finally:
            checkpointer.close()
        batch_stats = variables.get("batch_stats")
        # Evaluation reads params and batch_stats only: this state has no step, optimizer
        # state or dropout key (None leaves), which TrainState's training types do not allow.
        state = TrainState(step=None, rng=None,  # type: ignore[arg-type]
                           params=run.dp.put_replicated(variables["params"]),
                           batch_stats=None if batch_stats is None
                           else run.dp.put_replicated(batch_stats),
                           opt_state=None)
        return int(step), run.evaluate(state, tuple(splits))
