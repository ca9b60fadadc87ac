"""`batchlab up` (issue 9, part 5): where the stack listens (flags, BATCHLAB_*_ADDR, defaults),
a busy port refused with the way out, a bounded wait that says what it waits for, and a
service whose start failed for a passing reason started again. Fake services stand in for the
real ones (which need Ray): the same Stack code starts, watches and stops them."""

from __future__ import annotations

import os
import socket
import sys
import textwrap

import pytest

from batchlab.client import stack as stack_module
from batchlab.client.stack import ServiceDef, Stack, StackError, listen_addresses
from batchlab.rpc.client import free_ports

FAKE_SERVICE = textwrap.dedent("""
    import os, pathlib, sys, threading
    from batchlab.rpc.server import build_server, serve

    counter = pathlib.Path(os.environ["FAKE_COUNTER"])
    attempt = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(attempt))
    mode = os.environ["FAKE_MODE"]
    print(f"fake service attempt {attempt}", flush=True)
    if mode == "transient" and attempt == 1:
        print("Timed out waiting for file /tmp/ray/session/gcs_server_port", flush=True)
        sys.exit(1)
    if mode == "broken":
        print("BATCHLAB_SOMETHING must be a number", flush=True)
        sys.exit(2)
    if mode == "never":
        print("still loading the model zoo", flush=True)
        threading.Event().wait(600)
    from prometheus_client import CollectorRegistry
    from batchlab.rpc.metrics import start_metrics_server
    try:  # as a real service: a taken metrics port ends it with status 2
        start_metrics_server(int(os.environ["BATCHLAB_METRICS_PORT"]), CollectorRegistry(),
                             addr=os.environ["BATCHLAB_BIND_HOST"])
    except OSError as exc:
        print(f"metrics port: {exc}", flush=True)
        sys.exit(2)
    server = build_server([], host=os.environ["BATCHLAB_BIND_HOST"],
                          port=int(os.environ["BATCHLAB_SHARDING_PORT"]))
    if mode == "trainers_later":
        server.start()
        server.health.set("batchlab.trainers", 2)  # NOT_SERVING
        print("connecting to Ray", flush=True)
        threading.Timer(3.0, server.health.set, ("batchlab.trainers", 1)).start()
    sys.exit(serve(server, grace=1))
""")


@pytest.fixture
def fake_stack(tmp_path, monkeypatch):
    """A Stack whose only service is a fake "sharding" server behaving as FAKE_MODE says."""
    package = tmp_path / "fakes"
    package.mkdir()
    (package / "fake_service.py").write_text(FAKE_SERVICE)
    def make(mode: str, ready: tuple[str, ...] = ("",)) -> Stack:
        monkeypatch.setattr(stack_module, "SERVICES", (
            ServiceDef("sharding", "fake_service", 50052, (), "pretending to start", ready),))
        (port,) = free_ports(1)
        metrics = dict(zip(["sharding", "trainer"], free_ports(2), strict=True))
        return Stack(tmp_path / "state", ports={"sharding": port}, metrics_ports=metrics,
                     environ={}, extra_env={
                         "PYTHONPATH": f"{package}:{':'.join(sys.path)}",
                         "FAKE_MODE": mode, "FAKE_COUNTER": str(tmp_path / "attempts")})

    stacks = []
    yield lambda *args: stacks.append(make(*args)) or stacks[-1]
    for stack in stacks:
        stack.down(timeout=5)


def test_a_failed_start_is_retried(fake_stack):
    stack = fake_stack("transient")
    lines: list[str] = []
    record = stack.up(timeout=60, retries=2, progress=lines.append)
    assert record["services"]["sharding"]["address"] == stack.address("sharding")
    assert any("exited with status 1 while starting" in line and "gcs_server_port" in line
               for line in lines)
    assert any("attempt 2 of 3" in line for line in lines)
    assert lines[-1].startswith("sharding is SERVING on ")
    assert stack.down() == ["sharding"]


def test_retries_are_bounded(fake_stack, tmp_path):
    stack = fake_stack("transient")
    with pytest.raises(StackError) as info:
        stack.up(timeout=60, retries=0)
    assert "sharding exited with status 1" in str(info.value)
    assert (tmp_path / "attempts").read_text() == "1"


def test_a_configuration_error_is_not_retried(fake_stack, tmp_path):
    with pytest.raises(StackError) as info:
        fake_stack("broken").up(timeout=60, retries=3)
    assert "exited with status 2" in str(info.value)
    assert "BATCHLAB_SOMETHING must be a number" in str(info.value)
    assert (tmp_path / "attempts").read_text() == "1"


def test_the_wait_is_bounded_and_says_what_it_waits_for(fake_stack, monkeypatch):
    monkeypatch.setattr(stack_module, "_PROGRESS_EVERY_S", 0.5)
    stack = fake_stack("never")
    lines: list[str] = []
    with pytest.raises(StackError) as info:
        stack.up(timeout=4, progress=lines.append)
    assert "sharding not SERVING on" in str(info.value)
    assert "--timeout" in str(info.value)
    waiting = [line for line in lines if line.startswith("waiting for sharding")]
    assert waiting and "pretending to start" in waiting[-1]
    assert "still loading the model zoo" in waiting[-1]
    assert stack.read_record() is None  # stopped again


def test_a_busy_port_is_refused_with_the_way_out(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = Stack(tmp_path, ports={"controller": port}, environ={})
        with pytest.raises(StackError) as info:
            stack.up(timeout=5)
    message = str(info.value)
    assert f"port {port} on 127.0.0.1 (controller) is in use" in message
    assert "--controller-port" in message and "BATCHLAB_CONTROLLER_ADDR" in message
    assert not (tmp_path / "logs").exists()


def test_busy_metrics_ports_are_replaced_by_free_ones(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = dict(zip(["controller", "sharding", "checkpoints", "evaluator"], free_ports(4),
                         strict=True))
        stack = Stack(tmp_path, ports=ports, environ={})
        stack.metrics_ports["sharding"] = taken
        stack._check_ports()
    assert stack.metrics_ports["sharding"] != taken
    assert len(set(stack.metrics_ports.values())) == len(stack.metrics_ports)


def test_addresses_come_from_flags_then_the_clients_variables_then_defaults(tmp_path):
    environ = {"BATCHLAB_CONTROLLER_ADDR": "127.0.0.2:6051",
               "BATCHLAB_CHECKPOINTS_ADDR": "[::1]:6053"}
    assert listen_addresses(environ) == {"controller": ("127.0.0.2", 6051),
                                         "checkpoints": ("::1", 6053)}
    stack = Stack(tmp_path, environ=environ)
    assert stack.address("controller") == "127.0.0.2:6051"
    assert stack.address("checkpoints") == "::1:6053"
    assert stack.address("sharding") == "127.0.0.1:50052"
    flagged = Stack(tmp_path, environ=environ, host="127.0.0.3", ports={"controller": 7051})
    assert flagged.address("controller") == "127.0.0.3:7051"
    assert flagged.address("evaluator") == "127.0.0.3:50054"
    # The controller tells its trainers the stack's address, whatever the user's shell says.
    env = stack._env(stack_module.SERVICES[-1])
    assert env["BATCHLAB_CONTROLLER_ADDR"] == "127.0.0.2:6051"
    assert env["BATCHLAB_BIND_HOST"] == "127.0.0.2"
    assert env["BATCHLAB_CONTROLLER_PORT"] == "6051"


def test_services_run_with_grpc_fork_support_off_unless_the_environment_sets_it(
        tmp_path, monkeypatch):
    """The controller forks Ray's processes while its gRPC server runs (see FORK_SAFE_ENV);
    each start attempt bounds its own wait for Ray's GCS (local_ray.GCS_PORT_WAITS_S), so the
    stack sets no wait of its own."""
    monkeypatch.delenv("GRPC_ENABLE_FORK_SUPPORT", raising=False)
    monkeypatch.delenv("RAY_gcs_server_port_wait_time_s", raising=False)
    stack = Stack(tmp_path, environ={})
    for service in stack_module.SERVICES:
        env = stack._env(service)
        assert env["GRPC_ENABLE_FORK_SUPPORT"] == "0"
        assert "RAY_gcs_server_port_wait_time_s" not in env
    monkeypatch.setenv("GRPC_ENABLE_FORK_SUPPORT", "1")
    assert stack._env(stack_module.SERVICES[0])["GRPC_ENABLE_FORK_SUPPORT"] == "1"


def test_the_evaluator_alone_yields_the_cpus_unless_the_environment_sets_it(tmp_path,
                                                                           monkeypatch):
    monkeypatch.delenv("BATCHLAB_EVALUATOR_NICE", raising=False)
    stack = Stack(tmp_path, environ={})
    nice = {s.name: stack._env(s).get("BATCHLAB_EVALUATOR_NICE") for s in stack_module.SERVICES}
    assert nice == {s.name: "10" if s.name == "evaluator" else None
                    for s in stack_module.SERVICES}
    monkeypatch.setenv("BATCHLAB_EVALUATOR_NICE", "0")
    evaluator = next(s for s in stack_module.SERVICES if s.name == "evaluator")
    assert stack._env(evaluator)["BATCHLAB_EVALUATOR_NICE"] == "0"


@pytest.mark.parametrize("value", ["localhost", "host:port", ":50051", "h:70000"])
def test_a_malformed_address_variable_is_named(tmp_path, value):
    with pytest.raises(StackError) as info:
        Stack(tmp_path, environ={"BATCHLAB_SHARDING_ADDR": value})
    assert "BATCHLAB_SHARDING_ADDR must be host:port" in str(info.value)


def test_every_health_name_the_service_is_ready_under_is_awaited(fake_stack, monkeypatch):
    monkeypatch.setattr(stack_module, "_PROGRESS_EVERY_S", 0.5)
    stack = fake_stack("trainers_later", ("", "batchlab.trainers"))
    lines: list[str] = []
    stack.up(timeout=60, progress=lines.append)
    waiting = [line for line in lines if line.startswith("waiting for sharding")]
    assert waiting, lines
    assert "health 'batchlab.trainers' SERVING" in waiting[-1]
    assert "NOT_SERVING" in waiting[-1] and "connecting to Ray" in waiting[-1]
    assert lines[-1].startswith("sharding is SERVING on ")


def _fake_pair(tmp_path, monkeypatch):
    """Two fake services (sharding, checkpoints) in place of the real ones; their env."""
    package = tmp_path / "fakes"
    package.mkdir()
    for name in ("sharding", "checkpoints"):
        (package / f"fake_{name}.py").write_text(
            FAKE_SERVICE.replace("BATCHLAB_SHARDING_PORT", f"BATCHLAB_{name.upper()}_PORT"))
    monkeypatch.setattr(stack_module, "SERVICES", tuple(
        ServiceDef(name, f"fake_{name}", 1, (), "starting", ("",))
        for name in ("sharding", "checkpoints")))
    return {"PYTHONPATH": f"{package}:{':'.join(sys.path)}", "FAKE_MODE": "ok",
            "FAKE_COUNTER": str(tmp_path / "attempts")}


def _kill_and_wait(pid):
    import os
    import signal
    import time

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while stack_module._alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def test_up_after_a_crash_starts_only_the_missing_service_where_it_was(tmp_path, monkeypatch):
    """After the controller crashed, `up` refused ("already running") while the client said
    "start it with `batchlab up`": now `up` starts what is missing, on its recorded ports."""
    env = _fake_pair(tmp_path, monkeypatch)
    ports = dict(zip(["sharding", "checkpoints"], free_ports(2), strict=True))
    metrics = dict(zip(["sharding", "checkpoints", "trainer"], free_ports(3), strict=True))
    first = Stack(tmp_path / "state", ports=ports, metrics_ports=metrics, environ={},
                  extra_env=env)
    try:
        before = first.up(timeout=60)["services"]
        _kill_and_wait(before["checkpoints"]["pid"])
        # A new `batchlab up` with default ports: the record's ports win.
        again = Stack(tmp_path / "state", environ={}, extra_env=env)
        lines: list[str] = []
        after = again.up(timeout=60, progress=lines.append)["services"]
        assert lines[0].startswith("restarting checkpoints of the stack")
        assert after["sharding"]["pid"] == before["sharding"]["pid"]
        assert after["checkpoints"]["pid"] != before["checkpoints"]["pid"]
        assert after["checkpoints"]["address"] == before["checkpoints"]["address"]
        assert after["checkpoints"]["metrics_port"] == before["checkpoints"]["metrics_port"]
        with pytest.raises(StackError, match="already running"):
            again.up(timeout=60)
    finally:
        assert sorted(first.down(timeout=10)) == ["checkpoints", "sharding"]


def test_a_restarted_service_whose_metrics_port_was_taken_gets_another(tmp_path, monkeypatch):
    """The crashed service's metrics port went to another program meanwhile: the service
    would exit on it, so it starts on a free one, which the record then names."""
    import socket

    env = _fake_pair(tmp_path, monkeypatch)
    ports = dict(zip(["sharding", "checkpoints"], free_ports(2), strict=True))
    first = Stack(tmp_path / "state", ports=ports, environ={}, extra_env=env)
    try:
        before = first.up(timeout=60)["services"]
        _kill_and_wait(before["checkpoints"]["pid"])
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", before["checkpoints"]["metrics_port"]))
            squatter.listen()
            after = Stack(tmp_path / "state", environ={}, extra_env=env).up(timeout=60)["services"]
        assert after["checkpoints"]["address"] == before["checkpoints"]["address"]
        assert after["checkpoints"]["metrics_port"] != before["checkpoints"]["metrics_port"]
        assert after["sharding"]["metrics_port"] == before["sharding"]["metrics_port"]
        assert stack_module._alive(after["checkpoints"]["pid"])
    finally:
        assert sorted(first.down(timeout=10)) == ["checkpoints", "sharding"]


def _record(tmp_path, **service):
    import json

    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    info = {"pid": os.getpid(), "address": "127.0.0.1:1", "port": 1, "metrics_port": 2,
            "log": "x", **service}
    (state / "stack.json").write_text(json.dumps({"services": {"sharding": info}}))
    return state


def test_a_reused_pid_is_not_the_recorded_service_and_down_leaves_it_alone(tmp_path):
    """The record's pid now belongs to another process (here: this test's): not alive, and
    `down` does not signal it (it killed an unrelated process before)."""
    state = _record(tmp_path, start_ticks=stack_module._start_ticks(os.getpid()) + 1)
    stack = Stack(state, environ={})
    assert [s["alive"] for s in stack.status()] == [False]
    assert stack.down(timeout=1) == []  # and this process is still here to assert it


def test_a_partial_restart_refuses_other_ports_or_another_token(tmp_path, monkeypatch):
    monkeypatch.setattr(stack_module, "SERVICES", (
        ServiceDef("sharding", "fake_sharding", 1, (), "starting", ("",)),
        ServiceDef("checkpoints", "fake_checkpoints", 1, (), "starting", ("",))))
    digest = stack_module._token_digest("s3cret", tmp_path / "state")
    state = _record(tmp_path, start_ticks=stack_module._start_ticks(os.getpid()),
                    token_sha256=digest)
    with pytest.raises(StackError, match="listens on port 1, not 7 as asked"):
        Stack(state, ports={"sharding": 7}, token="s3cret", environ={}).up(timeout=5)
    with pytest.raises(StackError, match="was started with a token"):
        Stack(state, environ={}).up(timeout=5)


def test_one_up_or_down_at_a_time_per_state_folder(tmp_path):
    stack = Stack(tmp_path / "state", environ={})
    other = Stack(tmp_path / "state", environ={})
    with stack._exclusive(), pytest.raises(StackError, match="another `batchlab up` or `down`"):
        other.down()
    assert other.down() == []  # free again
