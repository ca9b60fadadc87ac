"""Runs the checkpoint service: ``python -m services.checkpoints.server``.

Environment:
  BATCHLAB_CHECKPOINT_ROOT: the folder checkpoints are stored under (required).
  BATCHLAB_CHECKPOINTS_PORT: gRPC port (default 50053).
  BATCHLAB_CHECKPOINT_KEEP_LATEST: recent checkpoints kept per trial besides the best
    (default 1).
  BATCHLAB_CHECKPOINT_MAX_BYTES: the largest checkpoint accepted (default 64 GiB,
    batchlab.limits.MAX_CHECKPOINT_BYTES).
  BATCHLAB_AUTH_TOKEN: when set, calls need ``authorization: Bearer <token>``.
  BATCHLAB_METRICS_PORT: Prometheus port (default 9103).
  BATCHLAB_BIND_HOST: interface to bind (default 0.0.0.0).
  BATCHLAB_SHUTDOWN_GRACE_SECONDS: time in-flight calls get after SIGTERM (default 10).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from batchlab import limits
from batchlab.proto.v1 import checkpoints_pb2, checkpoints_pb2_grpc
from batchlab.rpc.client import StartupError
from batchlab.rpc.server import Registration, run_service
from services.checkpoints.servicer import CheckpointServicer
from services.checkpoints.storage import FilesystemCheckpointStore

if TYPE_CHECKING:
    from batchlab.rpc.metrics import Metrics

DEFAULT_PORT = 50053
ROOT_ENV = "BATCHLAB_CHECKPOINT_ROOT"
KEEP_LATEST_ENV = "BATCHLAB_CHECKPOINT_KEEP_LATEST"
MAX_BYTES_ENV = "BATCHLAB_CHECKPOINT_MAX_BYTES"


def make_registrations(metrics: Metrics,
                       environ: Mapping[str, str] | None = None) -> list[Registration]:
    """Builds the filesystem store and the servicer from the environment.

    Args:
      metrics: the process's ``Metrics`` (with the checkpoints role).
      environ: mapping to read (``os.environ`` by default).

    Returns:
      The one registration of ``CheckpointService``.

    Raises:
      StartupError: naming a missing or malformed variable.
    """
    environ = os.environ if environ is None else environ
    root = environ.get(ROOT_ENV, "").strip()
    if not root:
        raise StartupError(f"{ROOT_ENV} is not set: the folder to store checkpoints under")
    raw_keep = environ.get(KEEP_LATEST_ENV, "").strip() or "1"
    if not raw_keep.isdigit() or int(raw_keep) < 1:
        raise StartupError(f"{KEEP_LATEST_ENV} must be an integer >= 1; got {raw_keep!r}")
    raw_max = environ.get(MAX_BYTES_ENV, "").strip() or str(limits.MAX_CHECKPOINT_BYTES)
    if not raw_max.isdigit() or int(raw_max) < 1:
        raise StartupError(f"{MAX_BYTES_ENV} must be a number of bytes >= 1; got {raw_max!r}")
    checkpoint_metrics = metrics.checkpoints
    assert checkpoint_metrics is not None  # run_service makes the metrics of its role
    failures = checkpoint_metrics.failures

    def count_corruption(trial: str, step: int) -> None:
        failures.labels(operation="restore", reason="corrupt").inc()

    store = FilesystemCheckpointStore(root, keep_latest=int(raw_keep),
                                      on_corrupt=count_corruption, max_bytes=int(raw_max))
    servicer = CheckpointServicer(store, metrics=checkpoint_metrics)
    servicer.update_store_gauges()
    return [Registration.for_service(checkpoints_pb2, checkpoints_pb2_grpc, "CheckpointService",
                                     servicer)]


def main() -> int:
    """Serves until SIGTERM or SIGINT; returns the exit status."""
    return run_service("checkpoints", default_port=DEFAULT_PORT,
                       make_registrations=make_registrations)


if __name__ == "__main__":
    sys.exit(main())
