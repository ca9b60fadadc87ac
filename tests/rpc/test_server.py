"""A real server on a free loopback port: health, auth, metrics, errors, graceful stop."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from batchlab.proto.v1 import sharding_pb2, sharding_pb2_grpc
from batchlab.rpc import client, errors
from batchlab.rpc.metrics import make_metrics
from batchlab.rpc.server import Registration, build_server, settings_from_env

SERVICE = "batchlab.v1.ShardingService"
TOKEN = "s3cret-token"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Servicer(sharding_pb2_grpc.ShardingServiceServicer):
    """A stand-in service: GetShard echoes, PrepareDataset fails or sleeps on request."""

    def __init__(self):
        self.started = threading.Event()

    @errors.handle_errors
    def PrepareDataset(self, request, context):
        if request.dataset == "bad":
            raise errors.InvalidArgument("dataset", "must be one of ['mnist1d']")
        if request.dataset == "bug":
            raise ZeroDivisionError("oops")
        if request.dataset == "slow":
            self.started.set()
            time.sleep(0.6)
        return sharding_pb2.DatasetInfo(dataset=request.dataset)

    @errors.handle_errors
    def GetShard(self, request, context):
        return sharding_pb2.ShardAssignment(indices=[request.shard_index], end_of_epoch=True)


def _registration(servicer=None):
    return Registration.for_service(sharding_pb2, sharding_pb2_grpc, "ShardingService",
                                    servicer or _Servicer())


@pytest.fixture
def make_server():
    servers = []

    def make(**kwargs):
        servicer = kwargs.pop("servicer", None) or _Servicer()
        server = build_server([_registration(servicer)], service_name="test", **kwargs)
        server.start()
        servers.append(server)
        return server, servicer

    yield make
    for server in servers:
        server.stop(None)


def _stub(server, token=None):
    ch = client.channel(server.address, token=token)
    return ch, sharding_pb2_grpc.ShardingServiceStub(ch)


def test_registration_names_the_full_service():
    assert _registration().service == SERVICE


def test_binds_a_free_loopback_port(make_server):
    server, _ = make_server()
    assert server.port > 0 and server.address == f"127.0.0.1:{server.port}"


def test_health_serving_then_not_serving_after_stop(make_server):
    server, _ = make_server()
    ch = client.channel(server.address)
    health = health_pb2_grpc.HealthStub(ch)
    for name in ("", SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert next(watch).status == SERVING
    stopper = threading.Thread(target=server.stop, args=(1.0,))
    stopper.start()
    assert next(watch).status == NOT_SERVING
    stopper.join()
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    ch.close()


def test_graceful_stop_lets_in_flight_calls_finish(make_server):
    server, servicer = make_server()
    ch, stub = _stub(server)
    result = {}

    def call():
        result["info"] = stub.PrepareDataset(sharding_pb2.PrepareDatasetRequest(dataset="slow"),
                                             timeout=10)

    caller = threading.Thread(target=call)
    caller.start()
    assert servicer.started.wait(5)
    server.stop(5.0)
    caller.join()
    assert result["info"].dataset == "slow"
    ch.close()


def test_client_errors_keep_their_code_and_field(make_server):
    server, _ = make_server()
    ch, stub = _stub(server)
    with pytest.raises(grpc.RpcError) as info:
        stub.PrepareDataset(sharding_pb2.PrepareDatasetRequest(dataset="bad"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dataset: must be one of" in info.value.details()
    assert dict(info.value.trailing_metadata())[errors.FIELD_PATH_METADATA_KEY] == "dataset"
    with pytest.raises(grpc.RpcError) as info:
        stub.PrepareDataset(sharding_pb2.PrepareDatasetRequest(dataset="bug"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "oops" not in info.value.details()
    ch.close()


@pytest.mark.parametrize("token, code", [
    (None, grpc.StatusCode.UNAUTHENTICATED),
    ("wrong", grpc.StatusCode.UNAUTHENTICATED),
    (TOKEN, grpc.StatusCode.OK),
])
def test_auth_token_required(make_server, token, code):
    server, _ = make_server(auth_token=TOKEN)
    ch, stub = _stub(server, token=token)
    try:
        stub.GetShard(sharding_pb2.GetShardRequest(shard_index=3), timeout=5)
        got = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        got = exc.code()
    assert got == code
    # Health is exempt: probes carry no token.
    health = health_pb2_grpc.HealthStub(ch)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
    ch.close()


def test_metrics_count_calls_by_method_and_code(make_server):
    metrics = make_metrics(CollectorRegistry(), roles=["sharding"])
    server, _ = make_server(metrics=metrics, auth_token=TOKEN)
    ch, stub = _stub(server, token=TOKEN)
    stub.GetShard(sharding_pb2.GetShardRequest(), timeout=5)
    stub.GetShard(sharding_pb2.GetShardRequest(), timeout=5)
    with pytest.raises(grpc.RpcError):
        stub.PrepareDataset(sharding_pb2.PrepareDatasetRequest(dataset="bad"), timeout=5)
    _, anonymous = _stub(server)
    with pytest.raises(grpc.RpcError):
        anonymous.GetShard(sharding_pb2.GetShardRequest(), timeout=5)

    def count(method, code):
        return metrics.registry.get_sample_value(
            "batchlab_rpc_requests_total",
            {"service": SERVICE, "method": method, "code": code}) or 0

    assert count("GetShard", "OK") == 2
    assert count("PrepareDataset", "INVALID_ARGUMENT") == 1
    assert count("GetShard", "UNAUTHENTICATED") == 1
    assert metrics.registry.get_sample_value(
        "batchlab_rpc_latency_seconds_count", {"service": SERVICE, "method": "GetShard"}) == 3
    ch.close()


def test_settings_from_env():
    settings = settings_from_env("checkpoints", default_port=50053, environ={
        "BATCHLAB_CHECKPOINTS_PORT": "0", "BATCHLAB_AUTH_TOKEN": "t",
        "BATCHLAB_BIND_HOST": "127.0.0.1"})
    assert (settings.host, settings.port, settings.metrics_port, settings.auth_token,
            settings.grace) == ("127.0.0.1", 0, 9103, "t", 10.0)
    defaults = settings_from_env("sharding", default_port=50052, environ={})
    assert (defaults.host, defaults.port, defaults.metrics_port, defaults.auth_token) == (
        "0.0.0.0", 50052, 9102, None)
    with pytest.raises(ValueError, match="BATCHLAB_SHARDING_PORT"):
        settings_from_env("sharding", default_port=1, environ={"BATCHLAB_SHARDING_PORT": "x"})


def test_a_taken_metrics_port_ends_the_service_with_status_2_and_one_line(tmp_path):
    """Not a traceback and status 1: `batchlab up` retries status-1 exits on the same port."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        env = {**os.environ, "BATCHLAB_CHECKPOINT_ROOT": str(tmp_path),
               "BATCHLAB_BIND_HOST": "127.0.0.1", "BATCHLAB_CHECKPOINTS_PORT": "0",
               "BATCHLAB_METRICS_PORT": str(taken)}
        done = subprocess.run([sys.executable, "-m", "services.checkpoints.server"], env=env,
                              capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "checkpoints cannot start" in x]
    assert f"metrics port 127.0.0.1:{taken} (BATCHLAB_METRICS_PORT)" in line


@pytest.mark.parametrize("level, expected", [("INFO", logging.WARNING), ("DEBUG", logging.NOTSET)])
def test_service_logging_quiets_orbax_and_jax_unless_debugging(level, expected):
    """An evaluation logged ~16 INFO lines from orbax/absl and JAX around the evaluator's one."""
    from batchlab.rpc.server import configure_logging

    names = ("absl", "orbax", "jax")
    before = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.NOTSET)
        configure_logging({"BATCHLAB_LOG_LEVEL": level})
        assert {name: logging.getLogger(name).level for name in names} == dict.fromkeys(names, expected)
    finally:
        for name, value in before.items():
            logging.getLogger(name).setLevel(value)


def test_preloaded_modules_are_imported_before_any_servicer_exists(tmp_path, monkeypatch):
    """tensorflow_datasets swaps the process-wide __import__ while it imports; an RPC served
    meanwhile failed inside gRPC and was never answered (a 30-minute hang of the evaluator)."""
    import sys

    from batchlab.rpc.client import StartupError
    from batchlab.rpc.server import run_service

    (tmp_path / "preload_probe_module.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def make_registrations(metrics):
        seen.append("preload_probe_module" in sys.modules)
        raise StartupError("stop here: no server is needed")

    environ = {"BATCHLAB_BIND_HOST": "127.0.0.1", "BATCHLAB_SHARDING_PORT": "0"}
    assert run_service("sharding", default_port=0, make_registrations=make_registrations,
                       environ=environ, preload=("preload_probe_module",)) == 2
    assert seen == [True]


def test_prepare_runs_before_the_preload_and_a_bad_setting_there_ends_with_status_2(
        tmp_path, monkeypatch, caplog):
    """The evaluator lowers its priority in ``prepare`` so that its imports yield to the
    controller's start: it must run before the preload, and its errors are configuration
    errors (one log line, status 2), as in make_registrations."""
    import sys

    from batchlab.rpc.server import run_service

    (tmp_path / "prepare_probe_module.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "prepare_probe_module", raising=False)
    seen = []
    environ = {"BATCHLAB_BIND_HOST": "127.0.0.1", "BATCHLAB_SHARDING_PORT": "0"}

    def prepare(given):
        assert given is environ
        seen.append("prepare_probe_module" in sys.modules)
        raise ValueError("BATCHLAB_EVALUATOR_NICE must be an integer from 0 to 19; got 'x'")

    def make_registrations(metrics):  # pragma: no cover - must not be reached
        seen.append("registrations")
        return []

    with caplog.at_level("ERROR"):
        assert run_service("sharding", default_port=0, make_registrations=make_registrations,
                           environ=environ, preload=("prepare_probe_module",),
                           prepare=prepare) == 2
    assert seen == [False]  # before the preload, and nothing after the error
    assert "prepare_probe_module" not in sys.modules
    assert "BATCHLAB_EVALUATOR_NICE must be an integer" in caplog.text


def test_the_evaluator_lowers_its_priority_before_its_preload_and_only_there(monkeypatch):
    from batchlab.rpc.metrics import make_metrics
    from services.evaluator import server

    calls = []
    monkeypatch.setattr(server, "run_service", lambda *args, **kwargs: calls.append(kwargs) or 0)
    assert server.main() == 0
    assert calls[0]["prepare"] is server.lower_priority
    assert calls[0]["preload"]
    # Not again when the servicer is built: a second write of the session's scheduling group
    # could meet the kernel's rate limit (EAGAIN) and wait.
    lowered = []
    monkeypatch.setattr(server, "lower_priority", lambda *args: lowered.append(args))
    monkeypatch.setenv("BATCHLAB_CHECKPOINTS_ADDR", "127.0.0.1:1")
    assert server.make_registrations(make_metrics(roles=["evaluator"]))
    assert lowered == []


def test_a_bad_nice_value_ends_the_evaluator_with_status_2_and_one_line_before_its_preload():
    """End to end, as the stack starts it: the setting is refused before JAX is imported."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "BATCHLAB_EVALUATOR_NICE": "x", "BATCHLAB_EVALUATOR_PORT": "0",
           "BATCHLAB_BIND_HOST": "127.0.0.1", "BATCHLAB_CHECKPOINTS_ADDR": "127.0.0.1:1",
           "BATCHLAB_METRICS_PORT": "0"}
    script = ("import runpy, sys\n"
              "try:\n"
              "    runpy.run_module('services.evaluator.server', run_name='__main__')\n"
              "except SystemExit:\n"
              "    print('jax imported:', 'jax' in sys.modules)\n"
              "    raise\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "BATCHLAB_EVALUATOR_NICE must be an integer" in errors[0], errors
    assert "jax imported: False" in out.stdout


@pytest.mark.parametrize("service", ["evaluator", "sharding"])
def test_services_that_load_datasets_preload_tensorflow_datasets(service, monkeypatch):
    import importlib

    server = importlib.import_module(f"services.{service}.server")
    calls = []
    monkeypatch.setattr(server, "run_service", lambda *args, **kwargs: calls.append(kwargs) or 0)
    assert server.main() == 0
    assert "batchlab.data.builders" in calls[0]["preload"]


def test_after_the_preload_a_first_dataset_load_never_swaps_the_process_import(tfds_dir):
    """What the evaluator's first Evaluate does: load a dataset. Run in a fresh process so that
    nothing is imported yet; every entry into etils' lazy_imports() (which swaps the process-
    wide __import__) after the preload is a window in which a concurrent RPC breaks in gRPC."""
    import subprocess
    import sys

    script = f"""
import contextlib, importlib, sys
for module in ("batchlab.data.builders", "batchlab.train.evaluate"):
    importlib.import_module(module)
from etils import epy
import etils.epy.lazy_imports_utils as utils
entered = []
original = utils.lazy_imports
@contextlib.contextmanager
def spy(*args, **kwargs):
    frame = sys._getframe(2)
    entered.append(f"{{frame.f_globals.get('__name__')}}:{{frame.f_lineno}}")
    with original(*args, **kwargs):
        yield
epy.lazy_imports = utils.lazy_imports = spy
from batchlab.data.loaders import get_dataset
for split in ("train", "validation"):
    assert len(get_dataset("mnist1d", split, {tfds_dir!r}, config="small", build=False)) > 0
print("ENTERED", entered)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "ENTERED []", done.stdout
