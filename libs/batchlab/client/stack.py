"""The embedded stack: every service as a local process, state under one folder.

``batchlab up`` starts the sharding, checkpoint, evaluation and controller servers together (the
controller starts a local Ray cluster for its trainer actors), waits until each reports
SERVING on grpc.health.v1, and records the processes in ``<state_dir>/stack.json``;
``batchlab down`` stops them with SIGTERM (graceful) and SIGKILL after a timeout. Logs go to
``<state_dir>/logs/<service>.log``.

Where each service listens comes from, in order: explicit ports and hosts (``batchlab up
--host/--controller-port/...``), the ``BATCHLAB_<SERVICE>_ADDR`` variables the clients read
(so ``BATCHLAB_CONTROLLER_ADDR=127.0.0.1:6051`` moves the stack and its clients together),
then the defaults (127.0.0.1:50051-50054). A busy gRPC port is refused up front with the way
out; a busy metrics port is replaced by a free one (the record lists it).

Start-up is bounded: each service gets ``timeout`` seconds from its start to report SERVING on every
health name it is ready under (the controller also under ``batchlab.trainers``: Ray is
connected and trainers can run; the controller retries a local Ray start that timed out, as
happened with both cores busy), and progress messages say what is awaited, its last health
status and what the service last logged (each attempt's wait for Ray's GCS:
batchlab.runner.local_ray.GCS_PORT_WAITS_S). The services run with gRPC's fork support off
(:data:`FORK_SAFE_ENV`). A service that exits during its start is started again, up to
``retries`` times, unless it exited with
:data:`~batchlab.rpc.server.EXIT_CONFIGURATION` (a bad setting, which a restart cannot fix).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from batchlab.files import atomic_write
from batchlab.rpc.client import channel, free_ports, peer_env_var, wait_for_ready
from batchlab.rpc.metrics import METRICS_PORTS
from batchlab.rpc.server import EXIT_CONFIGURATION

__all__ = ["SERVICES", "Stack", "StackError", "default_state_dir", "listen_addresses"]

log = logging.getLogger(__name__)

STATE_DIR_ENV = "BATCHLAB_DATA_DIR"
#: gRPC's fork support off in every service (unless the environment sets it; the processes
#: Ray starts inherit it). Measured, not explained: in 120 stack starts on 2026-12-01,
#: alternating the setting, 4 of 60 with fork support on stalled for about 30 s (Ray's "The
#: current node timed out during startup", then a retry that worked) and none of 60 with it
#: off (Fisher's exact test, one-sided: p = 0.06; with 40 earlier starts with it off, none
#: stalling: 0 of 100, p = 0.02). With it on, gRPC logs "Other threads are currently calling
#: into gRPC, skipping fork() handlers" at the controller's forks of Ray's processes, stalled
#: or not. In each of the 4 stalled starts the raylet wrote no log at all (every other start's
#: raylet did), and in 2 of them the dashboard process died of SIGABRT. Why fork support
#: matters when its handlers are skipped is not known.
FORK_SAFE_ENV = {"GRPC_ENABLE_FORK_SUPPORT": "0"}
DEFAULT_HOST = "127.0.0.1"
#: The evaluator's nice value on the embedded stack (BATCHLAB_EVALUATOR_NICE).
EVALUATOR_NICE = 10
_PROGRESS_EVERY_S = 5.0


@dataclasses.dataclass(frozen=True)
class ServiceDef:
    """One service of the stack.

    Attributes:
      name: its role (names its environment variables).
      module: what ``python -m`` runs.
      port: its default gRPC port.
      peers: the services it dials (their addresses go into its environment).
      starting: what it does while starting, for progress messages.
      ready: the grpc.health.v1 names that must report SERVING ("" = the server).
    """

    name: str
    module: str
    port: int
    peers: tuple[str, ...] = ()
    starting: str = "starting"
    ready: tuple[str, ...] = ("",)


# The stack's services (started together; see Stack._up).
SERVICES: tuple[ServiceDef, ...] = (
    ServiceDef("sharding", "services.sharding.server", 50052),
    ServiceDef("checkpoints", "services.checkpoints.server", 50053),
    ServiceDef("evaluator", "services.evaluator.server", 50054, ("checkpoints",)),
    # services.controller.ray_link reports "batchlab.trainers" SERVING once Ray is connected.
    ServiceDef("controller", "services.controller.server", 50051,
               ("sharding", "checkpoints", "evaluator"),
               "checking its database, starting a local Ray cluster and warm trainers",
               ("", "batchlab.trainers")),
)


class StackError(RuntimeError):
    """The stack could not start or stop; the message says which service, why and what to do."""


def default_state_dir() -> Path:
    """``$BATCHLAB_DATA_DIR`` or ./.batchlab."""
    return Path(os.environ.get(STATE_DIR_ENV, "").strip() or ".batchlab").absolute()


def listen_addresses(environ: Mapping[str, str] | None = None) -> dict[str, tuple[str, int]]:
    """The (host, port) of each service named in ``BATCHLAB_<SERVICE>_ADDR``.

    Args:
      environ: mapping to read (``os.environ`` by default).

    Returns:
      Service name -> (host, port), for the variables that are set.

    Raises:
      StackError: naming a variable that is not host:port.
    """
    environ = os.environ if environ is None else environ
    found = {}
    for service in SERVICES:
        name = peer_env_var(service.name)
        value = environ.get(name, "").strip()
        if not value:
            continue
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StackError(f"{name} must be host:port (e.g. 127.0.0.1:{service.port}); "
                             f"got {value!r}")
        found[service.name] = (host.strip("[]"), int(port))
    return found


def _dial_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::", "[::]") else host


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As a server binds: a port left in TIME-WAIT by a killed service (its peers held
        # connections) is free to listen on, and must not read as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _token_digest(token: str | None, state_dir: Path) -> str:
    """A salted digest of the stack's token for its record (the token itself is not written)."""
    return hashlib.sha256(f"{state_dir}\0{token or ''}".encode()).hexdigest()


def _start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot, /proc/<pid>/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def _alive_as(info: Mapping[str, Any]) -> bool:
    """Whether a recorded service still runs: its pid is alive and is the same process (a
    reused pid, after a reboot say, belongs to something else)."""
    if not _alive(info["pid"]):
        return False
    recorded = info.get("start_ticks")
    return recorded is None or _start_ticks(info["pid"]) in (None, recorded)


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


def _running(pid: int) -> bool:
    """Whether service ``pid`` or anything it started in its group (a service runs in a session
    of its own; the controller's local Ray joins it) still runs."""
    if _alive(pid):  # first: reaps the service itself when it is this process's ended child
        return True
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or not ours: nothing this stack started
        return False
    return True


class Stack:
    """Starts, inspects and stops the embedded stack.

    Args:
      state_dir: where state, datasets, checkpoints and logs live.
      host: the interface every server binds unless ``hosts`` or ``BATCHLAB_<S>_ADDR`` says
        otherwise (loopback by default).
      ports: role -> gRPC port overrides.
      metrics_ports: role -> metrics port overrides (roles: the services and "trainer").
      token: optional bearer token every server requires.
      num_trainers: Ray trainer actors the controller keeps.
      extra_env: more environment for every process.
      hosts: role -> interface overrides.
      environ: where ``BATCHLAB_<SERVICE>_ADDR`` are read (``os.environ`` by default; pass
        ``{}`` to ignore them).
    """

    def __init__(
        self,
        state_dir: str | Path | None = None,
        *,
        host: str | None = None,
        ports: Mapping[str, int] | None = None,
        metrics_ports: Mapping[str, int] | None = None,
        token: str | None = None,
        num_trainers: int = 2,
        extra_env: Mapping[str, str] | None = None,
        hosts: Mapping[str, str] | None = None,
        environ: Mapping[str, str] | None = None,
    ):
        self.state_dir = Path(state_dir).absolute() if state_dir else default_state_dir()
        from_env = listen_addresses(environ)
        self.hosts = {}
        self.ports = {}
        for service in SERVICES:
            env_host, env_port = from_env.get(service.name, (None, None))
            self.hosts[service.name] = ((hosts or {}).get(service.name) or host or env_host
                                        or DEFAULT_HOST)
            self.ports[service.name] = int((ports or {}).get(service.name) or env_port
                                           or service.port)
        roles = [s.name for s in SERVICES] + ["trainer"]
        self.metrics_ports = {r: (metrics_ports or {}).get(r, METRICS_PORTS[r]) for r in roles}
        self._explicit_ports = {name for name in self.ports
                                if (ports or {}).get(name) or from_env.get(name)}
        self._explicit_metrics = set(metrics_ports or {})
        self.token = token
        self.num_trainers = num_trainers
        self.extra_env = dict(extra_env or {})

    @property
    def host(self) -> str:
        """The controller's interface (the one most services share)."""
        return self.hosts.get("controller") or next(iter(self.hosts.values()))

    @property
    def record_path(self) -> Path:
        """The running stack's record (pids, addresses, logs)."""
        return self.state_dir / "stack.json"

    def address(self, name: str) -> str:
        """``host:port`` a client on this machine dials for service ``name``."""
        return f"{_dial_host(self.hosts[name])}:{self.ports[name]}"

    def _env(self, service: ServiceDef) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "BATCHLAB_BIND_HOST": self.hosts[service.name],
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
        for key, value in FORK_SAFE_ENV.items():
            env.setdefault(key, value)
        if service.name == "evaluator":
            # Evaluation overlaps training on the same CPUs: it yields them to the trainers
            # (services.evaluator.server.lower_priority), unless the environment says otherwise.
            env.setdefault("BATCHLAB_EVALUATOR_NICE", str(EVALUATOR_NICE))
        # The controller dials its peers (and tells trainers where it is) at these addresses;
        # the service's own address variable would otherwise be the user's, not the stack's.
        env.pop(peer_env_var(service.name), None)
        for peer in service.peers:
            env[peer_env_var(peer)] = self.address(peer)
        if service.name == "controller":
            env[peer_env_var("controller")] = self.address("controller")
        if self.token:
            env["BATCHLAB_AUTH_TOKEN"] = self.token
        env.update(self.extra_env)
        return env

    def read_record(self) -> dict[str, Any] | None:
        """The running stack's record, or None."""
        if not self.record_path.exists():
            return None
        record: dict[str, Any] = json.loads(self.record_path.read_text())
        return record

    def _check_ports(self) -> None:
        for service in SERVICES:
            host, port = self.hosts[service.name], self.ports[service.name]
            if _port_in_use(host, port):
                raise StackError(
                    f"port {port} on {host} ({service.name}) is in use: another stack or "
                    f"program holds it. Stop it (`batchlab down`), or start on other ports "
                    f"(`batchlab up --{service.name}-port PORT`, or "
                    f"{peer_env_var(service.name)}=host:port for `batchlab up` and the clients)")
        taken: set[int] = set()
        for role in self.metrics_ports:
            self._move_busy_metrics_port(role, self.hosts.get(role, self.host), taken)
            taken.add(self.metrics_ports[role])

    def _move_busy_metrics_port(self, role: str, host: str, taken: Collection[int] = ()) -> None:
        """Give ``role`` a free metrics port when another role or program holds its own; a port
        given explicitly is kept (the service then says it is taken). Nothing dials a metrics
        port but the scraper, which the record and `batchlab status` point at."""
        port = self.metrics_ports[role]
        if port and role not in self._explicit_metrics and (
                port in taken or _port_in_use(host, port)):
            (free,) = free_ports(1, _dial_host(host))
            log.info("metrics port %d of %s is in use: using %d", port, role, free)
            self.metrics_ports[role] = free

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the state folder's lock: one `up` or `down` at a time (two `up` runs after a
        crash would otherwise both start the missing controller on one database)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "stack.lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StackError(f"another `batchlab up` or `down` is running on "
                                 f"{self.state_dir}; wait for it to finish") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def up(self, *, timeout: float = 180.0, retries: int = 2,
           progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Start the stack, holding the state folder's lock; see :meth:`_up`."""
        with self._exclusive():
            return self._up(timeout=timeout, retries=retries, progress=progress)

    def _up(self, *, timeout: float, retries: int,
            progress: Callable[[str], None] | None) -> dict[str, Any]:
        """Start every service and wait until all are SERVING.

        Args:
          timeout: seconds each service (each attempt) gets to report SERVING.
          retries: further attempts for a service that exits while starting (not for a
            configuration error).
          progress: called with a line for people: what is started, what is awaited and
            what it last logged (every few seconds), retries.

        Returns:
          The stack record (pids, addresses, log files).

        Raises:
          StackError: a whole stack is already running here, a port is taken, or a service
            did not become ready (the ones this call started are stopped again; the message
            has the end of its log).

        When part of a recorded stack still runs (a service crashed), only the missing
        services are started, at the addresses and ports the record gives.
        """
        say = progress or (lambda line: log.info("%s", line))
        record = self.read_record()
        alive = {name for name, p in (record or {"services": {}})["services"].items()
                 if _alive_as(p)}
        if record and alive >= {s.name for s in SERVICES}:
            raise StackError(f"a stack is already running from {self.state_dir} "
                             "(`batchlab down` first, or another --state-dir)")
        if record and alive:
            # Part of the stack died (a crashed controller, say): start only what is missing,
            # where the record says it was, so the live services' peers still find it.
            self._adopt(record, alive)
            say(f"restarting {', '.join(s.name for s in SERVICES if s.name not in alive)} "
                f"of the stack in {self.state_dir} ({', '.join(sorted(alive))} still running)")
        else:
            alive = set()
            self._check_ports()
            record = {"state_dir": str(self.state_dir), "host": self.host,
                      "started_at": time.time(), "services": {}}
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        started: list[str] = []
        to_start = [s for s in SERVICES if s.name not in alive]
        procs: dict[str, tuple[subprocess.Popen[bytes], float]] = {}

        def spawn(service: ServiceDef, attempt: int) -> None:
            say(f"starting {service.name} on {self.address(service.name)}"
                + (f" (attempt {attempt} of {retries + 1})" if attempt > 1 else ""))
            log_path = logs / f"{service.name}.log"
            proc = self._spawn(service, log_path)
            procs[service.name] = (proc, time.monotonic())
            record["services"][service.name] = {
                "pid": proc.pid,
                "address": self.address(service.name),
                "bind_host": self.hosts[service.name],
                "port": self.ports[service.name],
                "metrics_port": self.metrics_ports[service.name],
                "trainer_metrics_port": self.metrics_ports["trainer"],
                "start_ticks": _start_ticks(proc.pid),
                "token_sha256": _token_digest(self.token, self.state_dir),
                "log": str(log_path),
            }
            atomic_write(self.record_path, json.dumps(record, indent=1))

        try:
            # All at once: a service dials its peers lazily (gRPC channels connect on first
            # use), so none waits for another to start. The slowest start (the controller's:
            # a local Ray cluster and warm trainers) goes first and overlaps the others'.
            for service in sorted(to_start, key=lambda s: s.name != "controller"):
                started.append(service.name)
                spawn(service, 1)
            for service in to_start:
                attempt = 1
                while True:
                    proc, since = procs[service.name]
                    if self._wait_ready(service, proc, logs / f"{service.name}.log", timeout,
                                        say, last_attempt=attempt > retries, since=since):
                        break
                    say(f"{service.name} exited with status {proc.returncode} while starting "
                        f"(last logged: {_last_line(logs / f'{service.name}.log')}); "
                        "starting it again")
                    attempt += 1
                    spawn(service, attempt)
        except BaseException:
            if alive:  # stop only what this call started; the rest ran before it
                for name in started:
                    pid = record["services"].get(name, {}).get("pid")
                    if pid and _alive(pid):
                        _signal_group(pid, signal.SIGTERM)
            else:
                self._down(30.0)  # the lock is held already
            raise
        return record

    def _adopt(self, record: Mapping[str, Any], alive: set[str]) -> None:
        """Take every service's interface and ports from a running stack's record; the ports
        of the services to start again must be free, and what this call was told (ports,
        hosts, token) must not contradict the running stack."""
        for name, info in record["services"].items():
            if name not in self.ports:
                continue
            port = int(info.get("port") or info["address"].rsplit(":", 1)[1])
            if name in self._explicit_ports and self.ports[name] != port:
                raise StackError(
                    f"{name} of the running stack in {self.state_dir} listens on port {port}, "
                    f"not {self.ports[name]} as asked: start it again without the port, or "
                    f"`batchlab down` first")
            digest = info.get("token_sha256")
            if digest is not None and digest != _token_digest(self.token, self.state_dir):
                raise StackError(
                    f"the running stack in {self.state_dir} was started with "
                    f"{'another' if self.token else 'a'} token: pass the same --token (or "
                    f"BATCHLAB_AUTH_TOKEN) to start its missing services, or `batchlab down` first")
            self.ports[name] = port
            self.hosts[name] = info.get("bind_host") or self.hosts[name]
            self.metrics_ports[name] = int(info["metrics_port"])
            if info.get("trainer_metrics_port"):
                self.metrics_ports["trainer"] = int(info["trainer_metrics_port"])
        for service in SERVICES:
            if service.name not in alive:
                self._move_busy_metrics_port(service.name, self.hosts[service.name])
        for service in SERVICES:
            if service.name not in alive and _port_in_use(self.hosts[service.name],
                                                          self.ports[service.name]):
                raise StackError(
                    f"port {self.ports[service.name]} on {self.hosts[service.name]} "
                    f"({service.name}, to be started again) is in use: `batchlab down` stops "
                    f"the rest of this stack, then `batchlab up` starts a whole one")

    def _spawn(self, service: ServiceDef, log_path: Path) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log_file:
            return subprocess.Popen(
                [sys.executable, "-m", service.module],
                env=self._env(service),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _wait_ready(self, service: ServiceDef, proc: subprocess.Popen[bytes], log_path: Path,
                    timeout: float, say: Callable[[str], None], *, last_attempt: bool,
                    since: float) -> bool:
        """True once SERVING; False when it exited while starting and may be retried.

        ``since`` is when it was started (time.monotonic()): ``timeout`` counts from there.
        """
        start = since
        deadline = start + timeout
        next_note = start + _PROGRESS_EVERY_S
        waiting = list(service.ready)
        ch = channel(self.address(service.name), token=self.token)
        try:
            while waiting:
                if proc.poll() is not None:
                    if proc.returncode != EXIT_CONFIGURATION and not last_attempt:
                        return False
                    raise StackError(f"{service.name} exited with status {proc.returncode}; "
                                     f"end of {log_path}:\n{_tail(log_path)}")
                name = waiting[0]
                what = f"health {name!r}" if name else "its server"
                try:
                    wait_for_ready(ch, timeout=min(1.0, max(deadline - time.monotonic(), 0.1)),
                                   service=name)
                    waiting.pop(0)
                    continue
                except TimeoutError as error:
                    seen = str(error).rpartition("(")[2].rstrip(")")
                now = time.monotonic()
                if now > deadline:
                    _signal_group(proc.pid, signal.SIGTERM)
                    raise StackError(
                        f"{service.name} not SERVING on {self.address(service.name)} after "
                        f"{timeout:.0f} s ({what}: {seen}; raise the limit with `batchlab up "
                        f"--timeout S`); end of {log_path}:\n{_tail(log_path)}")
                if now >= next_note:
                    next_note = now + _PROGRESS_EVERY_S
                    say(f"waiting for {service.name} on {self.address(service.name)} to report "
                        f"{what} SERVING ({service.starting}; {seen}; {now - start:.0f} of "
                        f"{timeout:.0f} s); last logged: {_last_line(log_path)}")
            say(f"{service.name} is SERVING on {self.address(service.name)} "
                f"({time.monotonic() - start:.0f} s)")
            return True
        finally:
            ch.close()

    def down(self, *, timeout: float = 30.0) -> list[str]:
        """Stop every recorded service (SIGTERM, then SIGKILL after ``timeout``); return their names."""
        with self._exclusive():
            return self._down(timeout)

    def _down(self, timeout: float) -> list[str]:
        record = self.read_record()
        if not record:
            return []
        stopped = []
        # The controller first (it stops placing work), then the services it dials.
        order = [s.name for s in reversed(SERVICES)]
        services = sorted(record["services"].items(),
                          key=lambda item: order.index(item[0]) if item[0] in order else len(order))
        # Only the recorded processes themselves: a pid reused by another process is left be.
        services = [(name, info) for name, info in services if _alive_as(info)]
        for name, info in services:
            _signal_group(info["pid"], signal.SIGTERM)
            stopped.append(name)
        deadline = time.monotonic() + timeout
        # Until the process and what it started in its group (the controller's local Ray:
        # GCS, raylet, agents) are gone: a stack started right after `down` returned would
        # otherwise start its Ray beside the old one's last seconds.
        for name, info in services:
            while _running(info["pid"]) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _running(info["pid"]):
                log.warning("%s did not stop in %.0f s: SIGKILL", name, timeout)
                _signal_group(info["pid"], signal.SIGKILL)
        self.record_path.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[dict[str, Any]]:
        """Each recorded service: name, pid, address, alive."""
        record = self.read_record() or {"services": {}}
        return [
            {"name": name, "pid": info["pid"], "address": info["address"], "alive": _alive_as(info), "log": info["log"]}
            for name, info in record["services"].items()
        ]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            log.warning("could not signal process %d (gone, or not ours)", pid)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _last_line(path: Path, limit: int = 160) -> str:
    """The last non-empty line of a log, cut to ``limit`` characters ("nothing yet" if none)."""
    lines = [line for line in _tail(path, 5).splitlines() if line.strip()]
    if not lines or lines == ["(no log)"]:
        return "nothing yet"
    line = lines[-1].strip()
    return line if len(line) <= limit else line[:limit] + "..."
