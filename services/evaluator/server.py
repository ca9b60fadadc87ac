"""Runs the evaluation service: ``python -m services.evaluator.server``.

Environment:
  BATCHLAB_CHECKPOINTS_ADDR: host:port of the checkpoint service (required).
  BATCHLAB_DATA_DIR: datasets live in ``$BATCHLAB_DATA_DIR/tfds``.
  BATCHLAB_EVALUATOR_PORT: gRPC port (default 50054).
  BATCHLAB_AUTH_TOKEN: when set, calls need it and it is sent to the checkpoint service.
  BATCHLAB_METRICS_PORT: Prometheus port (default 9104).
  BATCHLAB_BIND_HOST: interface to bind (default 0.0.0.0).
  BATCHLAB_EVALUATOR_NICE: the nice value this process runs at, 0-19 (default 0;
    the embedded stack, where trainers share the machine's CPUs with it, sets 19). Every
    thread gets that nice value, and with Linux's autogroups (on by default: each session
    is one scheduling group, shared fairly with the others whatever its threads' nice) so
    does the process's session's group, when the process leads its session (as each of the
    stack's services does).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from batchlab.proto.v1 import checkpoints_pb2, evaluation_pb2, evaluation_pb2_grpc
from batchlab.rpc.checkpoint_client import CheckpointClient
from batchlab.rpc.client import channel, peer_address
from batchlab.rpc.server import Registration, run_service
from services.evaluator.servicer import EvaluationServicer

if TYPE_CHECKING:
    from batchlab.rpc.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_PORT = 50054
NICE_ENV = "BATCHLAB_EVALUATOR_NICE"


def lower_priority(environ: Mapping[str, str] | None = None) -> int:
    """Run this process at the nice value ``BATCHLAB_EVALUATOR_NICE`` (see the module
    docstring); returns it.

    On the embedded stack evaluation overlaps training on the same CPUs. Measured on 2 cores
    (2026-12-01, the CPU reproduction's 46-run study on a fresh stack, start-up included, two
    pairs of runs back to back, the evaluator's group set to nice 19 from outside): 114.1 and
    117.6 s against 122.2 and 121.4 s without; the system benchmark (make bench) measures
    the stack with this setting.

    Raises:
      ValueError: naming the variable, when it is not an integer in 0-19.
    """
    raw = (os.environ if environ is None else environ).get(NICE_ENV, "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) > 19:
        raise ValueError(f"{NICE_ENV} must be an integer from 0 to 19; got {raw[:20]!r}")
    nice = int(raw)
    if nice == 0:
        return 0
    # On Linux a nice value belongs to a thread, and new threads inherit their creator's:
    # every thread that exists now gets it.
    for task in Path("/proc/self/task").iterdir():
        try:
            os.setpriority(os.PRIO_PROCESS, int(task.name), nice)
        except ProcessLookupError:
            pass  # the thread ended
        except PermissionError:  # it runs at a higher nice already: raising needs privileges
            log.warning("thread %s keeps its nice %d (asked %d)", task.name,
                        os.getpriority(os.PRIO_PROCESS, int(task.name)), nice)
    autogroup = Path("/proc/self/autogroup")
    if os.getsid(0) == os.getpid() and autogroup.exists():
        # Only a session leader: another process's session may be a person's terminal.
        try:
            autogroup.write_text(str(nice))
        except OSError as error:
            log.warning("could not lower the priority of this session's scheduling group "
                        "(%s): %s", autogroup, error)
    log.info("evaluator CPU priority lowered: nice %d", nice)
    return nice


def make_registrations(metrics: Metrics) -> list[Registration]:
    """Lowers the CPU priority if asked, connects to the checkpoint service and builds the
    servicer."""
    lower_priority()
    address = peer_address("checkpoints")
    client = CheckpointClient(channel(address, token=os.environ.get("BATCHLAB_AUTH_TOKEN") or None))

    def load(trial: str, step: int | None, folder: Path) -> checkpoints_pb2.CheckpointInfo | None:
        return client.load_dir(trial, folder, step=step)

    def record(trial: str, step: int, metric: float | None,
               maximize: bool) -> checkpoints_pb2.CheckpointInfo:
        return client.record_evaluation(trial, step, metric=metric, maximize=maximize)

    data_root = os.environ.get("BATCHLAB_DATA_DIR")
    data_dir = str(Path(data_root) / "tfds") if data_root else None
    servicer = EvaluationServicer(load, data_dir=data_dir, record=record,
                                  metrics=metrics.evaluator)
    return [Registration.for_service(evaluation_pb2, evaluation_pb2_grpc, "EvaluationService", servicer)]


def main() -> int:
    """Serves until SIGTERM or SIGINT; returns the exit status."""
    # Imported before serving: see run_service's preload (the evaluation loads datasets).
    return run_service("evaluator", default_port=DEFAULT_PORT, make_registrations=make_registrations,
                       preload=("batchlab.data.builders", "batchlab.train.evaluate"))


if __name__ == "__main__":
    sys.exit(main())
