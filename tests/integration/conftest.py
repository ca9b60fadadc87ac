"""Fixtures for the integration tests (Ray, data and the compilation cache are in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def checkpoint_server(tmp_path):
    """A real checkpoint service (filesystem store) on a free loopback port."""
    from batchlab.proto.v1 import checkpoints_pb2, checkpoints_pb2_grpc
    from batchlab.rpc.server import Registration, build_server
    from services.checkpoints.servicer import CheckpointServicer
    from services.checkpoints.storage import FilesystemCheckpointStore

    servicer = CheckpointServicer(FilesystemCheckpointStore(tmp_path / "checkpoint_store"))
    server = build_server([Registration.for_service(
        checkpoints_pb2, checkpoints_pb2_grpc, "CheckpointService", servicer)],
        host="127.0.0.1", port=0, service_name="checkpoints")
    server.start()
    yield server
    server.stop(grace=1.0)
