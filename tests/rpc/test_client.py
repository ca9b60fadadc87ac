"""Client glue: peer addresses from the environment, readiness, tokens on the wire."""

from __future__ import annotations

import socket
import threading

import pytest

from batchlab.proto.v1 import sharding_pb2, sharding_pb2_grpc
from batchlab.rpc import client
from batchlab.rpc.server import Registration, build_server


def test_peer_address_reads_the_variable():
    env = {"BATCHLAB_CHECKPOINTS_ADDR": "checkpoints:50053"}
    assert client.peer_address("checkpoints", environ=env) == "checkpoints:50053"


@pytest.mark.parametrize("env, message", [
    ({}, "BATCHLAB_SHARDING_ADDR is not set"),
    ({"BATCHLAB_SHARDING_ADDR": " "}, "BATCHLAB_SHARDING_ADDR is not set"),
    ({"BATCHLAB_SHARDING_ADDR": "sharding"}, "BATCHLAB_SHARDING_ADDR must be host:port"),
    ({"BATCHLAB_SHARDING_ADDR": "sharding:http"}, "BATCHLAB_SHARDING_ADDR must be host:port"),
])
def test_peer_address_missing_or_malformed_names_the_variable(env, message):
    with pytest.raises(client.StartupError, match=message):
        client.peer_address("sharding", environ=env)


def test_wait_for_ready_times_out_on_a_closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ch = client.channel(f"127.0.0.1:{port}")
    with pytest.raises(TimeoutError):
        client.wait_for_ready(ch, timeout=0.5)
    ch.close()


class _Echo(sharding_pb2_grpc.ShardingServiceServicer):
    def __init__(self):
        self.metadata = []

    def GetShard(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return sharding_pb2.ShardAssignment()


@pytest.mark.parametrize("token, sent", [("abc", "Bearer abc"), (None, None), ("", None)])
def test_channel_sends_the_bearer_token_and_waits_for_a_late_server(token, sent):
    servicer = _Echo()
    server = build_server([Registration.for_service(
        sharding_pb2, sharding_pb2_grpc, "ShardingService", servicer)])
    ch = client.channel(server.address, token=token)
    # The server starts after the client begins waiting.
    timer = threading.Timer(0.3, server.start)
    timer.start()
    try:
        client.wait_for_ready(ch, timeout=10)
        sharding_pb2_grpc.ShardingServiceStub(ch).GetShard(sharding_pb2.GetShardRequest(),
                                                           timeout=5)
        assert servicer.metadata[-1].get("authorization") == sent
    finally:
        timer.join()
        server.stop(None)
        ch.close()


def test_channel_rejects_an_empty_address():
    with pytest.raises(ValueError):
        client.channel("")



def test_free_ports_stay_out_of_the_ranges_other_processes_bind_and_never_repeat():
    """Ray and gRPC bind port 0 (the kernel's ephemeral range) and Ray's workers use 10002-19999;
    a probed port in either range could be taken before the server binds it (the CI failure of
    the observability stack: 'Address already in use' on a metrics port)."""
    from batchlab.rpc.client import _ephemeral_floor, free_ports

    first = free_ports(5)
    second = free_ports(5)
    both = first + second
    assert len(set(both)) == 10
    assert all(20000 <= p < _ephemeral_floor() for p in both)
    for port in both:  # each is bindable now
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
