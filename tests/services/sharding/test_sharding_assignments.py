"""Trials' shard assignments and positions at checkpoints, and the client's index stream.

The servicer is called directly (fake catalog); the client's stream runs against a real
server on a loopback port and is compared with batchlab.data's own sharding math.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from fake_context import Aborted, FakeContext
from test_sharding_servicer import SIZES, FakeCatalog

from batchlab import data
from batchlab.proto.v1 import sharding_pb2 as pb
from batchlab.proto.v1 import sharding_pb2_grpc
from batchlab.rpc.client import channel
from batchlab.rpc.server import Registration, build_server
from batchlab.rpc.sharding_client import ServiceShardIterator, ShardingClient, ShardingError
from services.sharding.positions import PositionStore
from services.sharding.servicer import ShardingServicer

Code = grpc.StatusCode
TRIAL = "experiments/e/studies/s/trials/0-r0"


@pytest.fixture
def servicer(tmp_path):
    store = PositionStore(tmp_path / "positions")
    yield ShardingServicer(FakeCatalog(built=[("mnist1d", "small")]), positions=store)
    store.close()


def _assign(servicer, **fields):
    request = dict(trial=TRIAL, dataset="mnist1d", config="small", split="train", num_hosts=2,
                   seed=7, shuffle=True)
    request.update(fields)
    return servicer.AssignShards(pb.AssignShardsRequest(**request), FakeContext())


def _abort(call) -> Aborted:
    with pytest.raises(Aborted) as info:
        call()
    return info.value


def test_a_new_trial_gets_one_shard_per_host_from_the_start(servicer):
    shards = _assign(servicer, num_hosts=3)
    assert [h.shard_index for h in shards.hosts] == [0, 1, 2]
    assert {(h.shard_count, h.epoch, h.position, h.examples_per_shard) for h in shards.hosts} == {
        (3, 0, 0, SIZES["train"] // 3)}
    assert shards.step == 0 and all(h.seed == 7 and h.shuffle for h in shards.hosts)


def test_a_resume_gets_the_positions_recorded_with_its_checkpoint(servicer, tmp_path):
    hosts = list(_assign(servicer).hosts)
    for host, (epoch, position) in zip(hosts, [(1, 40), (1, 40)], strict=True):
        host.epoch, host.position = epoch, position
    # Each host records its own position, as trainer processes do.
    for host in hosts:
        servicer.RecordPositions(pb.RecordPositionsRequest(trial=TRIAL, step=20, hosts=[host]),
                                 FakeContext())
    resumed = _assign(servicer, resume_step=20)
    assert resumed.step == 20
    assert [(h.shard_index, h.epoch, h.position) for h in resumed.hosts] == [(0, 1, 40),
                                                                             (1, 1, 40)]
    # Positions outlive the service: a new store on the same folder serves them.
    again = ShardingServicer(FakeCatalog(built=[("mnist1d", "small")]),
                             positions=PositionStore(tmp_path / "positions"))
    assert _assign(again, resume_step=20).hosts == resumed.hosts


def test_a_resume_without_every_host_recorded_or_of_another_stream_is_refused(servicer):
    host = _assign(servicer).hosts[0]
    servicer.RecordPositions(pb.RecordPositionsRequest(trial=TRIAL, step=10, hosts=[host]),
                             FakeContext())
    error = _abort(lambda: _assign(servicer, resume_step=10))
    assert error.code == Code.FAILED_PRECONDITION and "hosts [1]" in error.details
    error = _abort(lambda: _assign(servicer, resume_step=10, num_hosts=1))
    assert error.code == Code.FAILED_PRECONDITION and "shard_count 2, asked 1" in error.details
    error = _abort(lambda: _assign(servicer, resume_step=10, num_hosts=1, seed=8))
    assert error.code == Code.FAILED_PRECONDITION and "another stream" in error.details


@pytest.mark.parametrize("fields, path", [
    ({"num_hosts": 0}, "num_hosts"),
    ({"num_hosts": 2000}, "num_hosts"),
    ({"split": "test"}, "split"),
    ({"trial": ""}, "trial"),
    ({"resume_step": 2**64 - 1}, "resume_step"),
    ({"num_examples": 0}, "num_examples"),
    ({"num_examples": 10**12}, "num_examples"),
])
def test_bad_assignment_requests_name_the_field(servicer, fields, path):
    error = _abort(lambda: _assign(servicer, **fields))
    assert error.code == Code.INVALID_ARGUMENT and error.details.startswith(path)


def test_bad_positions_name_the_field(servicer):
    host = _assign(servicer).hosts[0]
    host.position = host.examples_per_shard
    error = _abort(lambda: servicer.RecordPositions(
        pb.RecordPositionsRequest(trial=TRIAL, step=10, hosts=[host]), FakeContext()))
    assert error.code == Code.INVALID_ARGUMENT and error.details.startswith("hosts[0].position")
    error = _abort(lambda: servicer.RecordPositions(
        pb.RecordPositionsRequest(trial=TRIAL, step=10), FakeContext()))
    assert error.details.startswith("hosts")


@pytest.fixture
def server(tmp_path):
    # Small answers: an epoch takes many GetShard calls.
    servicer = ShardingServicer(FakeCatalog(built=[("mnist1d", "small")]),
                                positions=PositionStore(tmp_path / "served"),
                                max_indices_per_response=97)
    started = build_server([Registration.for_service(pb, sharding_pb2_grpc, "ShardingService",
                                                     servicer)],
                           host="127.0.0.1", port=0, service_name="sharding")
    started.start()
    yield started
    started.stop(grace=0.5)


def test_the_service_stream_is_batchlab_data_sharding_across_epochs_and_resumes(server):
    with channel(server.address) as chan:
        client = ShardingClient(chan)
        hosts = client.assign(TRIAL, "mnist1d", "small", "train", num_hosts=2, seed=3).hosts
        streams = [ServiceShardIterator(client, h, SIZES["train"]) for h in hosts]
        local = [data.ShardIterator(SIZES["train"], i, 2, seed=3) for i in range(2)]
        for _ in range(9):  # 9 * 130 > 2 epochs of 500 per shard
            for stream, reference in zip(streams, local, strict=True):
                got, epochs = stream.take(130)
                want, want_epochs = reference.take(130)
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(epochs, want_epochs)
        # The two hosts never read the same example in an epoch.
        first = [set(data.shard_indices(SIZES["train"], i, 2, 0, 3).tolist()) for i in range(2)]
        assert not first[0] & first[1]
        # The same state format as ShardIterator: a position moves between them.
        state = streams[0].get_state()
        assert state == local[0].get_state()
        recorded = streams[0].host_at(state)
        assert (recorded.epoch, recorded.position) == (state["epoch"], state["position"])
        fresh = ServiceShardIterator(client, recorded, SIZES["train"])
        np.testing.assert_array_equal(fresh.take(50)[0], local[0].take(50)[0])
        with pytest.raises(ValueError, match="state.seed"):
            fresh.set_state({**state, "seed": 4})
        with pytest.raises(ShardingError, match="examples per epoch"):
            ServiceShardIterator(client, recorded, SIZES["train"] - 10)


class _Flaky:
    """A stub whose GetShard fails `failures` times with `code`, then answers."""

    def __init__(self, code, failures):
        self.code, self.failures, self.calls = code, failures, 0

    def GetShard(self, request, timeout=None):
        self.calls += 1
        if self.calls <= self.failures:
            error = grpc.RpcError()
            error.code = lambda: self.code
            error.details = lambda: "down"
            raise error
        return pb.ShardAssignment(indices=[1, 2], next_position=2, examples_per_shard=4)


def test_a_sharding_failure_is_retried_then_an_infrastructure_error():
    waits = []
    client = ShardingClient(grpc.insecure_channel("127.0.0.1:1"), attempts=3, backoff_s=0.5,
                            sleep=waits.append)
    host = pb.HostShard(dataset="mnist1d", shard_count=1, examples_per_shard=4)
    client._stub = _Flaky(Code.UNAVAILABLE, 2)  # noqa: SLF001 - the transport is faked
    assert client.get_shard(host, 0, 0, 2).indices == [1, 2]
    assert waits == [0.5, 1.0]
    client._stub = _Flaky(Code.UNAVAILABLE, 5)  # noqa: SLF001
    with pytest.raises(ShardingError, match="after 3 tries") as info:
        client.get_shard(host, 0, 0, 2)
    assert info.value.infrastructure and info.value.code == Code.UNAVAILABLE
    client._stub = _Flaky(Code.INVALID_ARGUMENT, 1)  # noqa: SLF001 - not worth a retry
    with pytest.raises(ShardingError, match="INVALID_ARGUMENT"):
        client.get_shard(host, 0, 0, 2)
