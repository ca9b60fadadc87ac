"""Evaluate a stored checkpoint apart from training (what the evaluation service runs)."""

from __future__ import annotations

from pathlib import Path

from batchlab.train.checkpoint import RunCheckpointer
from batchlab.train.loop import RunConfig, _Run
from batchlab.train.parallel import DataParallel

__all__ = ["evaluate_checkpoint"]


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
