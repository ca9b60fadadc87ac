"""Runs the evaluation service: ``python -m services.evaluator.server``.

Environment:
  BATCHLAB_CHECKPOINTS_ADDR: host:port of the checkpoint service (required).
  BATCHLAB_DATA_DIR: datasets live in ``$BATCHLAB_DATA_DIR/tfds``.
  BATCHLAB_EVALUATOR_PORT: gRPC port (default 50054).
  BATCHLAB_AUTH_TOKEN: when set, calls need it and it is sent to the checkpoint service.
  BATCHLAB_METRICS_PORT: Prometheus port (default 9104).
  BATCHLAB_BIND_HOST: interface to bind (default 0.0.0.0).
  BATCHLAB_EVALUATOR_NICE: the nice value this process runs at, 0-19 (default 0;
    the embedded stack, where trainers share the machine's CPUs with it, sets 10). Every
    thread gets that nice value, and so does the process's session's scheduling group when
    the process leads its session (as each of the stack's services does) and the kernel
    groups by session (Linux autogroups, for processes in the root cpu cgroup when
    kernel.sched_autogroup_enabled is 1, as on this project's machine: CPU time is then
    shared fairly between sessions whatever their threads' nice).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
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
_AUTOGROUP_TRIES = 5


def lower_priority(environ: Mapping[str, str] | None = None) -> int:
    """Run this process at the nice value ``BATCHLAB_EVALUATOR_NICE`` (see the module
    docstring); returns it.

    On the embedded stack evaluation overlaps training on the same CPUs. Measured on 2 cores
    (2026-12-01, the CPU reproduction's 46-run study on a fresh stack, start-up included,
    three pairs of runs back to back, the run without first each time, the evaluator's
    group set to nice 19 from outside): 114.1, 117.6 and 106.9 s against 122.2, 121.4 and
    127.5 s without (the last ran beside tests of mine). The stack sets 10, not 19: at 19
    a group weighs 15 against a nice-0 group's 1024, so trainers that keep every CPU busy
    would leave evaluations about 1.5% of a CPU and their deadlines could pass; at 10 (110
    against 1024) they keep about a tenth. The system benchmark (make bench) measures the
    stack with 10.

    Raises:
      ValueError: naming the variable, when it is not an integer in 0-19.
    """
    raw = (os.environ if environ is None else environ).get(NICE_ENV, "").strip()
    if not raw:
        return 0
    if not re.fullmatch(r"[0-9]{1,2}", raw) or int(raw) > 19:
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
            log.warning("thread %s keeps its higher nice (asked %d)", task.name, nice)
    autogroup = Path("/proc/self/autogroup")
    if os.getsid(0) == os.getpid() and autogroup.exists():
        # Only a session leader: another process's session may be a person's terminal.
        for attempt in range(_AUTOGROUP_TRIES):
            try:
                autogroup.write_text(str(nice))
                break
            except BlockingIOError:
                # EAGAIN: without CAP_SYS_ADMIN the kernel takes one such write on the
                # machine per 100 ms.
                if attempt + 1 < _AUTOGROUP_TRIES:
                    time.sleep(0.15 * (attempt + 1))
            except OSError as error:
                log.warning("could not lower the priority of this session's scheduling "
                            "group (%s): %s", autogroup, error)
                break
        else:
            log.warning("could not lower the priority of this session's scheduling group "
                        "(%s): the kernel was busy %d times", autogroup, _AUTOGROUP_TRIES)
    log.info("evaluator CPU priority lowered: nice %d", nice)
    return nice


def make_registrations(metrics: Metrics) -> list[Registration]:
    """Connects to the checkpoint service and builds the servicer."""
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
    # The priority is lowered first: on the embedded stack these imports (JAX, about 1.7 s
    # of CPU) overlap the controller's start of Ray, which `batchlab up` waits for.
    return run_service("evaluator", default_port=DEFAULT_PORT, make_registrations=make_registrations,
                       preload=("batchlab.data.builders", "batchlab.train.evaluate"),
                       prepare=lower_priority)


if __name__ == "__main__":
    sys.exit(main())
