"""Runs the evaluation service: ``python -m services.evaluator.server``.

Environment:
  BATCHLAB_CHECKPOINTS_ADDR: host:port of the checkpoint service (required).
  BATCHLAB_DATA_DIR: datasets live in ``$BATCHLAB_DATA_DIR/tfds``.
  BATCHLAB_EVALUATOR_PORT: gRPC port (default 50054).
  BATCHLAB_AUTH_TOKEN: when set, calls need it and it is sent to the checkpoint service.
  BATCHLAB_METRICS_PORT: Prometheus port (default 9104).
  BATCHLAB_BIND_HOST: interface to bind (default 0.0.0.0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from batchlab.proto.v1 import checkpoints_pb2, evaluation_pb2, evaluation_pb2_grpc
from batchlab.rpc.checkpoint_client import CheckpointClient
from batchlab.rpc.client import channel, peer_address
from batchlab.rpc.server import Registration, run_service
from services.evaluator.servicer import EvaluationServicer

if TYPE_CHECKING:
    from batchlab.rpc.metrics import Metrics

DEFAULT_PORT = 50054


def make_registrations(metrics: Metrics) -> list[Registration]:
    """Connects to the checkpoint service and builds the servicer."""
    address = peer_address("checkpoints")
    client = CheckpointClient(channel(address, token=os.environ.get("BATCHLAB_AUTH_TOKEN") or None))

    def load(trial: str, step: int | None, folder: Path) -> checkpoints_pb2.CheckpointInfo | None:
        return client.load_dir(trial, folder, step=step)

    def record(trial: str, step: int, metric: float | None,
               maximize: bool) -> checkpoints_pb2.CheckpointInfo:
        return client.record_evaluation(trial, step, metric=metric, maximize=maximize)

    data_root = os.environ.get("BATCHLAB_DATA_DIR")
    data_dir = str(Path(data_root) / "tfds") if data_root else None
    servicer = EvaluationServicer(load, data_dir=data_dir, record=record,
                                  metrics=metrics.evaluator)
    return [Registration.for_service(evaluation_pb2, evaluation_pb2_grpc, "EvaluationService", servicer)]


def main() -> int:
    """Serves until SIGTERM or SIGINT; returns the exit status."""
    # Imported before serving: see run_service's preload (the evaluation loads datasets).
    return run_service("evaluator", default_port=DEFAULT_PORT, make_registrations=make_registrations,
                       preload=("batchlab.data.builders", "batchlab.train.evaluate"))


if __name__ == "__main__":
    sys.exit(main())
