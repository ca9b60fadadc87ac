"""Checkpoint storage: the store interface, its shared rules, and the filesystem store.

Rules every store follows (the contract suite in tests/services/checkpoints checks them):

* Trial names are ``/``-separated segments of ``[A-Za-z0-9._-]`` (no ``.``/``..``, no
  leading or trailing ``/``); anything else is :class:`InvalidArgument` naming ``trial``.
* A save streams the content, checks its size and sha256 against the declared ones and stores
  nothing on a mismatch (size: InvalidArgument ``size_bytes``; hash: DataLoss ``sha256``).
* Retention, after each successful save: per trial keep the ``keep_latest`` highest steps and
  the best one by metric (larger is better when the newest save says ``maximize``), and every
  checkpoint held for evaluation; delete the rest. Saving an existing step replaces it.
* A checkpoint saved with ``hold`` (an evaluation point the evaluation service has not read)
  stays until ``record_evaluation`` gives its metric and releases it; retention then applies.
* Every load hashes the content; a corrupt checkpoint is skipped for the next older intact
  one (``fallback_from`` names the step asked for); NotFound when none is intact.

Filesystem layout under the root (one server process per root)::

    <root>/<trial segments>/@checkpoints/<step:020d>-<sha256[:16]>.bin   content
    <root>/<trial segments>/@checkpoints/<step:020d>.json                metadata

The metadata file is the commit point: it is written last, atomically (temp file in the same
folder, fsync, ``os.replace``), and names its content file, so a reader sees either the old
checkpoint or the new one, never a mix. ``@`` cannot occur in a trial segment, so checkpoint
folders never collide with a nested trial's folders.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from batchlab import limits
from batchlab.files import atomic_write
from batchlab.limits import shorten
from batchlab.rpc.errors import DataLoss, InvalidArgument, NotFound

logger = logging.getLogger(__name__)

MAX_TRIAL_LENGTH = 512
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_READ_SIZE = 1 << 20
CHECKPOINT_DIR = "@checkpoints"
_TEMP_PREFIX = ".tmp-"
_META_VERSION = 1


def validate_trial(trial: str, field: str = "trial") -> tuple[str, ...]:
    """Checks a trial name and returns its segments.

    Args:
      trial: e.g. ``experiments/e1/studies/s1/trials/3-r0``.
      field: the request field to blame in the error.

    Returns:
      The segments.

    Raises:
      InvalidArgument: naming ``field`` and what is wrong.
    """
    if not isinstance(trial, str) or not trial:
        raise InvalidArgument(field, "must be a non-empty trial name")
    if len(trial) > MAX_TRIAL_LENGTH:
        raise InvalidArgument(field, f"must be at most {MAX_TRIAL_LENGTH} characters")
    if trial.startswith("/"):
        raise InvalidArgument(field, "must be a relative name, not an absolute path: "
                                     f"{shorten(trial)}")
    segments = tuple(trial.split("/"))
    for segment in segments:
        if segment in ("", ".", ".."):
            raise InvalidArgument(
                field, f"segments must not be empty, '.' or '..'; got {shorten(trial)}")
        if not _SEGMENT.fullmatch(segment):
            raise InvalidArgument(
                field, f"segments may only use [A-Za-z0-9._-]; got {shorten(segment)} in "
                       f"{shorten(trial)}")
    return segments


def validate_header(step: Any, sha256: Any, size_bytes: Any, metric: Any, *,
                    max_bytes: int = limits.MAX_CHECKPOINT_BYTES) -> None:
    """Checks the declared properties of a checkpoint to save.

    Args:
      step: the training step, 0 to ``batchlab.limits.MAX_STEPS`` (a step no run can reach,
        such as 2**64 - 1, would become the trial's "latest" and retention would delete the
        real latest).
      sha256: 64 lowercase hex digits.
      size_bytes: content length, 0 to ``max_bytes``.
      metric: a finite number or None.
      max_bytes: the largest checkpoint accepted.

    Raises:
      InvalidArgument: naming the field (``step``, ``sha256``, ``size_bytes``, ``metric``).
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= limits.MAX_STEPS:
        raise InvalidArgument("step", f"must be an integer from 0 to {limits.MAX_STEPS} "
                                      f"(batchlab.limits.MAX_STEPS); got {step!r}")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise InvalidArgument("sha256", "must be 64 lowercase hex digits (the content's sha256)")
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 0:
        raise InvalidArgument("size_bytes", f"must be an integer >= 0; got {size_bytes!r}")
    if size_bytes > max_bytes:
        raise InvalidArgument("size_bytes", f"must be at most {max_bytes} bytes (the store's "
                                            f"limit, BATCHLAB_CHECKPOINT_MAX_BYTES); got "
                                            f"{size_bytes}")
    if metric is not None and (
        isinstance(metric, bool) or not isinstance(metric, int | float)
        or not math.isfinite(metric)
    ):
        raise InvalidArgument("metric", f"must be a finite number when set; got {metric!r}")


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    """What a store knows about one checkpoint.

    Attributes:
      trial: the owning trial's name.
      step: the training step.
      sha256: hex sha256 of the content.
      size_bytes: content length.
      metric: the metric used to pick the best checkpoint, if any.
      maximize: whether a larger metric is better.
      create_time: when it was stored (seconds since the epoch).
      is_best: it has the best metric of its trial.
      is_latest: it has the highest step of its trial.
      held: saved for evaluation and not evaluated yet (retention keeps it).
    """

    trial: str
    step: int
    sha256: str
    size_bytes: int
    metric: float | None
    maximize: bool
    create_time: float
    is_best: bool = False
    is_latest: bool = False
    held: bool = False


def best_step(records: Iterable[CheckpointRecord], maximize: bool) -> int | None:
    """Returns the step with the best metric (ties: the later step), or None without metrics.

    Args:
      records: one trial's checkpoints.
      maximize: whether a larger metric is better.
    """
    scored = [(r.metric, r.step) for r in records if r.metric is not None]
    if not scored:
        return None
    sign = 1.0 if maximize else -1.0
    return max(scored, key=lambda pair: (sign * pair[0], pair[1]))[1]


def mark(records: Iterable[CheckpointRecord]) -> list[CheckpointRecord]:
    """Returns one trial's records sorted by step with ``is_best`` / ``is_latest`` set.

    The newest record's ``maximize`` decides what "best" means.

    Args:
      records: one trial's checkpoints.
    """
    ordered = sorted(records, key=lambda r: r.step)
    if not ordered:
        return []
    latest = ordered[-1].step
    best = best_step(ordered, ordered[-1].maximize)
    return [dataclasses.replace(r, is_best=r.step == best, is_latest=r.step == latest)
            for r in ordered]


def retained_steps(records: Iterable[CheckpointRecord], keep_latest: int) -> set[int]:
    """Returns the steps retention keeps: the ``keep_latest`` highest and the best.

    Args:
      records: one trial's checkpoints.
      keep_latest: how many of the most recent steps to keep (>= 1).
    """
    ordered = sorted(records, key=lambda r: r.step)
    keep = {r.step for r in ordered[-keep_latest:]} | {r.step for r in ordered if r.held}
    if ordered:
        best = best_step(ordered, ordered[-1].maximize)
        if best is not None:
            keep.add(best)
    return keep


class HashingWriter:
    """Counts and hashes bytes on their way to a file; refuses more than declared.

    Args:
      out: the binary file to write to (None: only count and hash).
      size_bytes: the declared length.
    """

    def __init__(self, out: BinaryIO | None, size_bytes: int):
        self._out = out
        self._expected = size_bytes
        self._hash = hashlib.sha256()
        self.written = 0

    def write(self, chunk: bytes) -> None:
        """Writes one chunk.

        Args:
          chunk: the next bytes of the content.

        Raises:
          InvalidArgument: ``size_bytes``, as soon as the content exceeds the declared size.
        """
        self.written += len(chunk)
        if self.written > self._expected:
            raise InvalidArgument(
                "size_bytes",
                f"the content is longer than the declared {self._expected} bytes")
        self._hash.update(chunk)
        if self._out is not None:
            self._out.write(chunk)

    def check(self, sha256: str) -> None:
        """Checks the total length and hash once all chunks are written.

        Args:
          sha256: the declared hex sha256.

        Raises:
          InvalidArgument: ``size_bytes`` when shorter than declared.
          DataLoss: when the content's sha256 differs from ``sha256`` (field ``sha256``).
        """
        if self.written != self._expected:
            raise InvalidArgument(
                "size_bytes",
                f"declared {self._expected} bytes but received {self.written}")
        actual = self._hash.hexdigest()
        if actual != sha256:
            raise DataLoss(
                f"the content's sha256 is {actual} but the header says {sha256}; nothing stored",
                field_path="sha256")


class OpenCheckpoint(contextlib.AbstractContextManager["OpenCheckpoint", None]):
    """A verified checkpoint ready to stream; close it (or use ``with``) when done.

    Attributes:
      record: the checkpoint served (flags set as among its trial's checkpoints).
      fallback_from: the step asked for when it was corrupt and this older one is served.
      skipped: steps found corrupt on the way (newest first).
    """

    def __init__(self, record: CheckpointRecord, source: BinaryIO, *,
                 fallback_from: int | None, skipped: tuple[int, ...]):
        self.record = record
        self.fallback_from = fallback_from
        self.skipped = skipped
        self._source = source

    def chunks(self, size: int = _READ_SIZE) -> Iterator[bytes]:
        """Yields the content in pieces of at most ``size`` bytes, from the start.

        Args:
          size: bytes per piece.
        """
        self._source.seek(0)
        while piece := self._source.read(size):
            yield piece

    def close(self) -> None:
        """Releases the content."""
        self._source.close()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class CheckpointStore(abc.ABC):
    """Where checkpoints live; every method is safe to call from several threads."""

    @abc.abstractmethod
    def save(self, trial: str, step: int, chunks: Iterable[bytes], *, sha256: str,
             size_bytes: int, metric: float | None = None,
             maximize: bool = True, hold: bool = False) -> CheckpointRecord:
        """Stores a checkpoint from a stream of chunks, then applies retention.

        Args:
          trial: the owning trial's name.
          step: the training step; an existing one is replaced.
          chunks: the content, in order (consumed once).
          sha256: the content's declared sha256 (hex).
          size_bytes: the content's declared length.
          metric: the metric for "best" retention, if any.
          maximize: whether a larger metric is better.
          hold: keep it until ``record_evaluation`` releases it.

        Returns:
          The stored checkpoint's record (flags as after retention).

        Raises:
          InvalidArgument: a bad name or header field, or the wrong length.
          DataLoss: the content does not match ``sha256``. Nothing is stored on any error.
        """

    @abc.abstractmethod
    def record_evaluation(self, trial: str, step: int, *, metric: float | None = None,
                          maximize: bool = True) -> CheckpointRecord:
        """Records an evaluated metric of a stored checkpoint and releases its hold.

        Retention then applies to the trial (a released older checkpoint that is neither
        among the latest nor the best goes).

        Args:
          trial: the trial's name.
          step: the checkpoint's step.
          metric: the evaluated metric (None: keep the stored one, only release).
          maximize: whether a larger metric is better.

        Returns:
          The checkpoint's record after the change (its flags as after retention; a record
          that retention deleted has is_best and is_latest False).

        Raises:
          InvalidArgument: a bad name or metric.
          NotFound: the trial has no checkpoint at ``step``.
        """

    @abc.abstractmethod
    def open(self, trial: str, step: int | None = None) -> OpenCheckpoint:
        """Opens the checkpoint at ``step`` (latest when None) after verifying its hash.

        A corrupt one is skipped for the next older intact one.

        Args:
          trial: the trial's name.
          step: the step wanted; None for the latest.

        Returns:
          The open checkpoint.

        Raises:
          InvalidArgument: a bad name.
          NotFound: no such step, no checkpoint, or none intact.
        """

    @abc.abstractmethod
    def list(self, trial: str) -> list[CheckpointRecord]:
        """Returns a trial's checkpoints by step (not hash-verified: that is for loads).

        Args:
          trial: the trial's name.
        """

    @abc.abstractmethod
    def delete(self, trial: str) -> int:
        """Deletes every checkpoint of a trial; returns how many there were.

        Args:
          trial: the trial's name.
        """

    @abc.abstractmethod
    def size_bytes(self) -> int:
        """Returns the bytes the whole store uses."""

    @abc.abstractmethod
    def count(self) -> int:
        """Returns how many checkpoints the whole store holds."""


def load_candidates(records: list[CheckpointRecord], trial: str,
                step: int | None) -> list[CheckpointRecord]:
    """Returns the checkpoints to try for a load, newest first (the wanted one first).

    Args:
      records: the trial's checkpoints.
      trial: the trial's name (for errors).
      step: the step wanted, or None for the latest.

    Raises:
      NotFound: when the trial has no checkpoint, or not ``step``.
    """
    if not records:
        raise NotFound(trial, "the trial has no checkpoints")
    if step is not None:
        if all(r.step != step for r in records):
            raise NotFound(f"{trial} step {step}",
                           f"stored steps: {[r.step for r in records]}")
        records = [r for r in records if r.step <= step]
    return sorted(records, key=lambda r: r.step, reverse=True)


def no_intact_error(trial: str, skipped: list[int]) -> NotFound:
    """Returns the error for a load that found only corrupt checkpoints.

    Args:
      trial: the trial's name.
      skipped: the corrupt steps.
    """
    return NotFound(trial, f"no intact checkpoint; corrupt: steps {skipped}")


class FilesystemCheckpointStore(CheckpointStore):
    """Checkpoints as files under a root folder (see the module docstring for the layout).

    Assumes it is the only writer of ``root`` (one server process).

    Args:
      root: the folder (created if missing).
      keep_latest: recent steps kept per trial besides the best (>= 1).
      on_corrupt: called with ``(trial, step)`` whenever a load finds a corrupt checkpoint.
      max_bytes: the largest checkpoint accepted.
    """

    def __init__(self, root: str | os.PathLike[str], *, keep_latest: int = 1,
                 on_corrupt: Callable[[str, int], None] | None = None,
                 max_bytes: int = limits.MAX_CHECKPOINT_BYTES):
        if keep_latest < 1:
            raise ValueError(f"keep_latest must be >= 1; got {keep_latest}")
        self.root = pathlib.Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_latest = keep_latest
        self._on_corrupt = on_corrupt
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self._remove_stale_temp_files()

    # ------------------------------------------------------------------ paths

    def _trial_dir(self, trial: str) -> pathlib.Path:
        """The trial's checkpoint folder; never outside the root, even through links."""
        segments = validate_trial(trial)
        path = self.root.joinpath(*segments, CHECKPOINT_DIR)
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise InvalidArgument("trial", f"resolves outside the store: {trial!r}")
        return resolved

    @staticmethod
    def _meta_name(step: int) -> str:
        return f"{step:020d}.json"

    @staticmethod
    def _content_name(step: int, sha256: str) -> str:
        return f"{step:020d}-{sha256[:16]}.bin"

    def _remove_stale_temp_files(self) -> None:
        # Left by a crash mid-upload; safe because this process is the root's only writer.
        for path in self.root.rglob(f"{_TEMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                path.unlink()
                logger.info("removed stale temp file %s", path)

    # ------------------------------------------------------------- metadata

    def _read_records(self, folder: pathlib.Path, trial: str) -> list[CheckpointRecord]:
        records: list[CheckpointRecord] = []
        if not folder.is_dir():
            return records
        for meta in sorted(folder.glob("*.json")):
            try:
                data = json.loads(meta.read_text())
                record = CheckpointRecord(
                    trial=trial,
                    step=int(data["step"]),
                    sha256=str(data["sha256"]),
                    size_bytes=int(data["size_bytes"]),
                    metric=None if data["metric"] is None else float(data["metric"]),
                    maximize=bool(data["maximize"]),
                    create_time=float(data["create_time"]),
                    held=bool(data.get("held", False)),
                )
                if data["content"] != self._content_name(record.step, record.sha256):
                    raise ValueError(f"content name {data['content']!r} does not match")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Unreadable metadata: the checkpoint cannot be verified, so it does not exist.
                logger.error("skipping unreadable checkpoint metadata %s: %s", meta, exc)
                continue
            records.append(record)
        return records

    def _write_atomic(self, folder: pathlib.Path, name: str, data: bytes) -> None:
        atomic_write(folder / name, data, temp_prefix=_TEMP_PREFIX)

    @staticmethod
    def _fsync_dir(folder: pathlib.Path) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------- API

    def save(self, trial: str, step: int, chunks: Iterable[bytes], *, sha256: str,
             size_bytes: int, metric: float | None = None,
             maximize: bool = True, hold: bool = False) -> CheckpointRecord:
        """Stores a checkpoint from a stream of chunks, then applies retention.

        See :meth:`CheckpointStore.save`.
        """
        folder = self._trial_dir(trial)
        validate_header(step, sha256, size_bytes, metric, max_bytes=self.max_bytes)
        with self._lock:
            # Created under the lock so that a concurrent delete cannot prune the folder
            # between its creation and the temp file's.
            folder.mkdir(parents=True, exist_ok=True)
            temp = folder / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
            out = open(temp, "xb")  # Closed below, in every case.
        try:
            with out:
                writer = HashingWriter(out, size_bytes)
                for chunk in chunks:
                    writer.write(chunk)
                writer.check(sha256)
                out.flush()
                os.fsync(out.fileno())
            record = CheckpointRecord(trial, step, sha256, size_bytes,
                                      None if metric is None else float(metric),
                                      bool(maximize), time.time(), held=bool(hold))
            meta = self._meta_bytes(record)
            with self._lock:
                previous = {r.step: r for r in self._read_records(folder, trial)}.get(step)
                os.replace(temp, folder / self._content_name(step, sha256))
                self._write_atomic(folder, self._meta_name(step), meta)
                self._fsync_dir(folder)
                if previous is not None and previous.sha256[:16] != sha256[:16]:
                    self._unlink(folder / self._content_name(step, previous.sha256))
                marked = self._apply_retention(folder, trial)
        except BaseException:
            with self._lock:
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
                self._prune(folder)  # Only if the failed upload left it empty.
            raise
        logger.info("saved %s step %d (%d bytes)", trial, step, size_bytes)
        return next((r for r in marked if r.step == step), record)

    def _meta_bytes(self, record: CheckpointRecord) -> bytes:
        return json.dumps({
            "version": _META_VERSION, "trial": record.trial, "step": record.step,
            "sha256": record.sha256, "size_bytes": record.size_bytes, "metric": record.metric,
            "maximize": record.maximize, "create_time": record.create_time,
            "held": record.held, "content": self._content_name(record.step, record.sha256),
        }, indent=1).encode()

    def record_evaluation(self, trial: str, step: int, *, metric: float | None = None,
                          maximize: bool = True) -> CheckpointRecord:
        """Records a metric and releases a hold; see :meth:`CheckpointStore.record_evaluation`."""
        folder = self._trial_dir(trial)
        validate_header(step, "0" * 64, 0, metric)
        with self._lock:
            records = {r.step: r for r in self._read_records(folder, trial)}
            if step not in records:
                raise NotFound(f"{trial} step {step}", f"stored steps: {sorted(records)}")
            record = dataclasses.replace(
                records[step], held=False, maximize=bool(maximize),
                metric=records[step].metric if metric is None else float(metric))
            self._write_atomic(folder, self._meta_name(step), self._meta_bytes(record))
            self._fsync_dir(folder)
            marked = self._apply_retention(folder, trial)
        return next((r for r in marked if r.step == step), record)

    def _unlink(self, path: pathlib.Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _delete_record(self, folder: pathlib.Path, record: CheckpointRecord) -> None:
        # Metadata first: once it is gone the checkpoint no longer exists for readers.
        self._unlink(folder / self._meta_name(record.step))
        self._unlink(folder / self._content_name(record.step, record.sha256))

    def _apply_retention(self, folder: pathlib.Path, trial: str) -> list[CheckpointRecord]:
        records = self._read_records(folder, trial)
        keep = retained_steps(records, self.keep_latest)
        for record in records:
            if record.step not in keep:
                self._delete_record(folder, record)
                logger.info("retention deleted %s step %d", trial, record.step)
        return mark(r for r in records if r.step in keep)

    def open(self, trial: str, step: int | None = None) -> OpenCheckpoint:
        """Opens a verified checkpoint; see :meth:`CheckpointStore.open`."""
        folder = self._trial_dir(trial)
        with self._lock:
            records = mark(self._read_records(folder, trial))
        skipped: list[int] = []
        for record in load_candidates(records, trial, step):
            source = self._open_verified(folder, record)
            if source is None:
                skipped.append(record.step)
                if self._on_corrupt is not None:
                    self._on_corrupt(trial, record.step)
                continue
            fallback = skipped[0] if skipped else None
            if fallback is not None:
                logger.warning("serving %s step %d instead of corrupt step %d",
                               trial, record.step, fallback)
            return OpenCheckpoint(record, source, fallback_from=fallback,
                                  skipped=tuple(skipped))
        raise no_intact_error(trial, skipped)

    def _open_verified(self, folder: pathlib.Path, record: CheckpointRecord) -> BinaryIO | None:
        """Opens the content and checks its hash; None (logged) when it is corrupt."""
        path = folder / self._content_name(record.step, record.sha256)
        with self._lock:
            # Opened under the lock: a concurrent retention may unlink it afterwards, but an
            # open file stays readable.
            try:
                source = open(path, "rb")  # Handed to OpenCheckpoint.
            except OSError as exc:
                logger.error("checkpoint %s step %d is missing its content: %s",
                             record.trial, record.step, exc)
                return None
        digest = hashlib.sha256()
        size = 0
        try:
            while piece := source.read(_READ_SIZE):
                digest.update(piece)
                size += len(piece)
        except OSError as exc:
            source.close()
            logger.error("checkpoint %s step %d is unreadable: %s", record.trial, record.step, exc)
            return None
        if size != record.size_bytes or digest.hexdigest() != record.sha256:
            source.close()
            logger.error("checkpoint %s step %d is corrupt: %d bytes, sha256 %s (stored %d, %s)",
                         record.trial, record.step, size, digest.hexdigest(),
                         record.size_bytes, record.sha256)
            return None
        return source

    def list(self, trial: str) -> list[CheckpointRecord]:
        """Returns a trial's checkpoints by step; see :meth:`CheckpointStore.list`."""
        folder = self._trial_dir(trial)
        with self._lock:
            return mark(self._read_records(folder, trial))

    def delete(self, trial: str) -> int:
        """Deletes a trial's checkpoints; see :meth:`CheckpointStore.delete`."""
        folder = self._trial_dir(trial)
        with self._lock:
            records = self._read_records(folder, trial)
            for record in records:
                self._delete_record(folder, record)
            if folder.is_dir():
                for leftover in folder.iterdir():
                    # Content without metadata, unreadable metadata: all the trial's. Temp
                    # files belong to uploads in progress, which finish on their own.
                    if not leftover.name.startswith(_TEMP_PREFIX):
                        self._unlink(leftover)
                self._prune(folder)
        logger.info("deleted %d checkpoints of %s", len(records), trial)
        return len(records)

    def _prune(self, folder: pathlib.Path) -> None:
        """Removes ``folder`` and its empty parents, up to (not including) the root."""
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:  # Not empty (another trial lives below) or already gone.
                return
            folder = folder.parent

    def count(self) -> int:
        """Returns how many checkpoints (metadata files) the store holds."""
        return sum(1 for _ in self.root.rglob(f"{CHECKPOINT_DIR}/*.json"))

    def size_bytes(self) -> int:
        """Returns the bytes of every file under the root."""
        total = 0
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(dirpath, name)).st_size
        return total
