"""Moving a trial's checkpoints between a trainer's local folder and durable storage.

A trainer trains into a local folder per (trial, attempt). Before training it restores the
trial's latest checkpoint from durable storage into that folder, so a retried attempt (on any
trainer) resumes where the previous one stopped; after every checkpoint it uploads the new
step. Two stores:

  - `ServiceCheckpointSync`: the checkpoint service (batchlab.v1.CheckpointService), through
    `batchlab.rpc.checkpoint_client.CheckpointClient`: what a cluster uses.
  - `DirectoryCheckpointSync`: a folder every trainer can read (a single machine or a shared
    volume): no service needed.

A checkpoint is the orbax step folder `<checkpoint_dir>/<step>` written by
batchlab.train.checkpoint.RunCheckpointer; restoring puts it back at `<local_dir>/<step>`,
where the training loop's resume logic finds it.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

__all__ = ["CheckpointSync", "DirectoryCheckpointSync", "ServiceCheckpointSync"]

log = logging.getLogger(__name__)

_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


class CheckpointSync(abc.ABC):
    """Restores and uploads one trial's checkpoints."""

    @abc.abstractmethod
    def restore(self, trial: str, local_dir: Path) -> int | None:
        """Put the trial's latest checkpoint at local_dir/<step>.

        Args:
          trial: the trial resource name (experiments/{e}/studies/{s}/trials/{t}).
          local_dir: the run's (empty) local checkpoint folder.

        Returns:
          The restored step, or None when the trial has no checkpoint yet.
        """

    @abc.abstractmethod
    def upload(self, trial: str, step: int, step_dir: Path, *, metric: float | None = None,
               maximize: bool = True, hold_for_evaluation: bool = False) -> None:
        """Store the checkpoint folder of one step.

        Args:
          trial: the trial resource name.
          step: the training step.
          step_dir: the orbax step folder.
          metric: the validation metric at that step (the store keeps the best), if any.
          maximize: whether a larger metric is better.
          hold_for_evaluation: keep it until the evaluation service has read it (only the
            checkpoint service evaluates; a folder store keeps the newest steps only).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def _trial_path(trial: str) -> Path:
    """The trial name as a relative path; refuses names that could leave the store."""
    parts = trial.split("/")
    if not parts or any(not _SEGMENT.match(p) or p in (".", "..") for p in parts):
        raise ValueError(f"trial: {trial!r} is not a resource name of [A-Za-z0-9._-] segments")
    return Path(*parts)


class DirectoryCheckpointSync(CheckpointSync):
    """Checkpoints in a folder shared by every trainer: root/<trial name>/<step>.

    Uploads are atomic (copy to a temporary folder, then rename); the newest `keep` steps
    of a trial are kept.

    Args:
      root: the shared folder.
      keep: how many of a trial's newest checkpoints to keep.
    """

    def __init__(self, root: str | os.PathLike[str], *, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def _steps(self, folder: Path) -> list[int]:
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def restore(self, trial: str, local_dir: Path) -> int | None:
        folder = self.root / _trial_path(trial)
        steps = self._steps(folder)
        if not steps:
            return None
        step = steps[-1]
        local_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder / str(step), local_dir / str(step))
        log.info("restored %s step %d from %s", trial, step, folder)
        return step

    def upload(self, trial: str, step: int, step_dir: Path, *, metric: float | None = None,
               maximize: bool = True, hold_for_evaluation: bool = False) -> None:
        folder = self.root / _trial_path(trial)
        target = folder / str(step)
        if target.exists():
            return  # a resumed run saves the step it resumed from again: same content
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".{step}.{uuid.uuid4().hex}.tmp"
        try:
            shutil.copytree(step_dir, staging)
            os.replace(staging, target)
        except FileExistsError:
            pass  # Another attempt stored the same step meanwhile.
        except OSError as error:
            if not target.exists():
                raise
            log.debug("step %d of %s stored concurrently (%s)", step, trial, error)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        for old in self._steps(folder)[:-self.keep]:
            shutil.rmtree(folder / str(old), ignore_errors=True)


class ServiceCheckpointSync(CheckpointSync):
    """Checkpoints in the checkpoint service (it keeps each trial's latest and best).

    Args:
      address: host:port of the checkpoint service.
      token: the bearer token, if the service wants one.
    """

    def __init__(self, address: str, *, token: str | None = None):
        from batchlab.rpc.checkpoint_client import CheckpointClient
        from batchlab.rpc.client import channel

        self._channel = channel(address, token=token)
        self._client = CheckpointClient(self._channel)

    def restore(self, trial: str, local_dir: Path) -> int | None:
        local_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=local_dir))
        try:
            info = self._client.load_dir(trial, staging)
            if info is None:
                return None
            step = int(info.step)
            os.replace(staging, local_dir / str(step))
            log.info("restored %s step %d from the checkpoint service", trial, step)
            return step
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def upload(self, trial: str, step: int, step_dir: Path, *, metric: float | None = None,
               maximize: bool = True, hold_for_evaluation: bool = False) -> None:
        self._client.save_dir(trial, step, step_dir, metric=metric, maximize=maximize,
                              hold_for_evaluation=hold_for_evaluation)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._channel.close()
