"""The embedded stack: every service on 127.0.0.1 as a local process, state under one folder.

``batchlab up`` starts the sharding, checkpoint, evaluation and controller servers (the
controller starts a local Ray cluster for its trainer actors), waits until each reports
SERVING on grpc.health.v1, and records the processes in ``<state_dir>/stack.json``;
``batchlab down`` stops them with SIGTERM (graceful) and SIGKILL after a timeout. Logs go to
``<state_dir>/logs/<service>.log``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from batchlab.rpc.client import channel, wait_for_ready
from batchlab.rpc.metrics import METRICS_PORTS

__all__ = ["SERVICES", "Stack", "StackError", "default_state_dir"]

log = logging.getLogger(__name__)

STATE_DIR_ENV = "BATCHLAB_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class ServiceDef:
    """One service of the stack: its role (names env variables), module and default port."""

    name: str
    module: str
    port: int
    peers: tuple[str, ...] = ()


# Started in this order: peers before the services that need them.
SERVICES: tuple[ServiceDef, ...] = (
    ServiceDef("sharding", "services.sharding.server", 50052),
    ServiceDef("checkpoints", "services.checkpoints.server", 50053),
    ServiceDef("evaluator", "services.evaluator.server", 50054, ("checkpoints",)),
    ServiceDef("controller", "services.controller.server", 50051, ("sharding", "checkpoints", "evaluator")),
)


class StackError(RuntimeError):
    """The stack could not start or stop; the message says which service and why."""


def default_state_dir() -> Path:
    """``$BATCHLAB_DATA_DIR`` or ./.batchlab."""
    return Path(os.environ.get(STATE_DIR_ENV, "").strip() or ".batchlab").absolute()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process still answers kill(0): reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


class Stack:
    """Starts, inspects and stops the embedded stack.

    Args:
      state_dir: where state, datasets, checkpoints and logs live.
      host: the interface every server binds (loopback by default).
      ports: role -> gRPC port overrides (tests use free ports).
      metrics_ports: role -> metrics port overrides.
      token: optional bearer token every server requires.
      num_trainers: Ray trainer actors the controller keeps.
      extra_env: more environment for every process.
    """

    def __init__(
        self,
        state_dir: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        ports: dict[str, int] | None = None,
        metrics_ports: dict[str, int] | None = None,
        token: str | None = None,
        num_trainers: int = 2,
        extra_env: dict[str, str] | None = None,
    ):
        self.state_dir = Path(state_dir).absolute() if state_dir else default_state_dir()
        self.host = host
        self.ports = {s.name: (ports or {}).get(s.name, s.port) for s in SERVICES}
        roles = [s.name for s in SERVICES] + ["trainer"]
        self.metrics_ports = {r: (metrics_ports or {}).get(r, METRICS_PORTS[r]) for r in roles}
        self.token = token
        self.num_trainers = num_trainers
        self.extra_env = dict(extra_env or {})

    @property
    def record_path(self) -> Path:
        return self.state_dir / "stack.json"

    def address(self, name: str) -> str:
        return f"{self.host}:{self.ports[name]}"

    def _env(self, service: ServiceDef) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "BATCHLAB_BIND_HOST": self.host,
                f"BATCHLAB_{service.name.upper()}_PORT": str(self.ports[service.name]),
                "BATCHLAB_METRICS_PORT": str(self.metrics_ports[service.name]),
                "BATCHLAB_DATA_DIR": str(self.state_dir),
                "BATCHLAB_STATE_DIR": str(self.state_dir / "controller"),
                "BATCHLAB_CHECKPOINT_ROOT": str(self.state_dir / "checkpoints"),
                "BATCHLAB_NUM_TRAINERS": str(self.num_trainers),
                "BATCHLAB_TRAINER_METRICS_PORT": str(self.metrics_ports["trainer"]),
                "BATCHLAB_JAX_CACHE_DIR": str(self.state_dir / "jax_cache"),
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "disabled",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            }
        )
        for peer in service.peers:
            env[f"BATCHLAB_{peer.upper()}_ADDR"] = self.address(peer)
        if self.token:
            env["BATCHLAB_AUTH_TOKEN"] = self.token
        env.update(self.extra_env)
        return env

    def read_record(self) -> dict[str, Any] | None:
        """The running stack's record, or None."""
        if not self.record_path.exists():
            return None
        return json.loads(self.record_path.read_text())

    def up(self, *, timeout: float = 180.0) -> dict[str, Any]:
        """Start every service and wait until all are SERVING.

        Returns:
          The stack record (pids, addresses, log files).

        Raises:
          StackError: a stack is already running here, or a service did not become ready
            (the started ones are stopped again; the message has the end of its log).
        """
        record = self.read_record()
        if record and any(_alive(p["pid"]) for p in record["services"].values()):
            raise StackError(f"a stack is already running from {self.state_dir} (batchlab down first)")
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        record = {"state_dir": str(self.state_dir), "host": self.host, "started_at": time.time(), "services": {}}
        try:
            for service in SERVICES:
                log_path = logs / f"{service.name}.log"
                with open(log_path, "ab") as log_file:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", service.module],
                        env=self._env(service),
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                record["services"][service.name] = {
                    "pid": proc.pid,
                    "address": self.address(service.name),
                    "metrics_port": self.metrics_ports[service.name],
                    "log": str(log_path),
                }
                self.record_path.write_text(json.dumps(record, indent=1))
                self._wait_ready(service, proc, log_path, timeout)
        except BaseException:
            self.down()
            raise
        return record

    def _wait_ready(self, service: ServiceDef, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ch = channel(self.address(service.name), token=self.token)
        try:
            while True:
                if proc.poll() is not None:
                    raise StackError(
                        f"{service.name} exited with status {proc.returncode}; end of {log_path}:\n{_tail(log_path)}"
                    )
                try:
                    wait_for_ready(ch, timeout=min(2.0, max(deadline - time.monotonic(), 0.1)))
                    log.info("%s is SERVING on %s", service.name, self.address(service.name))
                    return
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise StackError(
                            f"{service.name} not SERVING after {timeout:.0f} s; end of {log_path}:\n{_tail(log_path)}"
                        ) from None
        finally:
            ch.close()

    def down(self, *, timeout: float = 30.0) -> list[str]:
        """Stop every recorded service (SIGTERM, then SIGKILL after ``timeout``); return their names."""
        record = self.read_record()
        if not record:
            return []
        stopped = []
        services = list(record["services"].items())[::-1]  # the controller first
        for name, info in services:
            pid = info["pid"]
            if _alive(pid):
                _signal_group(pid, signal.SIGTERM)
                stopped.append(name)
        deadline = time.monotonic() + timeout
        for name, info in services:
            while _alive(info["pid"]) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(info["pid"]):
                log.warning("%s did not stop in %.0f s: SIGKILL", name, timeout)
                _signal_group(info["pid"], signal.SIGKILL)
        self.record_path.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[dict[str, Any]]:
        """Each recorded service: name, pid, address, alive."""
        record = self.read_record() or {"services": {}}
        return [
            {"name": name, "pid": info["pid"], "address": info["address"], "alive": _alive(info["pid"]), "log": info["log"]}
            for name, info in record["services"].items()
        ]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
