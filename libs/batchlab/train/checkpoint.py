"""Checkpoints of a run with orbax: the train state plus JSON metadata (data position, curve).

Everything needed to resume bit-identically is saved: parameters, batch statistics,
optimizer state, the RNG key and step (the TrainState), and as JSON the input
pipeline's position and the metrics recorded so far. No pickle crosses the disk.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["RunCheckpointer"]

log = logging.getLogger(__name__)


class RunCheckpointer:
    """Saves and restores (TrainState, metadata) under one directory; keeps the newest few.

    Args:
      directory: where checkpoints live (one subfolder per step).
      max_to_keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
        """Save ``state`` and JSON ``metadata`` at ``step`` and wait until it is on disk."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata)
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        log.info("saved checkpoint at step %d in %s", step, self.directory)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore (state, metadata) at ``step`` (newest by default) into ``abstract_state``'s structure."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        self._manager.close()
