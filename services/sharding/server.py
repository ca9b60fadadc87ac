"""Runs the sharding service: ``python -m services.sharding.server``.

Environment:
  BATCHLAB_DATA_DIR: datasets live in ``$BATCHLAB_DATA_DIR/tfds`` (default
    ``~/.cache/batchlab/tfds``), the same folder trainers read.
  BATCHLAB_SHARDING_STATE_DIR: where trials' data positions at their checkpoints are kept
    (default ``$BATCHLAB_DATA_DIR/sharding``, next to the datasets); they must outlive this
    process, so that trainers resume exactly after a restart of any service. The SQLite
    database runs in WAL mode, which needs a local file system and one host: the Kubernetes
    manifests put it on a ReadWriteOnce claim of its own, never on the shared datasets volume.
  BATCHLAB_SHARDING_PORT: gRPC port (default 50052).
  BATCHLAB_AUTH_TOKEN: when set, calls need ``authorization: Bearer <token>``.
  BATCHLAB_METRICS_PORT: Prometheus port (default 9102).
  BATCHLAB_BIND_HOST: interface to bind (default 0.0.0.0).
  BATCHLAB_SHUTDOWN_GRACE_SECONDS: time in-flight calls get after SIGTERM (default 10).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from batchlab import data
from batchlab.proto.v1 import sharding_pb2, sharding_pb2_grpc
from batchlab.rpc.server import Registration, run_service
from services.sharding.datasets import TfdsCatalog
from services.sharding.positions import PositionStore
from services.sharding.servicer import ShardingServicer

if TYPE_CHECKING:
    from batchlab.rpc.metrics import Metrics

DEFAULT_PORT = 50052


def make_registrations(metrics: Metrics) -> list[Registration]:
    """Builds the tfds catalog on ``BATCHLAB_DATA_DIR`` and the servicer.

    Args:
      metrics: the process's ``Metrics`` (with the sharding role).

    Returns:
      The one registration of ``ShardingService``.
    """
    state = (os.environ.get("BATCHLAB_SHARDING_STATE_DIR", "").strip()
             or Path(data.default_data_dir()).parent / "sharding")
    servicer = ShardingServicer(TfdsCatalog(data.default_data_dir()), metrics=metrics.sharding,
                                positions=PositionStore(state))
    return [Registration.for_service(sharding_pb2, sharding_pb2_grpc, "ShardingService",
                                     servicer)]


def main() -> int:
    """Serves until SIGTERM or SIGINT; returns the exit status."""
    # Imported before serving: see run_service's preload (the datasets' builders).
    return run_service("sharding", default_port=DEFAULT_PORT,
                       make_registrations=make_registrations, preload=("batchlab.data.builders",))


if __name__ == "__main__":
    sys.exit(main())
