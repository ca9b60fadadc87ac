"""The controller's Ray Client link: serving before Ray is up, a lost head, a reconnect.

A Ray head runs as its own process group (`ray start --head --block`); the controller runs as
`python -m services.controller.server` with BATCHLAB_RAY_ADDRESS=ray://... (how it runs
against KubeRay). The controller serves gRPC before Ray is reachable; grpc.health.v1 reports
"batchlab.trainers" SERVING only while the link is up (the API itself stays SERVING), and
the metric batchlab_ray_connected follows; when the head dies the link is noticed lost, and
when a head is back on the same address the controller reconnects by itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from integration_helpers import WORKLOAD, logged_port

from batchlab.rpc.client import channel, free_ports
from services.controller.ray_link import TRAINERS_HEALTH_SERVICE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
SERVING = health_pb2.HealthCheckResponse.SERVING


def _start_head(folder: Path, gcs_port: int, client_port: int) -> subprocess.Popen:
    # A short session folder: Ray puts unix sockets there (path length limit).
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "head.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={gcs_port}",
         f"--ray-client-server-port={client_port}", "--num-cpus=1",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={folder}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
        start_new_session=True)


def _stop(process: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM to the process group this test started, then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


def _status(stub, service: str) -> int:
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    except grpc.RpcError:
        return -1


def _wait_status(stub, service: str, wanted: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _status(stub, service) == wanted:
            return
        time.sleep(0.5)
    raise AssertionError(f"{service or 'server'} not {wanted} after {timeout} s:\n"
                         f"{log.read_text()[-4000:]}")


def _connected_metric(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    for line in text.decode().splitlines():
        if line.startswith("batchlab_ray_connected "):
            return float(line.split()[1])
    raise AssertionError("batchlab_ray_connected is not exported")


def test_health_reflects_a_lost_ray_connection_and_the_link_reconnects(tmp_path):
    # Ray's head needs its ports before it starts (the controller dials them); the controller
    # binds port 0 for gRPC and metrics and the test reads what it got from its log.
    gcs_port, client_port = free_ports(2)
    ray_dir = Path("/tmp") / f"blraylink-{os.getpid()}"
    log_path = tmp_path / "controller.log"
    env = {
        **os.environ,
        "BATCHLAB_STATE_DIR": str(tmp_path / "state"),
        "BATCHLAB_RAY_ADDRESS": f"ray://127.0.0.1:{client_port}",
        "BATCHLAB_BIND_HOST": "127.0.0.1",
        "BATCHLAB_CONTROLLER_PORT": "0",
        "BATCHLAB_METRICS_PORT": "0",
        "BATCHLAB_NUM_TRAINERS": "1",
        # The link is under test, not the trainers: no warm trainer on each connection (one
        # costs a Ray worker starting JAX, and the connect thread waits for it).
        "BATCHLAB_WARM_TRAINERS": "0",
        "BATCHLAB_EVALUATION": "in-process",
        "BATCHLAB_WORKLOADS": WORKLOAD,
        "BATCHLAB_RAY_PROBE_SECONDS": "1",
        "BATCHLAB_RAY_PROBE_TIMEOUT_SECONDS": "15",
        "BATCHLAB_SHUTDOWN_GRACE_SECONDS": "1",
        # Ray Client gives up on a vanished server after this many seconds (30 by default).
        "RAY_CLIENT_RECONNECT_GRACE_PERIOD": "3",
        # A connect attempt while the head is down waits this long before the next one (30 s
        # by default); the test waits for the head to come back, not for Ray Client's backoff.
        "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "5",
    }
    with open(log_path, "ab") as log:
        controller = subprocess.Popen([sys.executable, "-m", "services.controller.server"],
                                      cwd=ROOT, env=env, stdout=log, stderr=log,
                                      start_new_session=True)
    head = None
    try:
        grpc_port = logged_port(log_path, "controller listening", controller)
        metrics_port = logged_port(log_path, "controller metrics", controller)
        with channel(f"127.0.0.1:{grpc_port}") as chan:
            health = health_pb2_grpc.HealthStub(chan)
            # Serving before any Ray exists; the trainers are not.
            _wait_status(health, "", SERVING, 120, log_path)
            assert _status(health, TRAINERS_HEALTH_SERVICE) == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            assert _connected_metric(metrics_port) == 0

            head = _start_head(ray_dir, gcs_port, client_port)
            _wait_status(health, TRAINERS_HEALTH_SERVICE, SERVING, 400, log_path)
            assert _connected_metric(metrics_port) == 1

            _stop(head)  # the head goes away: the link is lost
            _wait_status(health, TRAINERS_HEALTH_SERVICE,
                         health_pb2.HealthCheckResponse.NOT_SERVING, 180, log_path)
            assert _status(health, "") == SERVING  # the API still answers
            assert _connected_metric(metrics_port) == 0
            assert "lost the Ray cluster" in log_path.read_text()

            head = _start_head(ray_dir, gcs_port, client_port)
            _wait_status(health, TRAINERS_HEALTH_SERVICE, SERVING, 400, log_path)
            assert "connected to Ray (connection 2)" in log_path.read_text()
        controller.send_signal(signal.SIGTERM)
        assert controller.wait(120) == 0, log_path.read_text()[-4000:]
    finally:
        if controller.poll() is None:
            _stop(controller)
        if head is not None:
            _stop(head)
