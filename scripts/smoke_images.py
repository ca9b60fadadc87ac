"""Run batchlab's images as the manifests run them and check that they answer (`make images-smoke`).

Every container runs as uid 10001 with a read-only root file system and a writable /tmp (and a
memory-backed /dev/shm), on this machine's loopback:

  batchlab/control    the controller (the image's entry point), sharding and checkpoints
                      servers: gRPC health SERVING and /metrics; the `batchlab` CLI starts.
  batchlab/trainer*   a Ray head started the way KubeRay starts it (`bash -lc "ray start ..."`,
                      so through the login shell's PATH) answering :52365/api/healthz, the probe
                      KubeRay gives Ray >= 2.53; the evaluator (the image's entry point): health
                      and /metrics; the trainer metrics sidecar: /metrics; `import
                      ray.dashboard.optional_deps, jax`.
  both                the controller connects to the trainer image's Ray head as a Ray Client
                      (the same Ray and Python on both sides) and then serves.

Containers run with docker or podman where they can run containers; otherwise (as root with
buildah, e.g. inside another container where no OCI runtime works) in a chroot of the image's
root file system: a private mount namespace with the root bind-mounted read-only, tmpfs on /tmp
and /dev/shm, a fresh PID namespace, `chroot --userspec=10001:10001`, all in a network
namespace of their own (loopback only). Images are the ones `scripts/build_images.sh --list`
names; one not built is a failure (name some to check only those).

Usage: .venv/bin/python scripts/smoke_images.py [--runner docker|podman|chroot] [IMAGE ...]
Exits 1 when a check fails; prints each check with its time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from batchlab.rpc.client import free_ports

REPO_ROOT = Path(__file__).resolve().parents[1]

TOKEN = "smoke-test-token"
UID = "10001:10001"
TRAINER_AGENT_PORT = 52365
WORKLOADS = "mnist1d_resnet1d,mnist1d_resnet1d_small"
_NETNS_FLAG = "BATCHLAB_SMOKE_NETNS"

_CHROOT_SCRIPT = r"""
set -eu
root="$1"; shift
mount --make-rprivate /
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount -t tmpfs -o mode=1777,size=4g tmpfs "$root/tmp"
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=755,size=1m tmpfs "$root/dev"
for node in null zero full random urandom tty; do
  touch "$root/dev/$node"; mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir -p "$root/dev/shm" "$root/dev/pts"
mount -t tmpfs -o mode=1777,size=2g tmpfs "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
if [ -f "$root/etc/hosts" ]; then mount --bind /etc/hosts "$root/etc/hosts"; fi
exec chroot --userspec=10001:10001 "$root" /usr/bin/env -i "$@"
"""


class Container:
    """A running container; `stop()` ends it and everything it started."""

    def __init__(self, process: subprocess.Popen, log: Path, cleanup: Sequence[Sequence[str]]):
        self.process = process
        self.log = log
        self._cleanup = cleanup

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 15)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 9)
            self.process.wait(timeout=10)
        for command in self._cleanup:
            subprocess.run(command, capture_output=True, check=False, timeout=60)


class Runner:
    """Starts containers of an image as uid 10001 on a read-only root, host network."""

    def __init__(self, kind: str, workdir: Path):
        self.kind = kind
        self.workdir = workdir
        self._count = 0

    def _log(self, name: str) -> Path:
        self._count += 1
        return self.workdir / f"{self._count:02d}-{name}.log"

    def image_config(self, image: str) -> dict:
        """The image's OCI config: Env, Entrypoint, Cmd, WorkingDir."""
        if self.kind == "chroot":
            out = subprocess.run(["buildah", "inspect", "--type", "image", image],
                                 capture_output=True, text=True, check=True).stdout
            return json.loads(out)["OCIv1"]["config"]
        out = subprocess.run([self.kind, "image", "inspect", image],
                             capture_output=True, text=True, check=True).stdout
        config = json.loads(out)[0]["Config"]
        return {k[0].upper() + k[1:]: v for k, v in config.items()}

    def start(self, image: str, argv: Sequence[str], env: Mapping[str, str], name: str
              ) -> Container:
        log = self._log(name)
        handle = log.open("wb")
        if self.kind == "chroot":
            container = subprocess.run(["buildah", "from", "--pull-never", image],
                                       capture_output=True, text=True, check=True).stdout.strip()
            try:
                root = subprocess.run(["buildah", "mount", container], capture_output=True,
                                      text=True, check=True).stdout.strip()
                config = self.image_config(image)
            except (OSError, subprocess.CalledProcessError, KeyError, ValueError):
                subprocess.run(["buildah", "rm", container], capture_output=True, check=False)
                raise
            merged = dict(item.split("=", 1) for item in config.get("Env") or ())
            merged.update(env)
            # No command: the image's entry point, as a container runtime starts it.
            argv = list(argv) or [*(config.get("Entrypoint") or ()), *(config.get("Cmd") or ())]
            command = ["unshare", "--mount", "--pid", "--fork", "--kill-child=SIGTERM", "sh",
                       "-c", _CHROOT_SCRIPT, "smoke", root,
                       *(f"{k}={v}" for k, v in merged.items()), *argv]
            cleanup = [["buildah", "umount", container], ["buildah", "rm", container]]
        else:
            command = [self.kind, "run", "--rm", "--name", f"batchlab-smoke-{name}",
                       "--network", "host", "--user", UID, "--read-only",
                       "--tmpfs", "/tmp:rw,mode=1777,size=4g", "--shm-size", "2g",
                       *(arg for k, v in env.items() for arg in ("-e", f"{k}={v}")),
                       image, *argv]
            cleanup = [[self.kind, "rm", "-f", f"batchlab-smoke-{name}"]]
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        return Container(process, log, cleanup)

    def run(self, image: str, argv: Sequence[str], env: Mapping[str, str], name: str,
            timeout: float = 300) -> tuple[int, str]:
        container = self.start(image, argv, env, name)
        try:
            code = container.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            container.stop()
            return 124, container.tail()
        container.stop()
        return code, container.tail()


def runner_kind(image: str, wanted: str | None) -> str:
    """docker or podman where they run containers here, else the chroot runner."""
    candidates = [wanted] if wanted else ["docker", "podman", "chroot"]
    for kind in candidates:
        if kind == "chroot":
            if os.geteuid() == 0 and shutil.which("buildah") and shutil.which("unshare"):
                return "chroot"
            continue
        if not shutil.which(kind):
            continue
        probe = subprocess.run([kind, "run", "--rm", "--network", "host", "--user", UID,
                                "--read-only", image, "true"],
                               capture_output=True, text=True, timeout=120, check=False)
        if probe.returncode == 0:
            return kind
    raise SystemExit(f"smoke_images: no way to run containers here (tried {candidates}); "
                     "the chroot runner needs root, buildah and unshare")


def image_exists(image: str) -> bool:
    for tool in ("buildah", "podman", "docker"):
        if shutil.which(tool):
            args = ([tool, "inspect", "--type", "image", image] if tool == "buildah"
                    else [tool, "image", "inspect", image])
            if subprocess.run(args, capture_output=True, check=False).returncode == 0:
                return True
    return False


# ----------------------------------------------------------------------------- checks


def wait_until(what: str, check, container: Container, timeout: float) -> str:
    """Poll `check()` (returns a detail string or raises) until it succeeds or time is up."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not container.alive():
            raise RuntimeError(f"{what}: the container exited ({container.process.returncode})"
                               f"\n{container.tail()}")
        try:
            return check()
        except Exception as error:  # noqa: BLE001 - not up yet
            last = f"{type(error).__name__}: {error}"
        time.sleep(1.0)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s ({last})\n{container.tail()}")


def grpc_serving(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=5)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return "SERVING"


def http_get(port: int, path: str, must_contain: str = "") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        body = response.read().decode(errors="replace")
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
    if must_contain and must_contain not in body:
        raise RuntimeError(f"{path} lacks {must_contain!r}")
    return f"HTTP 200, {len(body)} bytes"


class Smoke:
    """Runs the checks, records each one's outcome and time."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.results: list[tuple[str, bool, float, str]] = []
        self._running: list[Container] = []

    def check(self, name: str, fn) -> bool:
        start = time.monotonic()
        try:
            detail = fn()
            ok = True
        except Exception as error:  # noqa: BLE001 - a failed check is reported, not raised
            detail, ok = str(error), False
        seconds = time.monotonic() - start
        self.results.append((name, ok, seconds, detail))
        print(f"{'PASS' if ok else 'FAIL'} {seconds:6.1f} s  {name}: {detail.splitlines()[0] if detail else ''}",
              flush=True)
        if not ok:
            print("      " + detail.replace("\n", "\n      "), flush=True)
        return ok

    def start(self, image: str, argv: Sequence[str], env: Mapping[str, str], name: str
              ) -> Container:
        container = self.runner.start(image, argv, env, name)
        self._running.append(container)
        return container

    def stop_all(self) -> None:
        self.stop_since(0)

    def stop_since(self, count: int) -> None:
        """Stop the containers started after the first `count`, newest first."""
        while len(self._running) > count:
            self._running.pop().stop()

    def service(self, image: str, role: str, argv: Sequence[str], env: dict[str, str],
                timeout: float = 240) -> tuple[int, Container | None]:
        """Start a gRPC service; check health and /metrics; returns its gRPC port and container."""
        grpc_port, metrics_port = free_ports(2)
        env = {"BATCHLAB_BIND_HOST": "127.0.0.1", f"BATCHLAB_{role.upper()}_PORT": str(grpc_port),
               "BATCHLAB_METRICS_PORT": str(metrics_port), "BATCHLAB_AUTH_TOKEN": TOKEN, **env}
        try:
            container = self.start(image, argv, env, role)
        except (OSError, subprocess.CalledProcessError) as error:
            failure = error
            self.check(f"{image} {role}: start", lambda: _raise(failure))
            return grpc_port, None
        self.check(f"{image} {role}: gRPC health",
                   lambda: wait_until(role, lambda: grpc_serving(grpc_port), container, timeout))
        self.check(f"{image} {role}: /metrics",
                   lambda: wait_until(role, lambda: http_get(metrics_port, "/metrics",
                                                             "batchlab_"), container, 30))
        return grpc_port, container

    def ray_head(self, image: str) -> int:
        """Start a Ray head as KubeRay does; check the probe endpoint; returns its client port."""
        gcs, client, dashboard, metrics = free_ports(4)
        # KubeRay's probe port; the previous image's head may still be releasing it.
        deadline = time.monotonic() + 60
        while not _port_free(TRAINER_AGENT_PORT) and time.monotonic() < deadline:
            time.sleep(1.0)
        agent = TRAINER_AGENT_PORT if _port_free(TRAINER_AGENT_PORT) else free_ports(1)[0]
        start = (f"ray start --head --block --node-ip-address=127.0.0.1 --port={gcs} "
                 f"--ray-client-server-port={client} --dashboard-host=127.0.0.1 "
                 f"--dashboard-port={dashboard} --metrics-export-port={metrics} "
                 f"--dashboard-agent-listen-port={agent} --num-cpus=1 "
                 "--object-store-memory=200000000 --disable-usage-stats")
        # A Ray Client session starts a server process on the head, which must answer within
        # 30 s by default: too short on a loaded 2-core machine.
        container = self.start(image, ["bash", "-lc", start],
                               {"RAY_USAGE_STATS_ENABLED": "0", "JAX_PLATFORMS": "cpu",
                                "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "180"},
                               "ray-head")
        self.check(f"{image} ray head: :{agent}/api/healthz (KubeRay's probe)",
                   lambda: wait_until("ray head", lambda: http_get(agent, "/api/healthz"),
                                      container, 240))
        return client


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def smoke(runner: Runner, control: str | None, trainers: list[str]) -> Smoke:
    s = Smoke(runner)
    try:
        checkpoints_port = None
        ray_client = None
        evaluator_port = None
        for image in ([control] if control else []) + trainers:
            s.check(f"{image}: as uid 10001 on a read-only root", lambda image=image: _ok(
                runner.run(image, ["python", "-c", _LOCKED_DOWN], {}, "lockdown", timeout=120)))
        if control:
            s.check(f"{control}: batchlab CLI", lambda: _ok(runner.run(
                control, ["batchlab", "--help"], {}, "cli", timeout=120)))
            checkpoints_port, _ = s.service(
                control, "checkpoints", ["python", "-m", "services.checkpoints.server"],
                {"BATCHLAB_CHECKPOINT_ROOT": "/tmp/checkpoints"})
            sharding_port, _ = s.service(
                control, "sharding", ["python", "-m", "services.sharding.server"],
                {"BATCHLAB_DATA_DIR": "/tmp/data"})
        # The first trainer image's Ray head serves the controller below, so it goes last and
        # stays up; the others' containers stop after their checks (one Ray head at a time).
        for index, image in enumerate(reversed(trainers)):
            primary = index == len(trainers) - 1
            started = len(s._running)
            s.check(f"{image}: import ray.dashboard.optional_deps, jax", lambda image=image: _ok(
                runner.run(image, ["python", "-c", "import ray.dashboard.optional_deps, jax; "
                                   "print(jax.devices())"], {"JAX_PLATFORMS": "cpu"},
                           "imports", timeout=300)))
            client = s.ray_head(image)
            if primary:
                ray_client = client
            if checkpoints_port is not None:
                port, _ = s.service(image, "evaluator", [], {  # the image's entry point
                    "BATCHLAB_CHECKPOINTS_ADDR": f"127.0.0.1:{checkpoints_port}",
                    "BATCHLAB_DATA_DIR": "/tmp/data", "JAX_PLATFORMS": "cpu"})
                if primary:
                    evaluator_port = port
            exporter_port = free_ports(1)[0]
            exporter = s.start(image, ["python", "-m", "services.trainer.metrics_exporter"], {
                "BATCHLAB_METRICS_PORT": str(exporter_port),
                "BATCHLAB_TRAINER_METRICS_DIR": "/tmp/metrics"}, "metrics-exporter")
            s.check(f"{image} trainer metrics sidecar: /metrics", lambda p=exporter_port, c=exporter:
                    wait_until("exporter", lambda: http_get(p, "/metrics"), c, 120))
            if not primary:
                s.stop_since(started)
        if control and ray_client is not None:
            _, controller = s.service(control, "controller", [], {  # the image's entry point
                "BATCHLAB_RAY_ADDRESS": f"ray://127.0.0.1:{ray_client}",
                "BATCHLAB_STATE_DIR": "/tmp/state", "BATCHLAB_RESULTS_DIR": "/tmp/results",
                "BATCHLAB_NUM_TRAINERS": "1", "BATCHLAB_WORKLOADS": WORKLOADS,
                "BATCHLAB_DATA_DIR": "/tmp/data",
                "BATCHLAB_CHECKPOINTS_ADDR": f"127.0.0.1:{checkpoints_port}",
                "BATCHLAB_SHARDING_ADDR": f"127.0.0.1:{sharding_port}",
                **({"BATCHLAB_EVALUATOR_ADDR": f"127.0.0.1:{evaluator_port}"}
                   if evaluator_port else {}),
            }, timeout=420)
            if controller is not None:
                s.check(f"{control} controller: Ray Client session with {trainers[0]}'s head",
                        lambda: wait_until("controller", lambda: _logged(
                            controller, "connected to Ray"), controller, 300))
                # The warm trainer actor runs the trainer image's code (JAX) on that head.
                s.check(f"{control} controller: a trainer actor started in {trainers[0]}",
                        lambda: wait_until("controller", lambda: _logged(
                            controller, "started 1 warm trainers"), controller, 300))
    finally:
        s.stop_all()
    return s


def _logged(container: Container, text: str) -> str:
    if text not in container.log.read_text(errors="replace"):
        raise RuntimeError(f"no {text!r} in its log yet")
    return f"logged {text!r}"


def _raise(error: BaseException) -> str:
    raise error


# The process sees uid/gid 10001 and cannot write outside /tmp.
_LOCKED_DOWN = (
    "import os, pathlib, tempfile\n"
    "assert (os.getuid(), os.getgid()) == (10001, 10001), (os.getuid(), os.getgid())\n"
    "for path in ('/probe', '/opt/venv/probe', '/etc/probe'):\n"
    "    try:\n"
    "        pathlib.Path(path).write_text('x')\n"
    "    except OSError:\n"
    "        pass\n"
    "    else:\n"
    "        raise SystemExit(f'{path} is writable')\n"
    "tempfile.NamedTemporaryFile(dir='/tmp').close()\n"
    "print('uid 10001, read-only root, writable /tmp')\n"
)


def _ok(result: tuple[int, str]) -> str:
    code, tail = result
    if code != 0:
        raise RuntimeError(f"exit {code}\n{tail}")
    return "exit 0" + (f", {tail.splitlines()[-1]}" if tail.strip() else "")


def _repository(image: str) -> str:
    """batchlab/control for batchlab/control:0.1.0 or localhost/batchlab/control:0.1.0."""
    name = image.rsplit(":", 1)[0]
    return name.removeprefix("localhost/")


def default_images() -> list[str]:
    """What `make images` builds."""
    return subprocess.run([str(REPO_ROOT / "scripts" / "build_images.sh"), "--list"],
                          capture_output=True, text=True, check=True).stdout.split()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image references (default: all built)")
    parser.add_argument("--runner", choices=["docker", "podman", "chroot"])
    args = parser.parse_args(argv)
    images = list(dict.fromkeys(args.images or default_images()))
    present = [i for i in images if image_exists(i)]
    missing = sorted(set(images) - set(present))
    if missing:
        print(f"smoke_images: not built (run `make images`): {', '.join(missing)}", flush=True)
    control = next((i for i in present if _repository(i) == "batchlab/control"), None)
    # The CPU trainer first: the controller connects to the first trainer's Ray head.
    trainers = sorted((i for i in present if _repository(i) == "batchlab/trainer"),
                      key=lambda i: (not i.endswith("-cpu"), i))
    if not present:
        print("smoke_images: no image is built: run `make images` first", file=sys.stderr)
        return 1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kind = runner_kind(present[0], args.runner)
    if kind == "chroot" and os.environ.get(_NETNS_FLAG) != "1":
        # Our own network namespace (loopback only): the containers' ports (Ray's fixed 52365
        # and 23000+ among them) cannot collide with other processes on this machine.
        os.environ[_NETNS_FLAG] = "1"
        os.execvp("unshare", ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"',
                              "smoke", sys.executable, *sys.argv])
    with tempfile.TemporaryDirectory(prefix="batchlab-smoke-") as tmp:
        runner = Runner(kind, Path(tmp))
        print(f"smoke_images: running {present} with the {runner.kind} runner", flush=True)
        start = time.monotonic()
        result = smoke(runner, control, trainers)
        failed = [name for name, ok, _, _ in result.results if not ok]
        print(f"smoke_images: {len(result.results) - len(failed)} passed, {len(failed)} failed "
              f"in {time.monotonic() - start:.0f} s", flush=True)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
