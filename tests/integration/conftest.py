"""Fixtures for the integration tests (Ray, data and the compilation cache are in tests/conftest.py)."""

from __future__ import annotations

import pytest


def _serve(pb2, pb2_grpc, service: str, servicer, name: str):
    """A started server of one servicer on a free loopback port."""
    from batchlab.rpc.server import Registration, build_server

    server = build_server([Registration.for_service(pb2, pb2_grpc, service, servicer)],
                          host="127.0.0.1", port=0, service_name=name)
    server.start()
    return server


@pytest.fixture
def checkpoint_server(tmp_path):
    """A real checkpoint service (filesystem store) on a free loopback port."""
    from batchlab.proto.v1 import checkpoints_pb2, checkpoints_pb2_grpc
    from services.checkpoints.servicer import CheckpointServicer
    from services.checkpoints.storage import FilesystemCheckpointStore

    servicer = CheckpointServicer(FilesystemCheckpointStore(tmp_path / "checkpoint_store"))
    server = _serve(checkpoints_pb2, checkpoints_pb2_grpc, "CheckpointService", servicer,
                    "checkpoints")
    yield server
    server.stop(grace=1.0)


@pytest.fixture
def sharding_server(tmp_path, tfds_dir):
    """A real sharding service over the session's datasets, with a position store."""
    from batchlab.proto.v1 import sharding_pb2, sharding_pb2_grpc
    from services.sharding.datasets import TfdsCatalog
    from services.sharding.positions import PositionStore
    from services.sharding.servicer import ShardingServicer

    positions = PositionStore(tmp_path / "sharding")
    servicer = ShardingServicer(TfdsCatalog(tfds_dir), positions=positions)
    server = _serve(sharding_pb2, sharding_pb2_grpc, "ShardingService", servicer, "sharding")
    yield server
    server.stop(grace=1.0)
    positions.close()


class RecordingEvaluator:
    """The evaluation service's servicer, keeping every answer it gave (trial, step, metrics)."""

    def __init__(self, servicer):
        self.servicer = servicer
        self.answers: list[tuple[str, int, dict]] = []

    def Evaluate(self, request, context):
        response = self.servicer.Evaluate(request, context)
        self.answers.append((request.trial, response.step, dict(response.metrics)))
        return response


@pytest.fixture
def evaluator_server(tfds_dir, checkpoint_server):
    """A real evaluation service reading the checkpoint service; `.recorded` has its answers."""
    from batchlab.proto.v1 import evaluation_pb2, evaluation_pb2_grpc
    from batchlab.rpc.checkpoint_client import CheckpointClient
    from batchlab.rpc.client import channel
    from services.evaluator.servicer import EvaluationServicer

    chan = channel(checkpoint_server.address)
    client = CheckpointClient(chan)
    servicer = EvaluationServicer(
        lambda trial, step, folder: client.load_dir(trial, folder, step=step),
        data_dir=tfds_dir,
        record=lambda trial, step, metric, maximize: client.record_evaluation(
            trial, step, metric=metric, maximize=maximize))
    recording = RecordingEvaluator(servicer)
    server = _serve(evaluation_pb2, evaluation_pb2_grpc, "EvaluationService", recording,
                    "evaluator")
    server.recorded = recording.answers
    yield server
    server.stop(grace=1.0)
    chan.close()
