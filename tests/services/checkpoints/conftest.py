"""Fixtures: each store implementation (with a way to corrupt it), and a real server."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest
from checkpoint_helpers import TOKEN
from prometheus_client import CollectorRegistry

from batchlab.proto.v1 import checkpoints_pb2, checkpoints_pb2_grpc
from batchlab.rpc import client
from batchlab.rpc.metrics import make_metrics
from batchlab.rpc.server import Registration, build_server
from services.checkpoints.memory_storage import InMemoryCheckpointStore
from services.checkpoints.servicer import CheckpointServicer
from services.checkpoints.storage import CHECKPOINT_DIR, FilesystemCheckpointStore


def _corrupt_fs(store: FilesystemCheckpointStore, trial: str, step: int) -> None:
    folder = store.root.joinpath(*trial.split("/"), CHECKPOINT_DIR)
    (path,) = folder.glob(f"{step:020d}-*.bin")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt_memory(store: InMemoryCheckpointStore, trial: str, step: int) -> None:
    store.content[(trial, step)][0] ^= 0xFF


@dataclass
class StoreCase:
    """A store under test and how to flip a byte of one of its checkpoints."""

    store: Any
    corrupt: Any
    corrupted: list


@pytest.fixture(params=["filesystem", "memory"])
def make_store(request, tmp_path):
    """Builds stores of one implementation: ``make_store(keep_latest=1) -> StoreCase``."""

    def make(keep_latest: int = 1) -> StoreCase:
        corrupted: list = []

        def on_corrupt(trial, step):
            corrupted.append((trial, step))

        if request.param == "filesystem":
            root = tmp_path / f"store-{len(os.listdir(tmp_path))}"
            return StoreCase(FilesystemCheckpointStore(root, keep_latest=keep_latest,
                                                       on_corrupt=on_corrupt),
                             _corrupt_fs, corrupted)
        return StoreCase(InMemoryCheckpointStore(keep_latest=keep_latest, on_corrupt=on_corrupt),
                         _corrupt_memory, corrupted)

    return make


@dataclass
class Running:
    """A started checkpoint server and what the tests need to talk to it."""

    server: Any
    store: FilesystemCheckpointStore
    metrics: Any
    channel: Any
    stub: checkpoints_pb2_grpc.CheckpointServiceStub


@pytest.fixture
def running(tmp_path):
    """A real server (filesystem store, keep_latest=1, auth token, metrics) on loopback."""
    metrics = make_metrics(CollectorRegistry(), roles=["checkpoints"])
    store = FilesystemCheckpointStore(tmp_path / "root")
    servicer = CheckpointServicer(store, metrics=metrics.checkpoints)
    server = build_server(
        [Registration.for_service(checkpoints_pb2, checkpoints_pb2_grpc, "CheckpointService",
                                  servicer)],
        service_name="checkpoints", auth_token=TOKEN, metrics=metrics)
    server.start()
    channel = client.channel(server.address, token=TOKEN)
    yield Running(server, store, metrics, channel,
                  checkpoints_pb2_grpc.CheckpointServiceStub(channel))
    channel.close()
    server.stop(None)
