"""A real sharding server on a free loopback port over mnist1d 'small', with real stubs."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest

from batchlab import data
from batchlab.proto.v1 import sharding_pb2 as pb
from batchlab.proto.v1 import sharding_pb2_grpc
from batchlab.rpc import client
from batchlab.rpc.errors import FIELD_PATH_METADATA_KEY
from batchlab.rpc.server import Registration, build_server
from services.sharding.datasets import TfdsCatalog
from services.sharding.servicer import ShardingServicer

TRAIN = 1600
REPO = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An empty tfds folder: the service builds what is asked for."""
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def stub(data_dir):
    servicer = ShardingServicer(TfdsCatalog(data_dir))
    server = build_server([Registration.for_service(pb, sharding_pb2_grpc, "ShardingService",
                                                    servicer)], service_name="sharding")
    server.start()
    channel = client.channel(server.address)
    yield sharding_pb2_grpc.ShardingServiceStub(channel)
    channel.close()
    server.stop(None)


@pytest.fixture(scope="module")
def prepared(stub, data_dir):
    return stub.PrepareDataset(pb.PrepareDatasetRequest(dataset="mnist1d", config="small"),
                               timeout=60)


def _shard(stub, **fields):
    request = pb.GetShardRequest(**{"dataset": "mnist1d", "config": "small", "split": "train",
                                    "shard_count": 4, "seed": 3, "shuffle": True, **fields})
    return stub.GetShard(request, timeout=10)


def test_prepare_builds_and_reports_splits(prepared, data_dir):
    assert (data_dir / "mnist1d" / "small").is_dir()
    assert (prepared.dataset, prepared.config) == ("mnist1d", "small")
    assert dict(prepared.split_sizes) == {"train": TRAIN, "validation": 400}
    assert prepared.data_dir == str(data_dir)


def test_same_request_same_indices_and_shards_disjoint(stub, prepared):
    shards = [list(_shard(stub, shard_index=i, epoch=1).indices) for i in range(4)]
    assert list(_shard(stub, shard_index=2, epoch=1).indices) == shards[2]
    assert all(len(s) == TRAIN // 4 for s in shards)
    union = set().union(*shards)
    assert len(union) == TRAIN and union == set(range(TRAIN))
    assert shards[0] == data.shard_indices(TRAIN, 0, 4, epoch=1, seed=3).tolist()
    assert list(_shard(stub, shard_index=0, epoch=2).indices) != shards[0]


def test_resume_from_a_position(stub, prepared):
    whole = list(_shard(stub, shard_index=1).indices)
    first = _shard(stub, shard_index=1, max_indices=150)
    rest = _shard(stub, shard_index=1, start_position=first.next_position)
    assert (first.next_position, first.end_of_epoch, rest.end_of_epoch) == (150, False, True)
    assert list(first.indices) + list(rest.indices) == whole
    assert rest.examples_per_shard == TRAIN // 4


@pytest.mark.parametrize("fields, code, field", [
    ({"dataset": "cifar10"}, grpc.StatusCode.INVALID_ARGUMENT, "dataset"),
    ({"config": "tiny"}, grpc.StatusCode.INVALID_ARGUMENT, "config"),
    ({"split": "test"}, grpc.StatusCode.INVALID_ARGUMENT, "split"),
    ({"shard_index": 4}, grpc.StatusCode.INVALID_ARGUMENT, "shard_index"),
    ({"start_position": 401}, grpc.StatusCode.INVALID_ARGUMENT, "start_position"),
    ({"dataset": "digits", "config": ""}, grpc.StatusCode.FAILED_PRECONDITION, None),
])
def test_errors_over_the_wire(stub, prepared, fields, code, field):
    with pytest.raises(grpc.RpcError) as info:
        _shard(stub, **fields)
    assert info.value.code() == code
    assert dict(info.value.trailing_metadata()).get(FIELD_PATH_METADATA_KEY) == field
    if field == "dataset":
        assert "mnist1d" in info.value.details() and "digits" in info.value.details()


def test_main_serves_until_sigterm(tmp_path):
    env = {**os.environ, "BATCHLAB_DATA_DIR": str(tmp_path), "BATCHLAB_SHARDING_PORT": "0",
           "BATCHLAB_METRICS_PORT": "0", "BATCHLAB_BIND_HOST": "127.0.0.1"}
    process = subprocess.Popen([sys.executable, "-m", "services.sharding.server"], cwd=REPO,
                               env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline, port = time.monotonic() + 30, None
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line, "the server exited before listening"
            match = re.search(r"sharding listening on 127\.0\.0\.1:(\d+)", line)
            port = match and int(match.group(1))
        channel = client.channel(f"127.0.0.1:{port}")
        client.wait_for_ready(channel, timeout=10, service="batchlab.v1.ShardingService")
        channel.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
