"""An in-memory checkpoint store: for tests and for running the service without a disk."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import threading
import time
from collections.abc import Callable, Iterable

from batchlab.rpc.errors import NotFound
from services.checkpoints.storage import (
    CheckpointRecord,
    CheckpointStore,
    HashingWriter,
    OpenCheckpoint,
    load_candidates,
    mark,
    no_intact_error,
    retained_steps,
    validate_header,
    validate_trial,
)


class InMemoryCheckpointStore(CheckpointStore):
    """Keeps checkpoints in a dict; follows the same contract as the filesystem store.

    Args:
      keep_latest: recent steps kept per trial besides the best (>= 1).
      on_corrupt: called with ``(trial, step)`` whenever a load finds a corrupt checkpoint.
    """

    def __init__(self, *, keep_latest: int = 1,
                 on_corrupt: Callable[[str, int], None] | None = None):
        if keep_latest < 1:
            raise ValueError(f"keep_latest must be >= 1; got {keep_latest}")
        self.keep_latest = keep_latest
        self._on_corrupt = on_corrupt
        self._lock = threading.Lock()
        self._records: dict[str, dict[int, CheckpointRecord]] = {}
        # Content is mutable so that tests can corrupt it in place.
        self.content: dict[tuple[str, int], bytearray] = {}

    def save(self, trial: str, step: int, chunks: Iterable[bytes], *, sha256: str,
             size_bytes: int, metric: float | None = None,
             maximize: bool = True, hold: bool = False) -> CheckpointRecord:
        """Stores a checkpoint; see :meth:`CheckpointStore.save`."""
        validate_trial(trial)
        validate_header(step, sha256, size_bytes, metric)
        buffer = io.BytesIO()
        writer = HashingWriter(buffer, size_bytes)
        for chunk in chunks:
            writer.write(chunk)
        writer.check(sha256)
        record = CheckpointRecord(trial, step, sha256, size_bytes,
                                  None if metric is None else float(metric), bool(maximize),
                                  time.time(), held=bool(hold))
        with self._lock:
            records = self._records.setdefault(trial, {})
            records[step] = record
            self.content[(trial, step)] = bytearray(buffer.getvalue())
            marked = self._retain(trial, records)
        return next((r for r in marked if r.step == step), record)

    def _retain(self, trial: str, records: dict[int, CheckpointRecord]) -> list[CheckpointRecord]:
        keep = retained_steps(records.values(), self.keep_latest)
        for old in [s for s in records if s not in keep]:
            del records[old]
            del self.content[(trial, old)]
        return mark(records.values())

    def record_evaluation(self, trial: str, step: int, *, metric: float | None = None,
                          maximize: bool = True) -> CheckpointRecord:
        """Records a metric and releases a hold; see :meth:`CheckpointStore.record_evaluation`."""
        validate_trial(trial)
        validate_header(step, "0" * 64, 0, metric)
        with self._lock:
            records = self._records.get(trial, {})
            if step not in records:
                raise NotFound(f"{trial} step {step}", f"stored steps: {sorted(records)}")
            record = dataclasses.replace(
                records[step], held=False, maximize=bool(maximize),
                metric=records[step].metric if metric is None else float(metric))
            records[step] = record
            marked = self._retain(trial, records)
        return next((r for r in marked if r.step == step), record)

    def open(self, trial: str, step: int | None = None) -> OpenCheckpoint:
        """Opens a verified checkpoint; see :meth:`CheckpointStore.open`."""
        validate_trial(trial)
        with self._lock:
            records = mark(self._records.get(trial, {}).values())
            blobs = {r.step: bytes(self.content[(trial, r.step)]) for r in records}
        skipped: list[int] = []
        for record in load_candidates(records, trial, step):
            blob = blobs[record.step]
            if hashlib.sha256(blob).hexdigest() != record.sha256 or len(blob) != record.size_bytes:
                skipped.append(record.step)
                if self._on_corrupt is not None:
                    self._on_corrupt(trial, record.step)
                continue
            return OpenCheckpoint(record, io.BytesIO(blob),
                                  fallback_from=skipped[0] if skipped else None,
                                  skipped=tuple(skipped))
        raise no_intact_error(trial, skipped)

    def list(self, trial: str) -> list[CheckpointRecord]:
        """Returns a trial's checkpoints by step; see :meth:`CheckpointStore.list`."""
        validate_trial(trial)
        with self._lock:
            return mark(self._records.get(trial, {}).values())

    def delete(self, trial: str) -> int:
        """Deletes a trial's checkpoints; see :meth:`CheckpointStore.delete`."""
        validate_trial(trial)
        with self._lock:
            records = self._records.pop(trial, {})
            for step in records:
                del self.content[(trial, step)]
        return len(records)

    def size_bytes(self) -> int:
        """Returns the bytes of all stored content."""
        with self._lock:
            return sum(len(blob) for blob in self.content.values())

    def count(self) -> int:
        """Returns how many checkpoints the store holds."""
        with self._lock:
            return len(self.content)
