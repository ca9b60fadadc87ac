"""One /metrics endpoint for every trainer actor of a Ray worker pod.

A worker pod runs as many trainer actors as its resources allow (eight 1-GPU runs on an 8-GPU
host, several CPU runs on a CPU pod), each a process with its own Prometheus registry, while
Prometheus scrapes the ports a pod declares. So in a pod every actor writes its registry to a
file in a folder the pod shares (BATCHLAB_TRAINER_METRICS_DIR; `TextfileWriter`, a few seconds
apart, replaced atomically), and the pod's sidecar (`python -m services.trainer.metrics_exporter`)
serves all of them on the declared port, each sample labelled `actor` with its writer's name, so
that two actors' otherwise identical series (process_*, trainer throughput) stay apart. A file
not rewritten for `stale_s` belongs to an actor that died and is left out; an actor that stops
cleanly removes its own.

Environment (sidecar):
  BATCHLAB_TRAINER_METRICS_DIR: the shared folder (required).
  BATCHLAB_METRICS_PORT: the port to serve (default 9110).
  BATCHLAB_TRAINER_METRICS_STALE_SECONDS: files older than this are dropped (default 60).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["METRICS_DIR_ENV", "TextfileWriter", "TrainerFilesCollector", "main"]

log = logging.getLogger(__name__)

METRICS_DIR_ENV = "BATCHLAB_TRAINER_METRICS_DIR"
ACTOR_LABEL = "actor"
SUFFIX = ".prom"
DEFAULT_PORT = 9110


class TextfileWriter:
    """Writes a registry to `<directory>/<name>.prom` every `interval_s` until `close()`.

    Args:
      registry: the actor's registry.
      directory: the folder the pod's metrics sidecar reads.
      name: this writer's name, unique in the pod (default: host and process id).
      interval_s: seconds between writes (Prometheus scrapes every 15 s).
    """

    def __init__(self, registry: CollectorRegistry, directory: str | os.PathLike[str], *,
                 name: str | None = None, interval_s: float = 5.0):
        self.registry = registry
        self.path = Path(directory) / f"{name or f'{socket.gethostname()}-{os.getpid()}'}{SUFFIX}"
        self.interval_s = interval_s
        self._stop = threading.Event()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()
        self._thread = threading.Thread(target=self._run, name="metrics-textfile", daemon=True)
        self._thread.start()

    def write(self) -> None:
        """Write the registry now (to a temporary file renamed over the old one)."""
        write_to_textfile(str(self.path), self.registry)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.write()
            except OSError as error:  # a full or vanished folder must not stop the trainer
                log.warning("cannot write metrics to %s: %s", self.path, error)

    def close(self) -> None:
        """Stop writing and remove the file: this actor's series leave the pod's endpoint."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)


class TrainerFilesCollector:
    """A Prometheus collector of every fresh `*.prom` file in a folder, labelled by actor.

    Families of the same name from several files are merged into one (a family may appear only
    once in an exposition). A file that does not parse is skipped with a warning.

    Args:
      directory: the folder the actors write to.
      stale_s: files last written longer ago than this are ignored (their actor died).
      clock: time.time, replaceable in tests.
    """

    def __init__(self, directory: str | os.PathLike[str], *, stale_s: float = 60.0,
                 clock: Any = time.time):
        self.directory = Path(directory)
        self.stale_s = stale_s
        self._clock = clock

    def _files(self) -> Iterator[tuple[str, str]]:
        now = self._clock()
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                if now - path.stat().st_mtime > self.stale_s:
                    continue
                yield path.name[: -len(SUFFIX)], path.read_text(encoding="utf-8")
            except FileNotFoundError:  # the actor stopped between the listing and the read
                continue

    def collect(self) -> Iterator[Metric]:
        """The merged families (called by the registry on every scrape)."""
        merged: dict[str, Metric] = {}
        for actor, text in self._files():
            try:
                families = list(text_string_to_metric_families(text))
            except ValueError as error:
                log.warning("skipping unreadable metrics of %s: %s", actor, error)
                continue
            for family in families:
                target = merged.get(family.name)
                if target is None:
                    target = merged[family.name] = Metric(family.name, family.documentation,
                                                          family.type, family.unit)
                for sample in family.samples:
                    labels = {**sample.labels, ACTOR_LABEL: actor}
                    target.add_sample(sample.name, labels, sample.value, sample.timestamp,
                                      sample.exemplar)
        yield from merged.values()


def main(environ: Mapping[str, str] | None = None) -> int:
    """Serve the pod's trainer metrics until SIGTERM; returns the exit status."""
    from batchlab.rpc.metrics import start_metrics_server
    from batchlab.rpc.server import configure_logging

    env = os.environ if environ is None else environ
    configure_logging(env)
    directory = env.get(METRICS_DIR_ENV, "").strip()
    if not directory:
        log.error("%s is not set: the folder the trainer actors write their metrics to",
                  METRICS_DIR_ENV)
        return 2
    try:
        port = int(env.get("BATCHLAB_METRICS_PORT", "").strip() or DEFAULT_PORT)
        stale = float(env.get("BATCHLAB_TRAINER_METRICS_STALE_SECONDS", "").strip() or 60)
    except ValueError as error:
        log.error("BATCHLAB_METRICS_PORT / BATCHLAB_TRAINER_METRICS_STALE_SECONDS: %s", error)
        return 2
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TrainerFilesCollector(directory, stale_s=stale))
    server = start_metrics_server(port, registry)
    log.info("serving the trainer metrics of %s on port %d", directory, server.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
