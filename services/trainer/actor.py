"""The trainer worker: runs trial attempts for the controller, as a Ray actor.

`TrainerWorker` is a plain class (tests can call it in-process); `TrainerActor` is the same
class as a Ray actor, created by the controller's trainer pool with the spec's resources
(`actor_options`). Everything that crosses the process boundary is plain JSON data: a
request dict in, `RunResult.to_dict()` out, through Ray's own actor calls.

One attempt (`run`):
  1. build the RunConfig from the request (as batchlab.runner.local does);
  2. restore the trial's latest checkpoint from durable storage into a local folder private
     to this (trial, attempt), so a retried attempt resumes where the last one stopped;
  3. train with batchlab.train.train_and_evaluate; every evaluation point is reported to the
     controller (ExperimentService.ReportProgress, batched, keyed by (trial, attempt, step));
     every checkpoint is uploaded (with the target metric, so the store keeps the best);
  4. stop early (CANCELLED, after a checkpoint) when the controller's ReportProgress answer
     says cancel, or when the controller calls `stop`.

A multi-host trial (`Resources.num_hosts` > 1) runs on several actors at once, one JAX
process each (`run_distributed`): jax.distributed connects them (gloo collectives on CPU),
DataParallel spans every process's devices, and each process feeds its shard of each batch.

Request keys (all JSON): trial (resource name), experiment_id, study_id, trial_index,
replica, attempt, seed, kind, workload, hyperparameters ({"optimizer": config, "workload":
overrides}), batch_size, step_budget, eval_every_steps, target ({"metric", "value", "goal"}).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from typing import Any

import ray

from batchlab.rpc.client import free_ports
from services.trainer.checkpoint_sync import (
    CheckpointSync,
    DirectoryCheckpointSync,
    ServiceCheckpointSync,
)

__all__ = [
    "ProgressReporter",
    "TrainerActor",
    "TrainerSettings",
    "TrainerWorker",
    "actor_options",
    "build_run_config",
    "state_digest",
]

log = logging.getLogger(__name__)

# Calls a busy actor must still answer while `run` holds one thread: stop, info.
MAX_CONCURRENCY = 4


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    """How a trainer reaches the other services and where it keeps files (JSON data).

    Args:
      name: the trainer's name, for logs and the attempt's `worker` field.
      controller_address: host:port of the ExperimentService (progress reports); "" = none.
      checkpoints_address: host:port of the CheckpointService; "" = use checkpoint_root.
      sharding_address: host:port of the ShardingService, asked to prepare a run's dataset
        before it trains (it builds each offline dataset once); "" = the data must exist.
      checkpoint_root: a folder shared by every trainer used when there is no checkpoint
        service; "" = no durable checkpoints (a retry starts over).
      auth_token: the bearer token of the services, "" for none.
      data_dir: the tfds data folder; "" = batchlab.data.default_data_dir().
      work_dir: local scratch folder for run checkpoints; "" = a temporary folder.
      jax_cache_dir: JAX's persistent compilation cache; "" = batchlab's default folder
        (under BATCHLAB_DATA_DIR; BATCHLAB_JAX_CACHE=0 turns it off).
      report_interval_s: send progress at most this often (the last points always go).
      metrics_port: serve Prometheus metrics on this port (0 = any free port); None = off.
    """

    name: str = "trainer"
    controller_address: str = ""
    checkpoints_address: str = ""
    sharding_address: str = ""
    checkpoint_root: str = ""
    auth_token: str = ""
    data_dir: str = ""
    work_dir: str = ""
    jax_cache_dir: str = ""
    report_interval_s: float = 2.0
    metrics_port: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TrainerSettings:
        """Settings from a plain mapping; unknown keys are errors naming the key."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"settings: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON data."""
        return dataclasses.asdict(self)


def actor_options(resources: Mapping[str, Any] | None) -> dict[str, Any]:
    """Ray actor options for one run's Resources (cpus, gpus, tpus, memory_gib).

    TPUs are a custom resource ("TPU"), as KubeRay's TPU worker groups advertise them.

    Args:
      resources: the spec's Resources as a mapping (missing or 0 values: defaults).
    """
    resources = dict(resources or {})
    options: dict[str, Any] = {"num_cpus": float(resources.get("cpus") or 1.0)}
    if resources.get("gpus"):
        options["num_gpus"] = int(resources["gpus"])
    if resources.get("tpus"):
        options["resources"] = {"TPU": int(resources["tpus"])}
    if resources.get("memory_gib"):
        options["memory"] = int(float(resources["memory_gib"]) * 2**30)
    return options


def build_run_config(request: Mapping[str, Any], *, data_dir: str | None,
                     checkpoint_dir: str | None):
    """The RunConfig of a request, built as batchlab.runner.local builds it.

    Args:
      request: the attempt request (see the module docstring).
      data_dir: the tfds folder (None: the default).
      checkpoint_dir: where the run saves and resumes (None: no checkpoints).
    """
    from batchlab.train import Goal, RunConfig, Target

    target = request["target"]
    goal = target["goal"]
    return RunConfig.for_trial(
        request["workload"],
        request["hyperparameters"],
        batch_size=request["batch_size"],
        step_budget=request["step_budget"],
        eval_every_steps=int(request["eval_every_steps"]),
        seed=int(request["seed"]),
        target=Target(metric=target["metric"], value=float(target["value"]),
                      goal=Goal[goal] if isinstance(goal, str) else Goal(goal)),
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

    def add(self, point: Mapping[str, float]) -> None:
        """Queue one evaluation point ({"step": s, metric: value, ...}); send if due."""
        if self._stub is None:
            return
        from batchlab.proto.v1 import controller_pb2

        values = {k: float(v) for k, v in point.items() if k != "step"}
        self._buffer.append(controller_pb2.MetricPoint(
            trial=self.trial, attempt=self.attempt, step=int(point["step"]), values=values))
        if len(self._buffer) > self.MAX_BUFFERED:
            del self._buffer[: len(self._buffer) - self.MAX_BUFFERED]
        if self._clock() - self._last_sent >= self.interval_s:
            self.flush()

    def flush(self) -> bool:
        """Send what is buffered; returns whether the controller asked to cancel."""
        if self._stub is None or not self._buffer:
            return self.cancelled
        import grpc

        from batchlab.proto.v1 import controller_pb2

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
      settings: TrainerSettings as a mapping.
    """

    def __init__(self, settings: Mapping[str, Any] | None = None):
        self.settings = TrainerSettings.from_dict(settings)
        self._stopped: set[tuple[str, int]] = set()
        self._prepared: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._busy = threading.Lock()
        self._distributed = False
        self._metrics = None
        self._metrics_server = None
        self._work_dir = Path(self.settings.work_dir or tempfile.mkdtemp(prefix="batchlab-trainer-"))
        self._configure_jax()
        self._start_metrics()
        log.info("trainer %s ready (pid %d)", self.settings.name, os.getpid())

    # -- setup ------------------------------------------------------------------------------
    def _configure_jax(self) -> None:
        from batchlab.train.compilation_cache import enable_compilation_cache

        try:
            enable_compilation_cache(self.settings.jax_cache_dir or None)
        except OSError as error:  # e.g. a read-only home folder: compile every time
            log.warning("no JAX compilation cache: %s", error)

    def _prepare_data(self, workload_name: str) -> None:
        """Ask the sharding service to build the workload's dataset (once per trainer)."""
        if not self.settings.sharding_address:
            return
        from batchlab.train import get_workload

        workload = get_workload(workload_name)
        key = (workload.dataset, workload.dataset_config or "")
        if key in self._prepared:
            return
        import grpc

        from batchlab.proto.v1 import sharding_pb2, sharding_pb2_grpc
        from batchlab.rpc.client import channel

        with channel(self.settings.sharding_address,
                     token=self.settings.auth_token or None) as chan:
            try:
                info = sharding_pb2_grpc.ShardingServiceStub(chan).PrepareDataset(
                    sharding_pb2.PrepareDatasetRequest(dataset=key[0], config=key[1]),
                    timeout=1800)
            except grpc.RpcError as error:
                # The run may still find the data; if not, it fails with a clear error.
                log.warning("sharding service could not prepare %s/%s: %s", key[0], key[1],
                            error.details() if callable(getattr(error, "details", None))
                            else error)
                return
        self._prepared.add(key)
        log.info("%s/%s prepared (%s)", key[0], key[1], dict(info.split_sizes))

    def _start_metrics(self) -> None:
        if self.settings.metrics_port is None:
            return
        try:
            from batchlab.rpc.metrics import make_metrics, start_metrics_server
        except ImportError:
            log.warning("batchlab.rpc.metrics is unavailable: no trainer metrics")
            return
        self._metrics = make_metrics(roles=["trainer"])
        try:
            self._metrics_server = start_metrics_server(self.settings.metrics_port,
                                                        self._metrics.registry)
        except OSError as error:
            # Several trainers on one node: the first gets the port, the others any free one.
            log.warning("metrics port %d busy (%s); using a free port",
                        self.settings.metrics_port, error)
            self._metrics_server = start_metrics_server(0, self._metrics.registry)
        log.info("trainer %s metrics on port %d", self.settings.name, self._metrics_server.port)

    # -- small calls ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Who this trainer is: name, host, pid, metrics port, whether a run is in progress."""
        return {
            "name": self.settings.name,
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

        jax.jit(lambda x: x + 1)(jnp.zeros(())).block_until_ready()
        return self.workloads()

    def workloads(self) -> list[str]:
        """The registered workload names this trainer can run."""
        from batchlab.train import workload_names

        return list(workload_names())

    def stop(self, trial: str, attempt: int) -> None:
        """Ask a run attempt (running now or about to start here) to stop (CANCELLED)."""
        with self._lock:
            self._stopped.add((trial, int(attempt)))
        log.info("%s: stop requested for %s attempt %d", self.settings.name, trial, attempt)

    def coordinator_address(self) -> str:
        """A free host:port on this trainer's node for jax.distributed's coordinator."""
        try:
            host = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - outside Ray: loopback
            host = "127.0.0.1"
        return f"{host}:{free_ports()[0]}"

    # -- runs -------------------------------------------------------------------------------
    def run(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Run one attempt of a trial; returns RunResult.to_dict() plus "worker".

        Args:
          request: see the module docstring.
        """
        return self._run(dict(request), process_id=0)

    def run_distributed(self, request: Mapping[str, Any], process_id: int, num_processes: int,
                        coordinator: str) -> dict[str, Any]:
        """Run one attempt as process `process_id` of a multi-host trial.

        Every process of the trial calls this with the same request and coordinator (the
        address process 0's trainer gave from `coordinator_address`). Process 0 reports
        progress; all return the same RunResult dict. A JAX process joins one distributed
        system in its life, so the controller uses fresh actors for each multi-host attempt.

        Args:
          request: see the module docstring.
          process_id: this process's index, 0..num_processes-1.
          num_processes: how many JAX processes the trial spans.
          coordinator: host:port of jax.distributed's coordinator.
        """
        import jax

        if self._distributed:
            raise RuntimeError("this trainer already joined a distributed run; use a new one")
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(f"trainer {self.settings.name} is busy")
        try:
            # On CPU the collectives need gloo (the default has none across processes).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(coordinator_address=coordinator,
                                       num_processes=int(num_processes),
                                       process_id=int(process_id))
            self._distributed = True
            log.info("%s joined %s as process %d of %d (%d global devices)", self.settings.name,
                     coordinator, process_id, num_processes, jax.device_count())
        finally:
            self._busy.release()
        return self._run(dict(request), process_id=int(process_id))

    def _sync(self) -> CheckpointSync | None:
        if self.settings.checkpoints_address:
            return ServiceCheckpointSync(self.settings.checkpoints_address,
                                         token=self.settings.auth_token or None)
        if self.settings.checkpoint_root:
            return DirectoryCheckpointSync(self.settings.checkpoint_root)
        return None

    def _stub(self):
        if not self.settings.controller_address:
            return None, None
        from batchlab.proto.v1 import controller_pb2_grpc
        from batchlab.rpc.client import channel

        chan = channel(self.settings.controller_address, token=self.settings.auth_token or None)
        return chan, controller_pb2_grpc.ExperimentServiceStub(chan)

    def _run(self, request: dict[str, Any], *, process_id: int) -> dict[str, Any]:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(f"trainer {self.settings.name} is busy")
        try:
            return self._run_locked(request, process_id=process_id)
        finally:
            self._busy.release()

    def _run_locked(self, request: dict[str, Any], *, process_id: int) -> dict[str, Any]:
        from batchlab.train import train_and_evaluate

        trial, attempt = request["trial"], int(request["attempt"])
        key = (trial, attempt)
        target = request["target"]
        maximize = str(target.get("goal", "MAXIMIZE")) in ("MAXIMIZE", "1")
        # Checkpoints need every process to write into one folder; a multi-host trial
        # (separate local folders here) trains without them and restarts whole.
        multi_host = self._distributed
        sync = None if multi_host else self._sync()
        local_dir = self._work_dir / _safe_name(trial) / f"attempt-{attempt}"
        if local_dir.exists():
            shutil.rmtree(local_dir)
        channel_, stub = self._stub() if process_id == 0 else (None, None)
        reporter = ProgressReporter(stub, trial, attempt,
                                    interval_s=self.settings.report_interval_s)
        series = None
        if self._metrics is not None and self._metrics.trainer is not None:
            series = self._metrics.trainer.trial(request.get("experiment_id", ""),
                                                 request.get("study_id", ""),
                                                 f"{request.get('trial_index')}-r"
                                                 f"{request.get('replica')}")
        last_point: dict[str, float] = {}
        last_eval = {"step": 0, "time": time.perf_counter()}

        def on_eval(point: dict[str, float]) -> None:
            last_point.clear()
            last_point.update(point)
            reporter.add(point)
            if series is not None:
                try:
                    self._observe(series, point, last_eval, int(request["batch_size"]))
                except Exception:  # noqa: BLE001 - metrics must never fail a run
                    log.exception("trainer metrics update failed")

        def on_checkpoint(step: int, directory: str) -> None:
            if sync is None:
                return
            metric = last_point.get(target["metric"]) if last_point.get("step") == step else None
            if metric is not None and not math.isfinite(metric):
                metric = None
            try:
                sync.upload(trial, step, Path(directory) / str(step), metric=metric,
                            maximize=maximize)
            except Exception:  # noqa: BLE001 - training goes on; a retry resumes from older
                log.exception("upload of %s step %d failed", trial, step)

        def should_stop() -> bool:
            if multi_host:
                # Processes that stopped at different steps would wait forever in each
                # other's collectives: a multi-host run is stopped by retiring its actors.
                return False
            with self._lock:
                return key in self._stopped or reporter.cancelled

        try:
            restored = None
            if sync is not None:
                try:
                    restored = sync.restore(trial, local_dir)
                except Exception:  # noqa: BLE001 - start over rather than fail the attempt
                    log.exception("restoring %s failed; starting from step 0", trial)
                    shutil.rmtree(local_dir, ignore_errors=True)
            self._prepare_data(request["workload"])
            config = build_run_config(
                request, data_dir=self.settings.data_dir or None,
                checkpoint_dir=None if multi_host else str(local_dir))
            log.info("%s: %s attempt %d starts (checkpoint step %s)", self.settings.name,
                     trial, attempt, restored)
            result = train_and_evaluate(config, on_eval=on_eval, should_stop=should_stop,
                                        on_checkpoint=on_checkpoint, return_state=True)
            reporter.flush()
            out = result.to_dict()
            out["worker"] = self.settings.name
            out["state_sha256"] = state_digest(result.final_state)
            log.info("%s: %s attempt %d ended %s at step %d", self.settings.name, trial,
                     attempt, out["outcome"], out["steps_completed"])
            return out
        finally:
            with self._lock:
                self._stopped.discard(key)
            if series is not None:
                with contextlib.suppress(Exception):
                    series.remove()
            if sync is not None:
                sync.close()
            if channel_ is not None:
                channel_.close()
            shutil.rmtree(local_dir, ignore_errors=True)

    def _observe(self, series: Any, point: Mapping[str, float], last: dict[str, float],
                 batch_size: int) -> None:
        """Trainer metrics at an evaluation: progress, curve and throughput since the last."""
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
        """Stop the metrics endpoint (the controller calls this before killing the actor)."""
        if self._metrics_server is not None:
            with contextlib.suppress(Exception):
                self._metrics_server.close()
            self._metrics_server = None


# The Ray actor: a threaded actor, so `stop` and `info` are answered while `run` trains.
TrainerActor = ray.remote(max_concurrency=MAX_CONCURRENCY)(TrainerWorker)
