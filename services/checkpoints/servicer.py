"""CheckpointService: the RPC logic over an injected :class:`CheckpointStore`.

Uploads stream through to the store (never held whole in memory); the store checks the size
and hash and keeps nothing on a mismatch. Downloads are verified by the store before the first
byte is sent, and the client checks the hash again on arrival.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
from google.protobuf import timestamp_pb2

from batchlab.proto.v1 import checkpoints_pb2, checkpoints_pb2_grpc
from batchlab.rpc.errors import InvalidArgument, ServiceError, handle_errors, status_for
from services.checkpoints.storage import CheckpointRecord, CheckpointStore, validate_trial

if TYPE_CHECKING:
    from batchlab.rpc.metrics import CheckpointMetrics

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
_HEADER_FIELDS = frozenset({"trial", "step", "sha256", "size_bytes", "metric"})


def to_info(record: CheckpointRecord, fallback_from: int | None = None
            ) -> checkpoints_pb2.CheckpointInfo:
    """Converts a store record to the ``CheckpointInfo`` message.

    Args:
      record: the record.
      fallback_from: the corrupt step this one replaces on a load, if any.
    """
    create_time = timestamp_pb2.Timestamp()
    create_time.FromNanoseconds(int(record.create_time * 1e9))
    info = checkpoints_pb2.CheckpointInfo(
        trial=record.trial,
        step=record.step,
        sha256=record.sha256,
        size_bytes=record.size_bytes,
        is_best=record.is_best,
        is_latest=record.is_latest,
        create_time=create_time,
        held_for_evaluation=record.held,
    )
    if record.metric is not None:
        info.metric = record.metric
    if fallback_from is not None:
        info.fallback_from = fallback_from
    return info


def _in_header(exc: ServiceError) -> ServiceError:
    """Re-homes a store error about a header field under ``header.`` (the request's path)."""
    if exc.field_path in _HEADER_FIELDS:
        if isinstance(exc, InvalidArgument):
            return exc.under("header")
        exc.field_path = f"header.{exc.field_path}"
    return exc


class CheckpointServicer(checkpoints_pb2_grpc.CheckpointServiceServicer):
    """Serves checkpoints from a store.

    Args:
      store: where checkpoints live.
      chunk_size: bytes per data message on loads.
      metrics: the ``CheckpointMetrics`` of ``make_metrics(...).checkpoints``, or None.
    """

    def __init__(self, store: CheckpointStore, *, chunk_size: int = CHUNK_SIZE,
                 metrics: CheckpointMetrics | None = None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
        self._store = store
        self._chunk_size = chunk_size
        self._metrics = metrics

    @contextlib.contextmanager
    def _measure(self, operation: str, size: list[int] | None = None) -> Iterator[None]:
        """Records an operation's latency, bytes (``size[0]`` at the end) or failure."""
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:
            if self._metrics is not None:
                reason = status_for(exc)[0].name.lower()
                self._metrics.failures.labels(operation=operation, reason=reason).inc()
            raise
        if self._metrics is not None:
            self._metrics.operations.labels(operation=operation).inc()
            self._metrics.latency.labels(operation=operation).observe(time.perf_counter() - start)
            if size:
                self._metrics.bytes.labels(operation=operation).inc(size[0])

    def update_store_gauges(self) -> None:
        """Sets the store size and checkpoint count gauges (after changes, and at startup)."""
        if self._metrics is not None:
            self._metrics.store_bytes.set(self._store.size_bytes())
            self._metrics.store_checkpoints.set(self._store.count())

    @handle_errors
    def SaveCheckpoint(self, request_iterator: Iterator[checkpoints_pb2.SaveCheckpointRequest],
                       context: grpc.ServicerContext) -> checkpoints_pb2.CheckpointInfo:
        """Stores a streamed checkpoint: a header message, then data messages in order.

        Args:
          request_iterator: ``SaveCheckpointRequest`` messages.
          context: the call context.

        Returns:
          The stored ``CheckpointInfo``.
        """
        size = [0]
        with self._measure("save", size):
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise InvalidArgument("header", "the first message must carry the header")
            header = first.header
            validate_trial(header.trial, "header.trial")

            def data() -> Iterator[bytes]:
                for message in request_iterator:
                    if message.WhichOneof("kind") != "data":
                        raise InvalidArgument("data", "only the first message may carry a header")
                    yield message.data

            try:
                record = self._store.save(
                    header.trial, header.step, data(),
                    sha256=header.sha256, size_bytes=header.size_bytes,
                    metric=header.metric if header.HasField("metric") else None,
                    maximize=header.maximize, hold=header.hold_for_evaluation,
                )
            except ServiceError as exc:
                raise _in_header(exc) from None
            size[0] = record.size_bytes
        self.update_store_gauges()
        return to_info(record)

    @handle_errors
    def LoadCheckpoint(self, request: checkpoints_pb2.LoadCheckpointRequest,
                       context: grpc.ServicerContext
                       ) -> Iterator[checkpoints_pb2.LoadCheckpointResponse]:
        """Streams a verified checkpoint: the info first, then its data.

        Args:
          request: ``LoadCheckpointRequest`` (``step`` absent = the latest intact one).
          context: the call context.

        Yields:
          ``LoadCheckpointResponse`` messages.
        """
        size = [0]
        with self._measure("restore", size):
            validate_trial(request.trial, "trial")
            step = request.step if request.HasField("step") else None
            with self._store.open(request.trial, step) as opened:
                yield checkpoints_pb2.LoadCheckpointResponse(
                    info=to_info(opened.record, opened.fallback_from))
                for chunk in opened.chunks(self._chunk_size):
                    yield checkpoints_pb2.LoadCheckpointResponse(data=chunk)
                size[0] = opened.record.size_bytes

    @handle_errors
    def ListCheckpoints(self, request: checkpoints_pb2.ListCheckpointsRequest,
                        context: grpc.ServicerContext
                        ) -> checkpoints_pb2.ListCheckpointsResponse:
        """Lists a trial's checkpoints (by step) and the store's size.

        Args:
          request: ``ListCheckpointsRequest``.
          context: the call context.
        """
        with self._measure("list"):
            validate_trial(request.trial, "trial")
            records = self._store.list(request.trial)
            return checkpoints_pb2.ListCheckpointsResponse(
                checkpoints=[to_info(r) for r in records],
                store_size_bytes=self._store.size_bytes(),
            )

    @handle_errors
    def DeleteCheckpoints(self, request: checkpoints_pb2.DeleteCheckpointsRequest,
                          context: grpc.ServicerContext
                          ) -> checkpoints_pb2.DeleteCheckpointsResponse:
        """Deletes every checkpoint of a trial (none is not an error).

        Args:
          request: ``DeleteCheckpointsRequest``.
          context: the call context.
        """
        with self._measure("delete"):
            validate_trial(request.trial, "trial")
            deleted = self._store.delete(request.trial)
        self.update_store_gauges()
        return checkpoints_pb2.DeleteCheckpointsResponse(deleted=deleted)

    @handle_errors
    def RecordEvaluation(self, request: checkpoints_pb2.RecordEvaluationRequest,
                         context: grpc.ServicerContext) -> checkpoints_pb2.CheckpointInfo:
        """Records an evaluated metric of a stored checkpoint and releases its hold.

        Args:
          request: ``RecordEvaluationRequest`` (``metric`` absent: only release).
          context: the call context.

        Returns:
          The checkpoint's ``CheckpointInfo`` after the change.
        """
        with self._measure("record"):
            validate_trial(request.trial, "trial")
            record = self._store.record_evaluation(
                request.trial, request.step,
                metric=request.metric if request.HasField("metric") else None,
                maximize=request.maximize)
        self.update_store_gauges()
        return to_info(record)
