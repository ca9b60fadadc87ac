"""CheckpointServicer methods called directly, with an in-memory store and a fake context."""

from __future__ import annotations

import grpc
import pytest
from checkpoint_helpers import TRIAL, blob, sha
from fake_context import Aborted, FakeContext
from prometheus_client import CollectorRegistry

from batchlab.proto.v1 import checkpoints_pb2 as pb
from batchlab.rpc.errors import FIELD_PATH_METADATA_KEY
from batchlab.rpc.metrics import make_metrics
from services.checkpoints.memory_storage import InMemoryCheckpointStore
from services.checkpoints.servicer import CheckpointServicer

Code = grpc.StatusCode


@pytest.fixture
def metrics():
    return make_metrics(CollectorRegistry(), roles=["checkpoints"])


@pytest.fixture
def store():
    return InMemoryCheckpointStore(keep_latest=2)


@pytest.fixture
def servicer(store, metrics):
    return CheckpointServicer(store, chunk_size=1000, metrics=metrics.checkpoints)


def _requests(content, *, trial=TRIAL, step=1, metric=None, digest=None, size=None, chunk=700):
    header = pb.CheckpointHeader(trial=trial, step=step, maximize=True,
                                 sha256=sha(content) if digest is None else digest,
                                 size_bytes=len(content) if size is None else size)
    if metric is not None:
        header.metric = metric
    yield pb.SaveCheckpointRequest(header=header)
    for i in range(0, len(content), chunk):
        yield pb.SaveCheckpointRequest(data=content[i:i + chunk])


def _load(servicer, trial=TRIAL, step=None):
    request = pb.LoadCheckpointRequest(trial=trial)
    if step is not None:
        request.step = step
    messages = list(servicer.LoadCheckpoint(request, FakeContext()))
    assert messages[0].WhichOneof("kind") == "info"
    assert all(m.WhichOneof("kind") == "data" for m in messages[1:])
    return messages[0].info, b"".join(m.data for m in messages[1:]), len(messages) - 1


def test_save_then_load(servicer, metrics):
    content = blob(4500)
    info = servicer.SaveCheckpoint(_requests(content, metric=0.25), FakeContext())
    assert (info.trial, info.step, info.size_bytes, info.sha256, info.metric) == (
        TRIAL, 1, 4500, sha(content), 0.25)
    assert info.is_latest and info.is_best and info.create_time.seconds > 0
    loaded, data, chunks = _load(servicer)
    assert data == content and chunks == 5 and not loaded.HasField("fallback_from")
    sample = metrics.registry.get_sample_value
    assert sample("batchlab_checkpoint_operations_total", {"operation": "save"}) == 1
    assert sample("batchlab_checkpoint_bytes_total", {"operation": "restore"}) == 4500
    assert sample("batchlab_checkpoint_store_checkpoints") == 1


def _abort(call):
    with pytest.raises(Aborted) as info:
        call()
    return info.value


@pytest.mark.parametrize("make_requests, code, field", [
    (lambda: iter([]), Code.INVALID_ARGUMENT, "header"),
    (lambda: iter([pb.SaveCheckpointRequest(data=b"x")]), Code.INVALID_ARGUMENT, "header"),
    (lambda: _requests(b"abc", trial="../../etc"), Code.INVALID_ARGUMENT, "header.trial"),
    (lambda: _requests(b"abc", digest="0" * 64), Code.DATA_LOSS, "header.sha256"),
    (lambda: _requests(b"abc", digest="nothex"), Code.INVALID_ARGUMENT, "header.sha256"),
    (lambda: _requests(b"abc", size=4), Code.INVALID_ARGUMENT, "header.size_bytes"),
    (lambda: _requests(b"abc", size=2), Code.INVALID_ARGUMENT, "header.size_bytes"),
    (lambda: _requests(b"abc", metric=float("nan")), Code.INVALID_ARGUMENT, "header.metric"),
    (lambda: iter([*_requests(b"abc"), *_requests(b"abc")]), Code.INVALID_ARGUMENT, "data"),
])
def test_bad_uploads_are_rejected_and_store_nothing(servicer, store, metrics, make_requests,
                                                    code, field):
    aborted = _abort(lambda: servicer.SaveCheckpoint(make_requests(), FakeContext()))
    assert aborted.code == code
    assert aborted.trailing_metadata[FIELD_PATH_METADATA_KEY] == field
    assert store.count() == 0
    assert metrics.registry.get_sample_value(
        "batchlab_checkpoint_failures_total",
        {"operation": "save", "reason": code.name.lower()}) == 1


def test_load_falls_back_past_a_corrupt_latest(servicer, store):
    servicer.SaveCheckpoint(_requests(blob(100, 1), step=1), FakeContext())
    servicer.SaveCheckpoint(_requests(blob(100, 2), step=2), FakeContext())
    store.content[(TRIAL, 2)][5] ^= 1
    info, data, _ = _load(servicer)
    assert (info.step, info.fallback_from, data) == (1, 2, blob(100, 1))


@pytest.mark.parametrize("trial, step, code", [
    (TRIAL, None, Code.NOT_FOUND),
    (TRIAL, 7, Code.NOT_FOUND),
    ("/abs", None, Code.INVALID_ARGUMENT),
    ("", None, Code.INVALID_ARGUMENT),
])
def test_load_errors(servicer, trial, step, code):
    assert _abort(lambda: _load(servicer, trial, step)).code == code


def test_list_and_delete(servicer):
    for step, metric in [(1, 0.9), (2, 0.1), (3, 0.2)]:
        servicer.SaveCheckpoint(_requests(blob(100, step), step=step, metric=metric),
                                FakeContext())
    listed = servicer.ListCheckpoints(pb.ListCheckpointsRequest(trial=TRIAL), FakeContext())
    assert [(c.step, c.is_best, c.is_latest) for c in listed.checkpoints] == [
        (1, True, False), (2, False, False), (3, False, True)]
    assert listed.store_size_bytes == 300
    deleted = servicer.DeleteCheckpoints(pb.DeleteCheckpointsRequest(trial=TRIAL), FakeContext())
    assert deleted.deleted == 3
    aborted = _abort(lambda: servicer.ListCheckpoints(pb.ListCheckpointsRequest(trial="a/../b"),
                                                      FakeContext()))
    assert aborted.trailing_metadata[FIELD_PATH_METADATA_KEY] == "trial"
