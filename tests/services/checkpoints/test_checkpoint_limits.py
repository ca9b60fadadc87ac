"""Checkpoint steps and sizes are plausible (issue 9, part 4): a step no run can reach never
becomes a trial's "latest", and a declared size past the store's limit is refused up front."""

from __future__ import annotations

import grpc
import pytest
from checkpoint_helpers import TRIAL, blob, sha

from batchlab import limits
from batchlab.proto.v1 import checkpoints_pb2
from batchlab.rpc.errors import FIELD_PATH_METADATA_KEY, InvalidArgument
from services.checkpoints.storage import FilesystemCheckpointStore


def _save(stub, step: int, content: bytes, size: int | None = None):
    header = checkpoints_pb2.CheckpointHeader(
        trial=TRIAL, step=step, sha256=sha(content),
        size_bytes=len(content) if size is None else size)
    requests = [checkpoints_pb2.SaveCheckpointRequest(header=header),
                checkpoints_pb2.SaveCheckpointRequest(data=content)]
    return stub.SaveCheckpoint(iter(requests), timeout=30)


@pytest.mark.parametrize("step", [2**64 - 1, 2**63, limits.MAX_STEPS + 1])
def test_an_implausible_step_is_refused_and_the_real_latest_survives(running, step):
    content = blob(100)
    assert _save(running.stub, 10, content).is_latest
    with pytest.raises(grpc.RpcError) as info:
        _save(running.stub, step, content)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata())[FIELD_PATH_METADATA_KEY] == "header.step"
    (kept,) = running.stub.ListCheckpoints(
        checkpoints_pb2.ListCheckpointsRequest(trial=TRIAL), timeout=30).checkpoints
    assert (kept.step, kept.is_latest) == (10, True)
    loaded = list(running.stub.LoadCheckpoint(
        checkpoints_pb2.LoadCheckpointRequest(trial=TRIAL), timeout=30))
    assert loaded[0].info.step == 10


def test_the_largest_plausible_step_is_kept(running):
    assert _save(running.stub, limits.MAX_STEPS, blob(10)).step == limits.MAX_STEPS


def test_a_checkpoint_past_the_store_limit_is_refused(tmp_path):
    store = FilesystemCheckpointStore(tmp_path, max_bytes=1000)
    content = blob(1001)
    with pytest.raises(InvalidArgument) as info:
        store.save(TRIAL, 1, iter([content]), sha256=sha(content), size_bytes=len(content))
    assert info.value.field_path == "size_bytes"
    assert store.count() == 0
    small = blob(1000)
    assert store.save(TRIAL, 1, iter([small]), sha256=sha(small), size_bytes=1000).step == 1
