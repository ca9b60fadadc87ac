"""What build_server does against hostile or mistaken clients: undecodable requests, unknown
enum numbers, absurd nesting, non-finite JSON numbers, huge values, auth scheme case, and
streams that would otherwise hold every server thread."""

from __future__ import annotations

import threading

import grpc
import pytest
from google.protobuf import struct_pb2

from batchlab.proto.v1 import (
    checkpoints_pb2,
    checkpoints_pb2_grpc,
    controller_pb2,
    controller_pb2_grpc,
    evaluation_pb2,
    evaluation_pb2_grpc,
    experiment_pb2,
)
from batchlab.rpc import client, errors, validation
from batchlab.rpc.server import Registration, StreamLimiter, build_server

TOKEN = "tok-123"


class _Evaluation(evaluation_pb2_grpc.EvaluationServiceServicer):
    """Answers every well-formed request; echoes a bad trial name in full (errors cap it)."""

    def __init__(self):
        self.calls = 0

    @errors.handle_errors
    def Evaluate(self, request, context):
        self.calls += 1
        if request.trial.startswith("bad"):
            raise errors.InvalidArgument("trial", f"no such trial {request.trial!r}")
        return evaluation_pb2.EvaluateResponse(step=1)


class _Experiments(controller_pb2_grpc.ExperimentServiceServicer):
    """SubmitExperiment answers; WatchExperiment streams until the client goes away."""

    def __init__(self):
        self.watching = threading.Semaphore(0)

    @errors.handle_errors
    def SubmitExperiment(self, request, context):
        return controller_pb2.Experiment(name="experiments/x")

    @errors.handle_errors
    def GetExperiment(self, request, context):
        return controller_pb2.Experiment(name=request.name)

    @errors.handle_errors
    def WatchExperiment(self, request, context):
        yield controller_pb2.WatchExperimentResponse()
        self.watching.release()
        stop = threading.Event()
        context.add_callback(stop.set)
        stop.wait(60)


class _Checkpoints(checkpoints_pb2_grpc.CheckpointServiceServicer):
    """SaveCheckpoint counts the data messages it receives."""

    @errors.handle_errors
    def SaveCheckpoint(self, request_iterator, context):
        return checkpoints_pb2.CheckpointInfo(step=sum(1 for _ in request_iterator))


@pytest.fixture
def serve():
    servers = []

    def make(**kwargs):
        evaluation, experiments = _Evaluation(), _Experiments()
        server = build_server([
            Registration.for_service(evaluation_pb2, evaluation_pb2_grpc, "EvaluationService",
                                     evaluation),
            Registration.for_service(controller_pb2, controller_pb2_grpc, "ExperimentService",
                                     experiments),
            Registration.for_service(checkpoints_pb2, checkpoints_pb2_grpc, "CheckpointService",
                                     _Checkpoints()),
        ], service_name="hardening", **kwargs)
        server.start()
        servers.append(server)
        return server, evaluation, experiments

    yield make
    for server in servers:
        server.stop(None)


def _raw_call(address: str, method: str, payload: bytes, token: str | None = None):
    with client.channel(address, token=token) as chan:
        call = chan.unary_unary(method, request_serializer=None, response_deserializer=None)
        return call(payload, timeout=30)


def _nested(depth: int) -> struct_pb2.Struct:
    inner = struct_pb2.Struct()
    inner.fields["leaf"].string_value = "x"
    for _ in range(depth - 1):
        outer = struct_pb2.Struct()
        outer.fields["a"].struct_value.CopyFrom(inner)
        inner = outer
    return inner


def _field_path(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get(errors.FIELD_PATH_METADATA_KEY)


@pytest.mark.parametrize("payload", [
    b"\x0a\x02\xff\xfe",  # field 1 (trial, a string) holding invalid UTF-8
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a varint longer than 10 bytes
    b"\x22\x05abc",  # a length prefix past the end
])
def test_undecodable_request_is_invalid_argument(serve, payload):
    server, evaluation, _ = serve()
    with pytest.raises(grpc.RpcError) as info:
        _raw_call(server.address, "/batchlab.v1.EvaluationService/Evaluate", payload)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid batchlab.v1.EvaluateRequest" in info.value.details()
    assert evaluation.calls == 0


def _length_delimited(field: int, payload: bytes) -> bytes:
    size, length = b"", len(payload)
    while True:
        byte, length = length & 0x7F, length >> 7
        size += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    return bytes([field << 3 | 2]) + size + payload


def test_nesting_past_the_decoders_limit_is_invalid_argument(serve):
    server, evaluation, _ = serve()
    # Written by hand: the protobuf library itself refuses to build it. Each level is a
    # Struct, a map entry and a Value: 40 levels are 120 messages, past the decoder's 100.
    struct = b""
    for _ in range(40):
        value = _length_delimited(5, struct)  # Value.struct_value
        entry = _length_delimited(1, b"a") + _length_delimited(2, value)
        struct = _length_delimited(1, entry)  # Struct.fields
    payload = _length_delimited(1, b"t") + _length_delimited(4, struct)  # trial, hyperparameters
    with pytest.raises(grpc.RpcError) as info:
        _raw_call(server.address, "/batchlab.v1.EvaluationService/Evaluate", payload)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert evaluation.calls == 0


def test_struct_deeper_than_the_limit_names_the_field(serve):
    server, evaluation, _ = serve()
    request = evaluation_pb2.EvaluateRequest(
        trial="t", hyperparameters=_nested(validation.MAX_STRUCT_DEPTH + 2))
    with client.channel(server.address) as chan, pytest.raises(grpc.RpcError) as info:
        evaluation_pb2_grpc.EvaluationServiceStub(chan).Evaluate(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field_path(info.value).startswith("hyperparameters.a.a.a")
    ok = evaluation_pb2.EvaluateRequest(trial="t", hyperparameters=_nested(4))
    with client.channel(server.address) as chan:
        assert evaluation_pb2_grpc.EvaluationServiceStub(chan).Evaluate(ok, timeout=30).step == 1


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_number_in_a_struct_names_the_field(serve, number):
    server, _, _ = serve()
    request = evaluation_pb2.EvaluateRequest(trial="t")
    request.hyperparameters.fields["optimizer"].struct_value.fields["lr"].number_value = number
    with client.channel(server.address) as chan, pytest.raises(grpc.RpcError) as info:
        evaluation_pb2_grpc.EvaluationServiceStub(chan).Evaluate(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field_path(info.value) == "hyperparameters.optimizer.lr"


def test_unknown_enum_number_names_the_field(serve):
    server, _, _ = serve()
    spec = experiment_pb2.ExperimentSpec(name="e", selection=1)
    spec.workloads.add(workload="w").target.goal = 7
    with client.channel(server.address) as chan, pytest.raises(grpc.RpcError) as info:
        controller_pb2_grpc.ExperimentServiceStub(chan).SubmitExperiment(
            controller_pb2.SubmitExperimentRequest(spec=spec), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field_path(info.value) == "spec.workloads[0].target.goal"
    assert "unknown enum number 7" in info.value.details()


def test_client_streamed_messages_are_checked_too(serve):
    server, _, _ = serve()
    good = checkpoints_pb2.SaveCheckpointRequest(data=b"x").SerializeToString()
    with client.channel(server.address) as chan:
        save = chan.stream_unary("/batchlab.v1.CheckpointService/SaveCheckpoint",
                                 request_serializer=None, response_deserializer=None)
        answer = checkpoints_pb2.CheckpointInfo.FromString(save(iter([good, good]), timeout=30))
        assert answer.step == 2
        with pytest.raises(grpc.RpcError) as info:
            save(iter([good, b"\x12\x05ab"]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_huge_bad_value_is_quoted_as_a_short_prefix(serve, caplog):
    server, _, _ = serve()
    huge = "bad" + "x" * (1 << 20)
    with caplog.at_level("INFO"), client.channel(server.address) as chan, \
            pytest.raises(grpc.RpcError) as info:
        evaluation_pb2_grpc.EvaluationServiceStub(chan).Evaluate(
            evaluation_pb2.EvaluateRequest(trial=huge), timeout=30)
    # Not RESOURCE_EXHAUSTED: the message fits gRPC's metadata limit.
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(info.value.details()) <= errors.MAX_MESSAGE_CHARS + 100
    assert info.value.details().startswith("trial: no such trial 'badxxx")
    # The log line is as short: a 1 MB request does not grow the log by 1 MB.
    logged = [r.getMessage() for r in caplog.records if "no such trial" in r.getMessage()]
    assert logged and all(len(line) <= errors.MAX_MESSAGE_CHARS + 200 for line in logged)


def test_shorten_escapes_and_cuts():
    assert errors.shorten("ok") == "'ok'"
    assert errors.shorten("a\nb\x1b") == "'a\\nb\\x1b'"
    assert errors.shorten("y" * 1000, 8) == "'yyyyyyyy'... (1000 characters)"
    assert errors.shorten("a\nb", quote=False) == "a\\nb"


@pytest.mark.parametrize("header", ["Bearer tok-123", "bearer tok-123", "BEARER tok-123",
                                    "bEaReR  tok-123"])
def test_auth_scheme_name_is_case_insensitive(serve, header):
    server, _, _ = serve(auth_token=TOKEN)
    with client.channel(server.address) as chan:
        stub = controller_pb2_grpc.ExperimentServiceStub(chan)
        answer = stub.GetExperiment(controller_pb2.GetExperimentRequest(name="experiments/a"),
                                    metadata=(("authorization", header),), timeout=30)
    assert answer.name == "experiments/a"


@pytest.mark.parametrize("header", ["Basic tok-123", "Bearer TOK-123", "Bearertok-123",
                                    "tok-123", "Bearer tok-1234"])
def test_wrong_scheme_or_token_is_unauthenticated(serve, header):
    server, _, _ = serve(auth_token=TOKEN)
    with client.channel(server.address) as chan, pytest.raises(grpc.RpcError) as info:
        controller_pb2_grpc.ExperimentServiceStub(chan).GetExperiment(
            controller_pb2.GetExperimentRequest(name="experiments/a"),
            metadata=(("authorization", header),), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _open_watch(chan):
    stream = controller_pb2_grpc.ExperimentServiceStub(chan).WatchExperiment(
        controller_pb2.WatchExperimentRequest(name="experiments/x"))
    next(stream)
    return stream


@pytest.mark.parametrize("limits, bound", [((2, 10), "the server has 2"),
                                           ((10, 2), "this client (127.0.0.1) has 2")])
def test_streams_past_the_bound_are_resource_exhausted(serve, limits, bound):
    server, _, _ = serve(max_streams=limits[0], max_streams_per_client=limits[1])
    with client.channel(server.address) as chan:
        first, second = _open_watch(chan), _open_watch(chan)
        with pytest.raises(grpc.RpcError) as info:
            _open_watch(chan)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert bound in info.value.details()
        first.cancel()
        # The slot comes back once the server sees the cancellation.
        for _ in range(100):
            if server.streams.open < 2:
                break
            threading.Event().wait(0.05)
        third = _open_watch(chan)
        second.cancel()
        third.cancel()


def test_unary_calls_are_served_while_every_stream_slot_is_taken(serve):
    # Without a thread pool larger than the stream bound, 24 open watches on a server with
    # 4 workers would leave GetExperiment queued until a watch ends (here: never).
    server, _, experiments = serve(max_workers=4, max_streams=24)
    with client.channel(server.address) as chan:
        watches = [_open_watch(chan) for _ in range(24)]
        stub = controller_pb2_grpc.ExperimentServiceStub(chan)
        for _ in range(20):
            answer = stub.GetExperiment(controller_pb2.GetExperimentRequest(name="experiments/y"),
                                        timeout=20)
            assert answer.name == "experiments/y"
        for watch in watches:
            watch.cancel()


def test_stream_limiter_counts_per_client_and_in_total():
    limiter = StreamLimiter(max_total=3, max_per_client=2)
    assert limiter.acquire("a") is None and limiter.acquire("a") is None
    assert "this client (a)" in limiter.acquire("a")
    assert limiter.acquire("b") is None
    assert "the server has 3" in limiter.acquire("c")
    limiter.release("a")
    assert limiter.acquire("c") is None and limiter.open == 3
    with pytest.raises(ValueError):
        StreamLimiter(0, 1)
