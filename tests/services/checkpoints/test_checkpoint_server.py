"""A real checkpoint server on a free loopback port, with real stubs; and its process main."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from checkpoint_helpers import TOKEN, TRIAL, blob, sha
from grpc_health.v1 import health_pb2, health_pb2_grpc

from batchlab.proto.v1 import checkpoints_pb2 as pb
from batchlab.proto.v1 import checkpoints_pb2_grpc
from batchlab.rpc import client
from batchlab.rpc.errors import FIELD_PATH_METADATA_KEY
from services.checkpoints.storage import CHECKPOINT_DIR

REPO = pathlib.Path(__file__).resolve().parents[3]
MiB = 1 << 20
SERVICE = "batchlab.v1.CheckpointService"


def _upload(stub, content, *, trial=TRIAL, step=1, metric=None, digest=None, chunk=MiB,
            pause=0.0, sent=None):
    header = pb.CheckpointHeader(trial=trial, step=step, maximize=True,
                                 sha256=digest or sha(content), size_bytes=len(content))
    if metric is not None:
        header.metric = metric

    def requests():
        yield pb.SaveCheckpointRequest(header=header)
        for i in range(0, len(content), chunk):
            if sent is not None:
                sent.set()
            time.sleep(pause)
            yield pb.SaveCheckpointRequest(data=content[i:i + chunk])

    return stub.SaveCheckpoint(requests(), timeout=30)


def _download(stub, trial=TRIAL, step=None):
    request = pb.LoadCheckpointRequest(trial=trial)
    if step is not None:
        request.step = step
    messages = list(stub.LoadCheckpoint(request, timeout=30))
    return messages[0].info, b"".join(m.data for m in messages[1:]), len(messages) - 1


def _error(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_multi_mib_round_trip_in_chunks(running):
    content = blob(5 * MiB + 123)
    info = _upload(running.stub, content, metric=0.7)
    assert (info.size_bytes, info.sha256, info.is_latest) == (len(content), sha(content), True)
    loaded, data, chunks = _download(running.stub)
    assert data == content and chunks == 6 and loaded.step == 1


def test_hash_mismatch_on_upload_is_rejected(running):
    content = blob(2 * MiB)
    error = _error(lambda: _upload(running.stub, content, digest=sha(b"other")))
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert dict(error.trailing_metadata())[FIELD_PATH_METADATA_KEY] == "header.sha256"
    assert running.store.count() == 0
    assert _error(lambda: _download(running.stub)).code() == grpc.StatusCode.NOT_FOUND


def test_corruption_on_disk_is_detected_and_the_previous_served(running):
    _upload(running.stub, blob(MiB + 10, 1), step=100, metric=0.9)
    _upload(running.stub, blob(MiB + 10, 2), step=200, metric=0.5)
    folder = running.store.root / TRIAL / CHECKPOINT_DIR
    (path,) = folder.glob(f"{200:020d}-*.bin")
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    info, data, _ = _download(running.stub)
    assert (info.step, info.fallback_from, data) == (100, 200, blob(MiB + 10, 1))
    path.unlink()
    (folder / f"{100:020d}.json").write_text("garbage")
    assert _error(lambda: _download(running.stub)).code() == grpc.StatusCode.NOT_FOUND


def test_retention_keeps_latest_and_best_and_deletes_the_rest(running):
    for step, metric in [(1, 0.2), (2, 0.8), (3, 0.5), (4, 0.6)]:
        _upload(running.stub, blob(1000, step), step=step, metric=metric)
    listed = running.stub.ListCheckpoints(pb.ListCheckpointsRequest(trial=TRIAL), timeout=5)
    assert [(c.step, c.is_best, c.is_latest) for c in listed.checkpoints] == [
        (2, True, False), (4, False, True)]
    files = sorted(p.name[:20] for p in (running.store.root / TRIAL / CHECKPOINT_DIR).iterdir())
    assert files == [f"{2:020d}"] * 2 + [f"{4:020d}"] * 2
    assert listed.store_size_bytes == running.store.size_bytes()
    deleted = running.stub.DeleteCheckpoints(pb.DeleteCheckpointsRequest(trial=TRIAL), timeout=5)
    assert deleted.deleted == 2


@pytest.mark.parametrize("trial", ["../outside", "/etc/cron.d/x", "a/../../b", "a b", ""])
def test_path_escape_attempts_are_invalid_arguments_naming_the_field(running, trial):
    calls = [
        ("header.trial", lambda: _upload(running.stub, b"x", trial=trial)),
        ("trial", lambda: _download(running.stub, trial=trial)),
        ("trial", lambda: running.stub.ListCheckpoints(pb.ListCheckpointsRequest(trial=trial))),
        ("trial", lambda: running.stub.DeleteCheckpoints(
            pb.DeleteCheckpointsRequest(trial=trial))),
    ]
    for field, call in calls:
        error = _error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(error.trailing_metadata())[FIELD_PATH_METADATA_KEY] == field
        assert error.details().startswith(field)
    outside = running.store.root.parent
    assert sorted(p.name for p in outside.iterdir()) == ["root"]


def test_auth_token_required_and_health_exempt(running):
    anonymous = client.channel(running.server.address)
    stub = checkpoints_pb2_grpc.CheckpointServiceStub(anonymous)
    error = _error(lambda: stub.ListCheckpoints(pb.ListCheckpointsRequest(trial=TRIAL)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    error = _error(lambda: _upload(stub, blob(100)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert running.store.count() == 0
    health = health_pb2_grpc.HealthStub(anonymous)
    status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    anonymous.close()


def test_health_not_serving_after_stop(running):
    health = health_pb2_grpc.HealthStub(running.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    stopper = threading.Thread(target=running.server.stop, args=(1.0,))
    stopper.start()
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    stopper.join()


def test_rpc_metrics_are_recorded(running):
    _upload(running.stub, blob(10))
    _error(lambda: _download(running.stub, trial="/x"))
    sample = running.metrics.registry.get_sample_value
    assert sample("batchlab_rpc_requests_total",
                  {"service": SERVICE, "method": "SaveCheckpoint", "code": "OK"}) == 1
    assert sample("batchlab_rpc_requests_total",
                  {"service": SERVICE, "method": "LoadCheckpoint",
                   "code": "INVALID_ARGUMENT"}) == 1


def _start_process(tmp_path, extra_env=None):
    env = {
        **os.environ,
        "BATCHLAB_CHECKPOINT_ROOT": str(tmp_path / "root"),
        "BATCHLAB_CHECKPOINTS_PORT": "0",
        "BATCHLAB_METRICS_PORT": "0",
        "BATCHLAB_BIND_HOST": "127.0.0.1",
        "BATCHLAB_AUTH_TOKEN": TOKEN,
        "BATCHLAB_SHUTDOWN_GRACE_SECONDS": "10",
        **(extra_env or {}),
    }
    return subprocess.Popen([sys.executable, "-m", "services.checkpoints.server"], cwd=REPO,
                            env=env, stderr=subprocess.PIPE, text=True)


def _wait_for_port(process, log):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        log.append(line)
        match = re.search(r"checkpoints listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            return int(match.group(1))
    process.kill()
    raise AssertionError("server did not start:\n" + "".join(log))


def test_sigterm_stops_the_process_gracefully(tmp_path):
    process = _start_process(tmp_path)
    log: list[str] = []
    try:
        port = _wait_for_port(process, log)
        drain = threading.Thread(target=lambda: log.extend(process.stderr), daemon=True)
        drain.start()
        channel = client.channel(f"127.0.0.1:{port}", token=TOKEN)
        client.wait_for_ready(channel, timeout=10)
        stub = checkpoints_pb2_grpc.CheckpointServiceStub(channel)
        content = blob(3 * MiB)
        result, sent = {}, threading.Event()

        def slow_upload():
            result["info"] = _upload(stub, content, pause=0.3, sent=sent)

        uploader = threading.Thread(target=slow_upload)
        uploader.start()
        assert sent.wait(10)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        uploader.join(timeout=10)
        # The upload in flight when the signal came was allowed to finish.
        assert result["info"].size_bytes == len(content)
        assert time.monotonic() - start < 5
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert any("received SIGTERM" in line for line in log)


def test_missing_root_is_a_clear_startup_error(tmp_path):
    process = _start_process(tmp_path, {"BATCHLAB_CHECKPOINT_ROOT": ""})
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "BATCHLAB_CHECKPOINT_ROOT is not set" in err
