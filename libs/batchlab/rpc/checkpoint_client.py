"""Uploads and downloads checkpoint folders (e.g. orbax's) to and from the checkpoint service.

A folder travels as an uncompressed tar (checkpoints are mostly incompressible float arrays)
streamed in 1 MiB chunks with its sha256. The tar is spooled: in memory up to
``spool_bytes``, then in a temp file, so a large checkpoint never sits whole in memory. On
download the hash is checked again and the tar is unpacked safely: absolute paths, ``..``,
links and special files are refused, and the folder appears at its path only once complete.

Example:
  >>> client = CheckpointClient(channel("127.0.0.1:50053"))  # doctest: +SKIP
  >>> client.save_dir(trial, step=200, directory="/tmp/ckpt/200", metric=0.91)  # doctest: +SKIP
  >>> info = client.load_dir(trial, "/tmp/restore")  # doctest: +SKIP
  >>> None if info is None else info.step  # doctest: +SKIP
  200
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import stat
import tarfile
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from typing import IO

import grpc

from batchlab.proto.v1 import checkpoints_pb2, checkpoints_pb2_grpc

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
SPOOL_BYTES = 64 << 20


class UnsafeArchiveError(ValueError):
    """A downloaded checkpoint archive holds an entry that could escape its folder."""


def _hash_file(f: IO[bytes]) -> tuple[str, int]:
    f.seek(0)
    digest, size = hashlib.sha256(), 0
    while piece := f.read(CHUNK_SIZE):
        digest.update(piece)
        size += len(piece)
    f.seek(0)
    return digest.hexdigest(), size


def pack_dir(directory: str | os.PathLike[str], out: IO[bytes]) -> None:
    """Writes a folder as an uncompressed tar, entries sorted, owners and times zeroed.

    The same folder content always gives the same bytes (and hash).

    Args:
      directory: the folder to pack (its content, not the folder itself, is archived).
      out: a binary file to write to.

    Raises:
      NotADirectoryError: when ``directory`` is not a folder.
      ValueError: when it contains a link or special file (naming it).
    """
    root = pathlib.Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in [*dirnames, *sorted(filenames)]:
                path = pathlib.Path(dirpath, name)
                mode = path.lstat().st_mode
                if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                    raise ValueError(f"only regular files and folders can be checkpointed; "
                                     f"{path} is a link or special file")
                info = tar.gettarinfo(path, arcname=path.relative_to(root).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                if info.isfile():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)


def _safe_target(base: pathlib.Path, name: str) -> pathlib.Path:
    parts = pathlib.PurePosixPath(name).parts
    if not parts or name.startswith("/") or pathlib.PureWindowsPath(name).drive:
        raise UnsafeArchiveError(f"archive entry {name!r} has an absolute or empty path")
    if ".." in parts:
        raise UnsafeArchiveError(f"archive entry {name!r} leaves its folder ('..')")
    target = base.joinpath(*parts)
    if not target.resolve().is_relative_to(base.resolve()):
        raise UnsafeArchiveError(f"archive entry {name!r} resolves outside its folder")
    return target


def unpack_dir(archive: IO[bytes], directory: str | os.PathLike[str]) -> None:
    """Unpacks a tar made by :func:`pack_dir` into an existing empty folder, safely.

    Only regular files and folders are accepted; absolute names, ``..`` and links are
    refused before anything is written outside ``directory``.

    Args:
      archive: the tar, positioned at its start.
      directory: the folder to unpack into.

    Raises:
      UnsafeArchiveError: naming the first offending entry.
    """
    base = pathlib.Path(directory)
    with tarfile.open(fileobj=archive, mode="r:") as tar:
        for member in tar:
            target = _safe_target(base, member.name)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular file's entry always has content
                with source, open(target, "xb") as out:
                    shutil.copyfileobj(source, out, CHUNK_SIZE)
                # Keep the owner's execute bit only; never set-id bits from an archive.
                os.chmod(target, 0o755 if member.mode & 0o100 else 0o644)
            else:
                raise UnsafeArchiveError(
                    f"archive entry {member.name!r} is a link or special file")


class CheckpointClient:
    """Saves and loads checkpoint folders through a ``CheckpointService`` channel.

    Args:
      channel: a channel to the checkpoint service (see :func:`batchlab.rpc.client.channel`).
      timeout: seconds each call may take (None: no deadline).
      chunk_size: bytes per upload message.
      spool_bytes: archive size kept in memory before spilling to a temp file.
    """

    def __init__(self, channel: grpc.Channel, *, timeout: float | None = None,
                 chunk_size: int = CHUNK_SIZE, spool_bytes: int = SPOOL_BYTES):
        self._stub = checkpoints_pb2_grpc.CheckpointServiceStub(channel)
        self._timeout = timeout
        self._chunk_size = chunk_size
        self._spool_bytes = spool_bytes

    def _spool(self) -> tempfile.SpooledTemporaryFile[bytes]:
        return tempfile.SpooledTemporaryFile(max_size=self._spool_bytes, mode="w+b")

    def save_dir(self, trial: str, step: int, directory: str | os.PathLike[str], *,
                 metric: float | None = None, maximize: bool = True,
                 hold_for_evaluation: bool = False) -> checkpoints_pb2.CheckpointInfo:
        """Uploads a folder as the checkpoint of ``trial`` at ``step``.

        Args:
          trial: the trial's resource name.
          step: the training step.
          directory: the checkpoint folder (regular files and folders only).
          metric: the metric that decides which checkpoint is kept as the best.
          maximize: whether a larger metric is better.
          hold_for_evaluation: keep it until ``record_evaluation`` is called for it (an
            evaluation point the evaluation service has not read yet).

        Returns:
          The stored ``CheckpointInfo``.

        Raises:
          grpc.RpcError: from the service (INVALID_ARGUMENT names the field).
        """
        with self._spool() as archive:
            pack_dir(directory, archive)
            sha256, size = _hash_file(archive)
            header = checkpoints_pb2.CheckpointHeader(
                trial=trial, step=step, maximize=maximize, sha256=sha256, size_bytes=size,
                hold_for_evaluation=hold_for_evaluation)
            if metric is not None:
                header.metric = metric

            def requests() -> Iterator[checkpoints_pb2.SaveCheckpointRequest]:
                yield checkpoints_pb2.SaveCheckpointRequest(header=header)
                while piece := archive.read(self._chunk_size):
                    yield checkpoints_pb2.SaveCheckpointRequest(data=piece)

            info: checkpoints_pb2.CheckpointInfo = self._stub.SaveCheckpoint(
                requests(), timeout=self._timeout)
        logger.info("uploaded %s step %d (%d bytes)", trial, step, size)
        return info

    def load_dir(self, trial: str, directory: str | os.PathLike[str], *,
                 step: int | None = None) -> checkpoints_pb2.CheckpointInfo | None:
        """Downloads a checkpoint into ``directory`` (which must not exist or be empty).

        The folder appears complete or not at all: the archive is unpacked next to it and
        renamed into place.

        Args:
          trial: the trial's resource name.
          directory: where the checkpoint folder should appear.
          step: the step to load; None for the latest intact one.

        Returns:
          The ``CheckpointInfo`` of what was loaded (``fallback_from`` is set when the
          requested one was corrupt), or None when the trial has no usable checkpoint.

        Raises:
          FileExistsError: when ``directory`` exists and is not empty.
          grpc.RpcError: DATA_LOSS when the received bytes do not match the hash; others
            from the service.
          UnsafeArchiveError: when the archive would write outside ``directory``.
        """
        target = pathlib.Path(directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise FileExistsError(f"{target} exists and is not an empty folder")
        request = checkpoints_pb2.LoadCheckpointRequest(trial=trial)
        if step is not None:
            request.step = step
        with self._spool() as archive:
            try:
                info = self._receive(self._stub.LoadCheckpoint(request, timeout=self._timeout),
                                     archive)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    logger.info("no checkpoint to load for %s: %s", trial, exc.details())
                    return None
                raise
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            try:
                unpack_dir(archive, staging)
                if target.exists():
                    target.rmdir()  # Empty, checked above.
                os.replace(staging, target)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        logger.info("downloaded %s step %d (%d bytes)%s", trial, info.step, info.size_bytes,
                    f", instead of corrupt step {info.fallback_from}"
                    if info.HasField("fallback_from") else "")
        return info

    @staticmethod
    def _receive(responses: Iterable[checkpoints_pb2.LoadCheckpointResponse],
                 archive: IO[bytes]) -> checkpoints_pb2.CheckpointInfo:
        info = None
        digest, size = hashlib.sha256(), 0
        for response in responses:
            if response.WhichOneof("kind") == "info":
                info = response.info
            else:
                digest.update(response.data)
                size += len(response.data)
                archive.write(response.data)
        if info is None:
            raise _LocalRpcError(grpc.StatusCode.DATA_LOSS, "the stream carried no info")
        if size != info.size_bytes or digest.hexdigest() != info.sha256:
            raise _LocalRpcError(
                grpc.StatusCode.DATA_LOSS,
                f"received {size} bytes with sha256 {digest.hexdigest()}; "
                f"expected {info.size_bytes} bytes with {info.sha256}")
        archive.seek(0)
        return info

    def record_evaluation(self, trial: str, step: int, *, metric: float | None = None,
                          maximize: bool = True) -> checkpoints_pb2.CheckpointInfo:
        """Records an evaluated metric of a stored checkpoint and releases its evaluation hold.

        Args:
          trial: the trial's resource name.
          step: the checkpoint's step.
          metric: the evaluated metric that decides the best checkpoint (None: only release).
          maximize: whether a larger metric is better.

        Returns:
          The checkpoint's ``CheckpointInfo`` after the change (``is_best`` says whether it is
          now the trial's best).
        """
        request = checkpoints_pb2.RecordEvaluationRequest(trial=trial, step=step,
                                                          maximize=maximize)
        if metric is not None:
            request.metric = metric
        info: checkpoints_pb2.CheckpointInfo = self._stub.RecordEvaluation(
            request, timeout=self._timeout)
        return info

    def list(self, trial: str) -> list[checkpoints_pb2.CheckpointInfo]:
        """Returns a trial's checkpoints, by step.

        Args:
          trial: the trial's resource name.
        """
        response = self._stub.ListCheckpoints(
            checkpoints_pb2.ListCheckpointsRequest(trial=trial), timeout=self._timeout)
        return list(response.checkpoints)

    def delete(self, trial: str) -> int:
        """Deletes every checkpoint of a trial; returns how many were deleted.

        Args:
          trial: the trial's resource name.
        """
        response: checkpoints_pb2.DeleteCheckpointsResponse = self._stub.DeleteCheckpoints(
            checkpoints_pb2.DeleteCheckpointsRequest(trial=trial), timeout=self._timeout)
        return response.deleted


class _LocalRpcError(grpc.RpcError):
    """A failure detected on the client side, shaped like the service's errors."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        """The status code."""
        return self._code

    def details(self) -> str:
        """What went wrong."""
        return self._details

