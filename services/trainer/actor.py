"""The trainer worker: runs trial attempts for the controller, as a Ray actor.

`TrainerWorker` is a plain class (tests can call it in-process); `TrainerActor` is the same
class as a Ray actor, created by the controller's trainer pool with the spec's resources
(`actor_options`). What it runs is a `batchlab.v1.TrialAssignment` (the controller -> trainer
contract in protos/batchlab/v1/controller.proto), passed serialized; it returns
`RunResult.to_dict()` as JSON data, through Ray's own actor calls.

One attempt (`run`):
  1. build the RunConfig from the assignment (as batchlab.runner.local does);
  2. restore the trial's latest checkpoint from durable storage into a local folder private
     to this (trial, attempt), so a retried attempt resumes where the last one stopped;
  3. with a sharding service: prepare the dataset, ask it for every host's shard and the
     position this attempt starts from (the one recorded with the restored checkpoint), and
     read the training examples from it (GetShard); each host records its position with
     every checkpoint. A sharding failure fails the attempt as infrastructure (retried);
  4. train with batchlab.train.train_and_evaluate. Evaluation in the trainer's process
     (EVALUATION_IN_PROCESS): every point is reported to the controller (ReportProgress,
     batched, keyed by (trial, attempt, step)) and every checkpoint uploaded with the target
     metric. Evaluation by the service (EVALUATION_SERVICE): the checkpoint of each point is
     uploaded held for evaluation, then the point (training metrics only) is reported as
     awaiting evaluation; the controller has the evaluation service evaluate it while this
     trainer trains on. An upload that fails then fails the attempt (infrastructure);
  5. stop early (CANCELLED, after a checkpoint) when the controller's ReportProgress answer
     says cancel, or when the controller calls `stop`.

A multi-host trial (`Resources.num_hosts` > 1) runs on several actors at once, one JAX
process each (`run_distributed`): jax.distributed connects them (gloo collectives on CPU),
DataParallel spans every process's devices, and each process feeds its shard of each batch.
It checkpoints and resumes like a single-host one: process 0 saves and uploads the
(replicated) state, every host records its data position, and on resume every process
restores the same checkpoint from the store. On a multi-host TPU slice a process's id is its
host's TPU_WORKER_ID (`tpu_host` tells the controller; `run_distributed` refuses another).

Failures a trainer raises itself carry ``infrastructure = True`` when they are the
infrastructure's (`TrainerInfrastructureError`, batchlab.rpc.sharding_client.ShardingError),
so the controller tells them from runs that failed by themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from google.protobuf import json_format

from batchlab.proto.v1 import controller_pb2
from batchlab.rpc.client import free_ports
from batchlab.search.spec import resources_per_host
from services.trainer.checkpoint_sync import (
    CheckpointSync,
    DirectoryCheckpointSync,
    ServiceCheckpointSync,
)

if TYPE_CHECKING:
    import grpc

    from batchlab.proto.v1 import controller_pb2_grpc
    from batchlab.rpc.metrics import Metrics, MetricsServer
    from batchlab.rpc.sharding_client import ServiceShardIterator
    from batchlab.train import RunConfig
    from services.trainer.metrics_exporter import TextfileWriter

__all__ = [
    "ProgressReporter",
    "TrainerActor",
    "TrainerInfrastructureError",
    "TrainerWorker",
    "actor_options",
    "build_run_config",
    "parse_assignment",
    "state_digest",
    "tpu_worker_id",
    "trainer_settings",
]

log = logging.getLogger(__name__)

# Calls a busy actor must still answer while `run` holds one thread: stop, info.
MAX_CONCURRENCY = 4
# Tries of a checkpoint upload that evaluation needs before the attempt fails.
UPLOAD_ATTEMPTS = 3


class TrainerInfrastructureError(RuntimeError):
    """A service the attempt needs failed (not the run itself): retried by the controller."""

    infrastructure = True
    #: True when this trainer cannot run the attempt at all (its JAX runs with another
    #: XLA:CPU thread count): the trainer pool retires it and the run goes to a fresh one.
    retire_trainer = False


def trainer_settings(mapping: Mapping[str, Any] | None) -> controller_pb2.TrainerSettings:
    """The settings a trainer is given, as batchlab.v1.TrainerSettings (their one declaration).

    Args:
      mapping: the message's JSON mapping (field names as in the proto), as the controller's
        trainer pool hands it over; None or {} for every default.

    Raises:
      ValueError: an unknown key or a value of the wrong kind, naming it.
    """
    settings = controller_pb2.TrainerSettings()
    try:
        json_format.ParseDict(dict(mapping or {}), settings)
    except json_format.ParseError as error:
        raise ValueError(f"settings: {error}") from None
    return settings


def actor_options(resources: Mapping[str, Any] | None) -> dict[str, Any]:
    """Ray actor options for ONE HOST of a run with these Resources.

    A run of `num_hosts` hosts has one actor per host, each asking for its share: gpus and
    tpus count the whole run and are divided by num_hosts (batchlab.search.spec
    .resources_per_host; experiment.proto says so); cpus and memory_gib are per host. TPUs are
    a custom resource ("TPU", chips), as KubeRay's TPU worker groups advertise google.com/tpu.

    Args:
      resources: the spec's Resources as a mapping (missing or 0 values: defaults; without
        num_hosts: one host, i.e. already a per-host shape).

    Raises:
      ValueError: gpus or tpus is not a multiple of num_hosts (naming the field).
    """
    resources = resources_per_host(resources)
    options: dict[str, Any] = {"num_cpus": float(resources.get("cpus") or 1.0)}
    if resources.get("gpus"):
        options["num_gpus"] = int(resources["gpus"])
    if resources.get("tpus"):
        options["resources"] = {"TPU": int(resources["tpus"])}
    if resources.get("memory_gib"):
        options["memory"] = int(float(resources["memory_gib"]) * 2**30)
    return options


def tpu_worker_id(environ: Mapping[str, str] | None = None) -> int | None:
    """This host's index in its TPU slice, TPU_WORKER_ID (GKE's Ray TPU webhook sets it on each
    pod of a slice, in the order of TPU_WORKER_HOSTNAMES); None when unset (CPU, GPU).

    libtpu numbers a multi-host slice's hosts so; JAX's process ids must follow it.

    Raises:
      ValueError: TPU_WORKER_ID is not a non-negative integer (naming it).
    """
    value = (os.environ if environ is None else environ).get("TPU_WORKER_ID", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"TPU_WORKER_ID: must be a non-negative integer, got {value!r}")
    return int(value)


def parse_assignment(assignment: bytes | controller_pb2.TrialAssignment
                     ) -> controller_pb2.TrialAssignment:
    """A TrialAssignment from its serialized bytes (what the controller sends), checked.

    Raises:
      ValueError: the bytes are no TrialAssignment, or a required field is missing (named).
    """
    if isinstance(assignment, controller_pb2.TrialAssignment):
        message = assignment
    elif isinstance(assignment, bytes | bytearray):
        message = controller_pb2.TrialAssignment.FromString(bytes(assignment))
    else:
        raise ValueError(f"assignment: must be a serialized batchlab.v1.TrialAssignment, "
                         f"got {type(assignment).__name__}")
    for field in ("trial", "workload", "hyperparameters_json"):
        if not getattr(message, field):
            raise ValueError(f"assignment.{field}: required")
    for field in ("attempt", "batch_size", "step_budget", "eval_every_steps"):
        if getattr(message, field) < 1:
            raise ValueError(f"assignment.{field}: must be >= 1, got {getattr(message, field)}")
    if not message.target.metric or not message.target.HasField("value"):
        raise ValueError("assignment.target: needs a metric and a value")
    return message


def hyperparameters_of(assignment: controller_pb2.TrialAssignment) -> dict[str, Any]:
    """The trial's {"optimizer": config, "workload": overrides}."""
    data = json.loads(assignment.hyperparameters_json)
    if not isinstance(data, dict) or "optimizer" not in data:
        raise ValueError("assignment.hyperparameters_json: must be a JSON object with "
                         "\"optimizer\"")
    return data


def build_run_config(assignment: controller_pb2.TrialAssignment, *, data_dir: str | None,
                     checkpoint_dir: str | None) -> RunConfig:
    """The RunConfig of an assignment, built as batchlab.runner.local builds it.

    Args:
      assignment: the trial attempt.
      data_dir: the tfds folder (None: the default).
      checkpoint_dir: where the run saves and resumes (None: no checkpoints).
    """
    from batchlab.targets import TargetReading
    from batchlab.train import Goal, RunConfig, Target

    target = assignment.target
    return RunConfig.for_trial(
        assignment.workload,
        hyperparameters_of(assignment),
        batch_size=assignment.batch_size,
        step_budget=assignment.step_budget,
        eval_every_steps=int(assignment.eval_every_steps),
        seed=int(assignment.seed),
        target=Target(metric=target.metric, value=float(target.value),
                      goal=Goal(target.goal or Goal.MAXIMIZE),
                      reading=TargetReading(target.reading or TargetReading.FIRST_EVALUATION)),
        stop_at_target=(assignment.stop_at_target
                        and assignment.evaluation != controller_pb2.EVALUATION_SERVICE),
        data_dir=data_dir,
        checkpoint_dir=checkpoint_dir,
    )


class ProgressReporter:
    """Sends a run attempt's evaluation points to the controller in batches.

    Points wait in a buffer and go out in one ReportProgress call at most every
    `interval_s` (and always on `flush`). A failed call keeps them for the next one (the
    controller ignores a (trial, attempt, step) it has seen, so resending is safe); a call
    the controller refuses for good (bad request, unknown trial) drops them.

    Args:
      stub: an ExperimentServiceStub, or None to report nothing.
      trial: the trial resource name.
      attempt: the attempt number.
      interval_s: the least time between two calls.
      timeout_s: deadline of one call.
      clock: monotonic seconds.
    """

    MAX_BUFFERED = 10_000

    def __init__(self, stub: Any, trial: str, attempt: int, *, interval_s: float = 2.0,
                 timeout_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._stub = stub
        self.trial = trial
        self.attempt = attempt
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._buffer: list[Any] = []
        self._last_sent = -math.inf
        self.cancelled = False
        # Points come from the training thread and from the run's checkpoint thread.
        self._lock = threading.RLock()

    def add(self, point: Mapping[str, float], *, awaiting_evaluation: bool = False) -> None:
        """Queue one evaluation point ({"step": s, metric: value, ...}); send if due.

        Args:
          point: the point.
          awaiting_evaluation: its checkpoint waits for the evaluation service (the point
            holds training metrics only).
        """
        if self._stub is None:
            return
        values = {k: float(v) for k, v in point.items() if k != "step"}
        with self._lock:
            self._buffer.append(controller_pb2.MetricPoint(
                trial=self.trial, attempt=self.attempt, step=int(point["step"]),
                values=values, awaiting_evaluation=awaiting_evaluation))
            if len(self._buffer) > self.MAX_BUFFERED:
                del self._buffer[: len(self._buffer) - self.MAX_BUFFERED]
            if self._clock() - self._last_sent >= self.interval_s:
                self.flush()

    def flush(self) -> bool:
        """Send what is buffered; returns whether the controller asked to cancel."""
        with self._lock:
            return self._flush()

    def _flush(self) -> bool:
        if self._stub is None or not self._buffer:
            return self.cancelled
        import grpc

        self._last_sent = self._clock()
        try:
            response = self._stub.ReportProgress(
                controller_pb2.ReportProgressRequest(points=self._buffer),
                timeout=self.timeout_s)
        except grpc.RpcError as error:
            code = error.code() if callable(getattr(error, "code", None)) else None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED):
                log.warning("progress of %s not delivered (%s); kept for the next report",
                            self.trial, code)
            else:
                log.error("controller refused progress of %s a%d (%s: %s); dropped",
                          self.trial, self.attempt, code, error.details())
                self._buffer.clear()
            return self.cancelled
        self._buffer.clear()
        if response.cancel and not self.cancelled:
            log.info("controller cancelled %s", self.trial)
        self.cancelled = self.cancelled or response.cancel
        return self.cancelled


_UNPINNED = 0  # TrainerWorker._threads when JAX was started before the trainer


def _safe_name(trial: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", trial)


def state_digest(state: Any) -> str | None:
    """sha256 of a TrainState's arrays (this process's replica): equal digests mean
    bit-identical parameters, batch statistics, optimizer state, RNG and step."""
    if state is None:
        return None
    import hashlib

    import jax
    import numpy as np

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        array = np.asarray(leaf.addressable_data(0) if hasattr(leaf, "addressable_data")
                           else leaf)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class TrainerWorker:
    """Runs trial attempts; one at a time, while answering `stop` and `info` calls.

    Args:
      settings: a batchlab.v1.TrainerSettings JSON mapping (see `trainer_settings`).
    """

    def __init__(self, settings: Mapping[str, Any] | None = None):
        self.settings = trainer_settings(settings)
        self.name = self.settings.name or "trainer"
        self._metrics_port = (self.settings.metrics_port if self.settings.HasField("metrics_port")
                              else None)
        self._metrics_host = self.settings.metrics_host or "127.0.0.1"
        self._report_interval_s = (self.settings.report_interval_s
                                   if self.settings.HasField("report_interval_s") else 2.0)
        self._stopped: set[tuple[str, int]] = set()
        self._prepared: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._busy = threading.Lock()
        self._distributed = False
        self._metrics: Metrics | None = None
        self._metrics_server: MetricsServer | None = None
        self._metrics_writer: TextfileWriter | None = None
        # A temporary scratch folder is this worker's own: shutdown() removes it. It is made on
        # a run's first use (see _work_dir): a trainer that never runs leaves none, however it
        # ends (the pool kills spares it warmed, or whose resources no longer fit, unannounced).
        self._own_work_dir = not self.settings.work_dir
        self._work_dir_path: Path | None = (Path(self.settings.work_dir) if self.settings.work_dir
                                            else None)
        # XLA:CPU threads, fixed when JAX starts here: on the first run, never earlier, because
        # a multi-host run must call jax.distributed.initialize before JAX's backend starts.
        self._threads: int | None = None
        # Importing JAX does not start its backend. Import it here, once, so that warm_up and a
        # first run, which the actor may serve on two threads at once, never import it
        # concurrently (a half-initialised jax module fails with AttributeErrors). The datasets'
        # builders likewise: tensorflow_datasets imports inside etils' lazy_imports(), which
        # swaps the process-wide __import__ while it runs, so an import on another of the
        # actor's threads meanwhile gets a lazy stand-in (batchlab.rpc.server.run_service's
        # preload says what that did to the evaluator).
        import jax  # noqa: F401

        import batchlab.data.builders  # noqa: F401
        self._start_metrics()
        log.info("trainer %s ready (pid %d)", self.name, os.getpid())

    # -- setup ------------------------------------------------------------------------------
    @property
    def _work_dir(self) -> Path:
        """The scratch folder: the settings' work_dir, else a temporary folder made now.
        Takes ``self._lock`` (not reentrant): never read it while holding that lock."""
        with self._lock:
            if self._work_dir_path is None:
                self._work_dir_path = Path(tempfile.mkdtemp(prefix="batchlab-trainer-"))
            return self._work_dir_path

    def _start_jax(self, threads: int) -> None:
        """Start JAX here with `threads` XLA:CPU threads, and its compilation cache for that
        count; a trainer whose JAX already runs with another count refuses (results differ
        with it, batchlab.runner.resources), and the pool replaces it.

        Raises:
          TrainerInfrastructureError: JAX runs here with another count (``retire_trainer``).
        """
        if self._threads in (threads, _UNPINNED):
            return
        if self._threads is not None:
            error = TrainerInfrastructureError(
                f"trainer {self.name}: JAX runs here with {self._threads} XLA:CPU "
                f"thread(s) and this run needs {threads} (results depend on the count); the "
                "run goes to a fresh trainer")
            error.retire_trainer = True
            raise error
        from jax._src import xla_bridge

        from batchlab.runner.resources import start_jax_with_threads
        from batchlab.train.compilation_cache import enable_compilation_cache

        if xla_bridge.backends_are_initialized():
            # Started before this trainer (a TrainerWorker inside another program, e.g. a
            # test): its count is whatever that start made it, and cannot change now.
            log.warning("%s: JAX was started in this process before the trainer; its XLA:CPU "
                        "thread count is not pinned to the run's %d", self.name,
                        threads)
            self._threads = _UNPINNED
            return
        start_jax_with_threads(threads)
        self._threads = threads
        try:
            enable_compilation_cache(self.settings.jax_cache_dir or None, cpu_threads=threads)
        except OSError as error:  # e.g. a read-only home folder: compile every time
            log.warning("no JAX compilation cache: %s", error)

    def _start_jax_for(self, assignment: controller_pb2.TrialAssignment) -> None:
        """Start JAX with the XLA:CPU threads local run gives this run (runner.resources):
        1 for a small model on CPU, else the run's Resources.cpus (at most this process's
        CPUs)."""
        from batchlab.runner.resources import (
            accelerator_backend,
            available_cpus,
            model_parameters,
            run_threads,
        )

        cpus = max(1, int(resources_per_host(
            {"cpus": assignment.resources.cpus}).get("cpus") or 1))
        if cpus > available_cpus():
            log.warning("%s: Resources.cpus %d but this process may use %d CPUs; using %d "
                        "XLA:CPU threads", assignment.trial, cpus, available_cpus(),
                        available_cpus())
            cpus = available_cpus()
        threads = 1 if cpus == 1 else run_threads(model_parameters(assignment.workload), cpus,
                                                  accelerator_backend())
        self._start_jax(threads)

    def _prepare_data(self, client: Any, workload: Any) -> Any:
        """The workload's dataset from the sharding service, built there once; its info.

        Raises:
          ShardingError: the service could not prepare it (the attempt fails, retried).
        """
        key = (workload.dataset, workload.dataset_config or "")
        info = self._prepared.get(key)
        if info is None:
            info = client.prepare(*key)
            self._prepared[key] = info
            log.info("%s/%s prepared (%s)", key[0], key[1], dict(info.split_sizes))
        return info

    def _start_metrics(self) -> None:
        if self._metrics_port is None:
            return
        try:
            from batchlab.rpc.metrics import make_metrics, start_metrics_server
        except ImportError:
            log.warning("batchlab.rpc.metrics is unavailable: no trainer metrics")
            return
        self._metrics = make_metrics(roles=["trainer"])
        shared_dir = os.environ.get("BATCHLAB_TRAINER_METRICS_DIR", "").strip()
        if shared_dir:
            # In a Ray worker pod: the pod's metrics sidecar serves every actor's registry on
            # the pod's one declared port (services/trainer/metrics_exporter.py).
            from services.trainer.metrics_exporter import TextfileWriter

            self._metrics_writer = TextfileWriter(self._metrics.registry, shared_dir,
                                                  name=f"{self.name}-{os.getpid()}")
            log.info("trainer %s metrics in %s", self.name, self._metrics_writer.path)
            return
        try:
            self._metrics_server = start_metrics_server(self._metrics_port,
                                                        self._metrics.registry,
                                                        addr=self._metrics_host)
        except OSError as error:
            # Several trainers on one node: the first gets the port, the others any free one.
            log.warning("metrics port %d busy (%s); using a free port",
                        self._metrics_port, error)
            self._metrics_server = start_metrics_server(0, self._metrics.registry,
                                                        addr=self._metrics_host)
        log.info("trainer %s metrics on port %d", self.name, self._metrics_server.port)

    # -- small calls ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Who this trainer is: name, host, pid, metrics port, whether a run is in progress."""
        return {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "metrics_port": None if self._metrics_server is None else self._metrics_server.port,
            "busy": self._busy.locked(),
        }

    def warm_up(self) -> list[str]:
        """Import the training stack and start JAX's backend and compiler now.

        The controller calls this when it starts its trainers, so that the first run does not
        pay for the imports, the backend start and the compiler's first use.

        Returns:
          The registered workload names.
        """
        import jax
        import jax.numpy as jnp

        if self._threads is not None:
            jax.jit(lambda x: x + 1)(jnp.zeros(())).block_until_ready()
        # Otherwise the first run starts JAX, with its model's thread count: imports only.
        return self.workloads()

    def workloads(self) -> list[str]:
        """The registered workload names this trainer can run."""
        from batchlab.train import workload_names

        return list(workload_names())

    def stop(self, trial: str, attempt: int) -> None:
        """Ask a run attempt (running now or about to start here) to stop (CANCELLED)."""
        with self._lock:
            self._stopped.add((trial, int(attempt)))
        log.info("%s: stop requested for %s attempt %d", self.name, trial, attempt)

    def coordinator_address(self) -> str:
        """A free host:port on this trainer's node for jax.distributed's coordinator."""
        try:
            host = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - outside Ray: loopback
            host = "127.0.0.1"
        return f"{host}:{free_ports()[0]}"

    def tpu_host(self, slice_name: bool = False) -> dict[str, Any]:
        """Where this trainer is in a TPU slice: {"worker_id": TPU_WORKER_ID or None,
        "slice": the slice's name or None}.

        Args:
          slice_name: also read the slice's name, as Ray names the slice's resource
            (ray.util.tpu.get_current_pod_name: TPU_NAME, else the TPU VM's metadata server,
            which only a TPU host should ask).
        """
        name = None
        if slice_name:
            from ray.util.tpu import get_current_pod_name

            name = get_current_pod_name()
        return {"worker_id": tpu_worker_id(), "slice": name}

    # -- runs -------------------------------------------------------------------------------
    def run(self, assignment: bytes) -> dict[str, Any]:
        """Run one attempt of a trial; returns RunResult.to_dict() plus "worker".

        Args:
          assignment: a serialized batchlab.v1.TrialAssignment.
        """
        assignment = parse_assignment(assignment)
        self._start_jax_for(assignment)
        return self._run(assignment, process_id=0, num_processes=1)

    def run_distributed(self, assignment: bytes, process_id: int, num_processes: int,
                        coordinator: str) -> dict[str, Any]:
        """Run one attempt as process `process_id` of a multi-host trial.

        Every process of the trial calls this with the same assignment and coordinator (the
        address process 0's trainer gave from `coordinator_address`). Process 0 reports
        progress and uploads checkpoints; all return the same RunResult dict. A JAX process
        joins one distributed system in its life, so the controller uses fresh actors for
        each multi-host attempt. On a TPU slice host (TPU_WORKER_ID set), `process_id` must
        be that id.

        Args:
          assignment: a serialized batchlab.v1.TrialAssignment.
          process_id: this process's index, 0..num_processes-1.
          num_processes: how many JAX processes the trial spans.
          coordinator: host:port of jax.distributed's coordinator.

        Raises:
          ValueError: process_id is not this TPU host's TPU_WORKER_ID.
        """
        import jax

        assignment = parse_assignment(assignment)
        worker_id = tpu_worker_id()
        if worker_id is not None and worker_id != int(process_id):
            raise ValueError(f"process_id: {process_id} is not this TPU host's TPU_WORKER_ID "
                             f"{worker_id}; a slice's JAX processes follow its host numbering")
        if self._distributed:
            raise RuntimeError("this trainer already joined a distributed run; use a new one")
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(f"trainer {self.name} is busy")
        try:
            # On CPU the collectives need gloo (the default has none across processes).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(coordinator_address=coordinator,
                                       num_processes=int(num_processes),
                                       process_id=int(process_id))
            self._start_jax_for(assignment)
            self._distributed = True
            log.info("%s joined %s as process %d of %d (%d global devices)", self.name,
                     coordinator, process_id, num_processes, jax.device_count())
        finally:
            self._busy.release()
        return self._run(assignment, process_id=int(process_id),
                         num_processes=int(num_processes))

    def _sync(self) -> CheckpointSync | None:
        if self.settings.checkpoints_address:
            return ServiceCheckpointSync(self.settings.checkpoints_address,
                                         token=self.settings.auth_token or None)
        if self.settings.checkpoint_root:
            return DirectoryCheckpointSync(self.settings.checkpoint_root)
        return None

    def _stub(self) -> tuple[grpc.Channel | None,
                             controller_pb2_grpc.ExperimentServiceStub | None]:
        if not self.settings.controller_address:
            return None, None
        from batchlab.proto.v1 import controller_pb2_grpc
        from batchlab.rpc.client import channel

        chan = channel(self.settings.controller_address, token=self.settings.auth_token or None)
        return chan, controller_pb2_grpc.ExperimentServiceStub(chan)

    def _run(self, assignment: controller_pb2.TrialAssignment, *, process_id: int,
             num_processes: int) -> dict[str, Any]:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(f"trainer {self.name} is busy")
        try:
            return self._run_locked(assignment, process_id=process_id,
                                    num_processes=num_processes)
        finally:
            self._busy.release()

    def _restore(self, sync: CheckpointSync | None, trial: str, local_dir: Path,
                 num_processes: int) -> int | None:
        """Put the trial's latest stored checkpoint in local_dir; its step (None: none)."""
        restored = None
        if sync is not None:
            try:
                restored = sync.restore(trial, local_dir)
            except Exception:  # noqa: BLE001 - start over rather than fail the attempt
                log.exception("restoring %s failed; starting from step 0", trial)
                shutil.rmtree(local_dir, ignore_errors=True)
        if num_processes > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            # Every process must resume from the same step, or their collectives never meet.
            steps = multihost_utils.process_allgather(
                np.int64(-1 if restored is None else restored))
            if len(set(np.asarray(steps).ravel().tolist())) != 1:
                raise TrainerInfrastructureError(f"the hosts of {trial} restored different "
                                                 f"checkpoints: {np.asarray(steps).tolist()}")
        return restored

    def _upload_for_evaluation(self, sync: CheckpointSync, trial: str, step: int,
                               step_dir: Path, maximize: bool) -> None:
        """Upload an evaluation point's checkpoint, held until evaluated; retried, then fatal."""
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                sync.upload(trial, step, step_dir, maximize=maximize, hold_for_evaluation=True)
                return
            except Exception as error:  # noqa: BLE001 - retried, then the attempt fails
                if attempt == UPLOAD_ATTEMPTS:
                    raise TrainerInfrastructureError(
                        f"upload of {trial} step {step} for evaluation failed "
                        f"{UPLOAD_ATTEMPTS} times: {type(error).__name__}: {error}") from error
                log.warning("upload of %s step %d failed (%s); trying again", trial, step, error)
                time.sleep(attempt)

    def _run_locked(self, assignment: controller_pb2.TrialAssignment, *, process_id: int,
                    num_processes: int) -> dict[str, Any]:
        from batchlab.train import get_workload, train_and_evaluate

        trial, attempt = assignment.trial, int(assignment.attempt)
        key = (trial, attempt)
        target = assignment.target
        maximize = target.goal != 2  # batchlab.v1.Goal.MINIMIZE
        by_service = assignment.evaluation == controller_pb2.EVALUATION_SERVICE
        multi_host = num_processes > 1
        sync = self._sync()
        if by_service and not isinstance(sync, ServiceCheckpointSync):
            raise TrainerInfrastructureError(
                "evaluation by the evaluation service needs the checkpoint service (the "
                "controller's BATCHLAB_CHECKPOINTS_ADDR): it reads each point's checkpoint there")
        local_dir = self._work_dir / _safe_name(trial) / f"attempt-{attempt}"
        if local_dir.exists():
            shutil.rmtree(local_dir)
        channel_, stub = self._stub() if process_id == 0 else (None, None)
        reporter = ProgressReporter(stub, trial, attempt,
                                    interval_s=self._report_interval_s)
        series = None
        if self._metrics is not None and self._metrics.trainer is not None and process_id == 0:
            series = self._metrics.trainer.trial(assignment.experiment_id, assignment.study_id,
                                                 f"{assignment.trial_index}-r"
                                                 f"{assignment.replica}")
        # Evaluation points by step, until their checkpoint is handed on (on_checkpoint runs in
        # the loop's checkpoint thread while training goes on to the next point).
        points: dict[int, dict[str, float]] = {}
        last_eval = {"step": 0, "time": time.perf_counter()}
        sharding = None
        streams: list[Any] = []
        example_log = self._example_log(trial, attempt, process_id)

        def on_eval(point: dict[str, float]) -> None:
            points[int(point["step"])] = dict(point)
            if not by_service:
                reporter.add(point)
            if series is not None:
                try:
                    self._observe(series, point, last_eval, int(assignment.batch_size))
                except Exception:  # noqa: BLE001 - metrics must never fail a run
                    log.exception("trainer metrics update failed")

        def on_data_position(step: int, state: Mapping[str, Any]) -> None:
            if sharding is not None and streams:
                sharding.record(trial, step, [streams[-1].host_at(state)])

        def on_checkpoint(step: int, directory: str) -> None:
            if multi_host:
                from jax.experimental import multihost_utils

                # Every host recorded its position before process 0 stores the checkpoint:
                # a stored checkpoint always has the positions to resume from.
                multihost_utils.sync_global_devices(f"{trial}/{attempt}/checkpoint-{step}")
            point = points.pop(step, None)
            if sync is None or process_id != 0:
                return
            step_dir = Path(directory) / str(step)
            if by_service and point is not None:
                # Reported once its checkpoint is up, for the controller to have it evaluated.
                self._upload_for_evaluation(sync, trial, step, step_dir, maximize)
                reporter.add(point, awaiting_evaluation=True)
                return
            metric = None
            if not by_service and point is not None:
                metric = point.get(target.metric)
            if metric is not None and not math.isfinite(metric):
                metric = None
            try:
                sync.upload(trial, step, step_dir, metric=metric, maximize=maximize)
            except Exception:  # noqa: BLE001 - training goes on; a retry resumes from older
                log.exception("upload of %s step %d failed", trial, step)

        def should_stop() -> bool:
            if multi_host:
                # Processes that stopped at different steps would wait forever in each
                # other's collectives: a multi-host run is stopped by retiring its actors.
                return False
            with self._lock:
                return key in self._stopped or reporter.cancelled

        sharding_channel = None
        try:
            restored = self._restore(sync, trial, local_dir, num_processes)
            workload = get_workload(assignment.workload)
            index_stream = None
            if self.settings.sharding_address:
                from batchlab.rpc.client import channel
                from batchlab.rpc.sharding_client import ShardingClient

                sharding_channel = channel(self.settings.sharding_address,
                                           token=self.settings.auth_token or None)
                sharding = ShardingClient(sharding_channel)
                info = self._prepare_data(sharding, workload)
                index_stream = self._index_stream(sharding, info, assignment, restored,
                                                  process_id, num_processes, streams)
            config = build_run_config(assignment, data_dir=self.settings.data_dir or None,
                                      checkpoint_dir=str(local_dir))
            log.info("%s: %s attempt %d starts (checkpoint step %s, evaluation %s)",
                     self.name, trial, attempt, restored,
                     "by the service" if by_service else "in process")
            result = train_and_evaluate(
                config, on_eval=on_eval, should_stop=should_stop, on_checkpoint=on_checkpoint,
                return_state=True, evaluate=not by_service, index_stream=index_stream,
                on_data_position=on_data_position,
                on_examples=None if example_log is None else example_log.write)
            reporter.flush()
            out = result.to_dict()
            out["worker"] = self.name
            out["state_sha256"] = state_digest(result.final_state)
            log.info("%s: %s attempt %d ended %s at step %d", self.name, trial,
                     attempt, out["outcome"], out["steps_completed"])
            return out
        finally:
            with self._lock:
                self._stopped.discard(key)
            if series is not None:
                with contextlib.suppress(Exception):
                    series.remove()
            for closeable in (sync, example_log):
                if closeable is not None:
                    closeable.close()
            for chan in (channel_, sharding_channel):
                if chan is not None:
                    chan.close()
            shutil.rmtree(local_dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # the trial's folder, once no attempt uses it
                local_dir.parent.rmdir()

    @staticmethod
    def _index_stream(sharding: Any, info: Any, assignment: controller_pb2.TrialAssignment,
                      restored: int | None, process_id: int, num_processes: int,
                      streams: list[Any]
                      ) -> Callable[[int, Mapping[str, Any] | None], ServiceShardIterator]:
        """``fn(num_examples, saved) -> stream``: this host's examples, from the service."""
        from batchlab.rpc.sharding_client import ServiceShardIterator, ShardingError

        def index_stream(num_examples: int,
                         saved: Mapping[str, Any] | None) -> ServiceShardIterator:
            split_size = int(info.split_sizes.get("train", 0))
            shards = sharding.assign(
                assignment.trial, info.dataset, info.config, "train",
                num_hosts=num_processes, seed=int(assignment.seed), shuffle=True,
                resume_step=restored,
                num_examples=None if num_examples == split_size else num_examples)
            stream = ServiceShardIterator(sharding, shards.hosts[process_id], num_examples)
            mine = stream.get_state()
            # The checkpoint's own record of process 0's position must agree with the
            # service's: a disagreement means one of them is not this checkpoint's.
            if saved is not None and process_id == 0 and (
                    (saved.get("epoch"), saved.get("position"))
                    != (mine["epoch"], mine["position"])):
                raise ShardingError(
                    f"{assignment.trial}: the sharding service says epoch {mine['epoch']} "
                    f"position {mine['position']} at step {restored}, the checkpoint says "
                    f"epoch {saved.get('epoch')} position {saved.get('position')}")
            streams.append(stream)
            return stream

        return index_stream

    def _example_log(self, trial: str, attempt: int, process_id: int) -> _ExampleLog | None:
        if not self.settings.example_log_dir:
            return None
        path = (Path(self.settings.example_log_dir) / _safe_name(trial)
                / f"a{attempt}-p{process_id}.jsonl")
        return _ExampleLog(path)

    def _observe(self, series: Any, point: Mapping[str, float], last: dict[str, float],
                 batch_size: int) -> None:
        """Trainer metrics at an evaluation: progress, curve and throughput since the last."""
        # Called only with a series, which exists only when the trainer metrics do.
        assert self._metrics is not None and self._metrics.trainer is not None
        trainer = self._metrics.trainer
        step = int(point["step"])
        now = time.perf_counter()
        steps = max(step - int(last["step"]), 0)
        if steps:
            # The loop reports per evaluation, not per step: the mean step time since the
            # last evaluation (evaluation included; the first includes compilation).
            trainer.observe_step((now - last["time"]) / steps, batch_size)
            trainer.steps.inc(steps - 1)
            trainer.examples.inc((steps - 1) * batch_size)
        last["step"], last["time"] = step, now
        loss = point.get("train/batch_loss", math.nan)
        series.report_train(step, loss, point.get("learning_rate", math.nan))
        series.report_eval({k: v for k, v in point.items()
                            if k.startswith(("validation/", "train/")) and k != "train/batch_loss"})

    def shutdown(self) -> None:
        """Stop the metrics endpoint and remove the temporary scratch folder. A folder a run
        still uses is left alone. Closing the controller's pool calls this before killing the
        actor; a trainer retired otherwise (its resources no longer fit the next run, its
        multi-host lease ended, it failed) is killed without it, leaving its scratch folder if
        it ever ran (with the checkpoints of a run it was killed in)."""
        if self._own_work_dir and self._busy.acquire(blocking=False):
            try:
                # Taken under the lock while no run can start (one asked for meanwhile finds
                # the trainer busy): no run makes a folder between the check and the removal.
                with self._lock:
                    path, self._work_dir_path = self._work_dir_path, None
                if path is not None:
                    shutil.rmtree(path, ignore_errors=True)
            finally:
                self._busy.release()
        if self._metrics_writer is not None:
            with contextlib.suppress(Exception):
                self._metrics_writer.close()
            self._metrics_writer = None
        if self._metrics_server is not None:
            with contextlib.suppress(Exception):
                self._metrics_server.close()
            self._metrics_server = None


class _ExampleLog:
    """Appends (step, example indices) of every step trained to a JSON-lines file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, step: int, indices: Any) -> None:
        self._file.write(json.dumps({"step": int(step),
                                     "examples": [int(i) for i in indices]}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# The Ray actor: a threaded actor, so `stop` and `info` are answered while `run` trains.
# ray.remote's typed overloads list only the task options, not the actor ones
# (max_concurrency); Ray accepts them there.
TrainerActor = ray.remote(max_concurrency=MAX_CONCURRENCY)(TrainerWorker)  # type: ignore[call-overload]
