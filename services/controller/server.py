"""Runs the experiment controller: ``python -m services.controller.server``.

Wiring: SQLite storage in the state directory, a pool of Ray trainer actors, the scheduler
thread, the evaluation driver (evaluation points go to the evaluation service) and the
ExperimentService gRPC server (with health, auth and metrics).

The controller serves gRPC first; Ray is connected (or started) and the trainers warmed in
the background, reconnecting after a loss (services.controller.ray_link). Health service
"" and batchlab.v1.ExperimentService are SERVING while the API serves; "batchlab.trainers"
is SERVING only while Ray is connected (trainers can run). The metrics
batchlab_ray_connected, batchlab_cluster_resources{resource} and batchlab_trainers{state}
report the trainers' capacity.

Environment:
  BATCHLAB_CONTROLLER_PORT: gRPC port (default 50051).
  BATCHLAB_BIND_HOST: interface to bind (default 127.0.0.1; 0.0.0.0 in a pod).
  BATCHLAB_CONTROLLER_ADDR: the address trainers dial to report progress (default: the
    bound address; set it when trainers run on other machines).
  BATCHLAB_STATE_DIR: where the database lives (default ./.batchlab/controller).
  BATCHLAB_RAY_ADDRESS: a Ray cluster to connect to (e.g. ray://head:10001 or host:6379);
    unset starts a local Ray with BATCHLAB_RAY_CPUS logical CPUs (default: all).
  BATCHLAB_NUM_TRAINERS: trainer actors at most (default 2); a multi-host run needs one per
    host (resources.num_hosts).
  BATCHLAB_WARM_TRAINERS: trainer actors started when Ray connects, before any run asks for
    them (default: BATCHLAB_NUM_TRAINERS; at most that).
  BATCHLAB_CHECKPOINTS_ADDR: the checkpoint service trainers upload to and resume from;
    unset: BATCHLAB_CHECKPOINT_DIR, a folder every trainer can read (default
    <state dir>/checkpoints with a local Ray; none with a remote one).
  BATCHLAB_SHARDING_ADDR: the sharding service: it prepares a run's dataset and says what
    every trainer process reads (unset: the datasets must exist in the trainers' data folder
    and each process computes its own shard).
  BATCHLAB_EVALUATOR_ADDR: the evaluation service that evaluates every evaluation point from
    its checkpoint while training goes on (needs BATCHLAB_CHECKPOINTS_ADDR). Required unless
    BATCHLAB_EVALUATION=in-process, which has trainers evaluate in their own process between
    steps (as `batchlab local run` does).
  BATCHLAB_EVALUATION: "service" (default) or "in-process".
  BATCHLAB_EVALUATION_CONCURRENCY: evaluations in flight at once (default 2).
  BATCHLAB_EVALUATE_TIMEOUT_SECONDS: how long one Evaluate call may take (default 1800). An
    evaluation whose deadline passes twice fails its attempt (the evaluator is stuck or too
    slow for the deadline), rather than waiting out every retry.
  BATCHLAB_UNSCHEDULABLE_TIMEOUT_SECONDS: how long a run may wait for resources that no node
    of the Ray cluster provides (the autoscaler is asked for them meanwhile) before it and
    its experiment fail as unschedulable (default 600).
  BATCHLAB_TPU_SLICE_TYPES: the TPU slice types the Ray cluster's worker groups add from zero,
    "<pod type>:<hosts>x<chips per host>" comma separated (e.g. "v5p-256:32x4,v5litepod-4:1x4"):
    a TPU run of such a shape waits for its slice to scale up and the autoscaler is asked for it.
  BATCHLAB_RAY_PROBE_SECONDS: how often the Ray link is checked (default 5); a probe that
    gets no answer in BATCHLAB_RAY_PROBE_TIMEOUT_SECONDS (default 30) means it is lost.
  BATCHLAB_EXAMPLE_LOG_DIR: trainers append the example indices of every step they train
    there (an audit of what each attempt read; default: off).
  BATCHLAB_DATA_DIR: the trainers' data folder (tfds datasets under <dir>/tfds).
  BATCHLAB_RESULTS_DIR: GetReport also keeps each experiment's results layout and report
    under <dir>/<experiment id> (default: not kept).
  BATCHLAB_JAX_CACHE_DIR: JAX's persistent compilation cache for the trainers.
  BATCHLAB_WORKLOADS: workload names specs are checked against, comma separated (unset: the
    registered ones, from batchlab.workloads).
  BATCHLAB_REPORT_INTERVAL_SECONDS: how often trainers send progress (default 2).
  BATCHLAB_AUTH_TOKEN: when set, calls need ``authorization: Bearer <token>`` (trainers get it).
  BATCHLAB_METRICS_PORT: Prometheus port (default 9101; 0 picks a free one).
  BATCHLAB_TRAINER_METRICS_PORT: trainers' Prometheus port (unset: none).
  BATCHLAB_TRAINER_METRICS_HOST: the interface trainers serve metrics on (default: the
    controller's BATCHLAB_BIND_HOST, so a loopback stack keeps every listener on loopback).
  BATCHLAB_SHUTDOWN_GRACE_SECONDS: time in-flight calls get after SIGTERM (default 10).
  BATCHLAB_RECONCILE_EXPERIMENTS: "true" in a pod runs the Experiment reconciler
    (services/controller/reconciler.py; BATCHLAB_NAMESPACE, BATCHLAB_RECONCILE_INTERVAL_SECONDS).
  BATCHLAB_DB_BACKUP_INTERVAL_SECONDS: how often the database is backed up online into
    <state dir>/backups (default 3600, and once at start; 0 turns backups off).
  BATCHLAB_DB_BACKUPS_KEPT: backups kept, the newest (default 5).

At start the database passes SQLite's integrity check or the controller refuses to start,
with one line naming the file and the way out (restore the newest backup, or move it away).

SIGTERM or SIGINT stops it gracefully: health turns NOT_SERVING, watch streams end, calls
in flight finish, the scheduler stops and the trainers are released. Runs in flight are
completed as FAILED by the next controller on the same state directory and retried there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from batchlab.proto.v1 import (
    checkpoints_pb2_grpc,
    controller_pb2,
    controller_pb2_grpc,
    evaluation_pb2_grpc,
)
from batchlab.rpc.client import StartupError, channel, peer_address
from batchlab.rpc.server import (
    Registration,
    build_server,
    configure_logging,
    env_port,
    settings_from_env,
)
from batchlab.runner.local_ray import LOCAL_RAY_ENV, ensure_local_ray
from services.controller.backups import BackupScheduler
from services.controller.evaluations import EvaluationDriver
from services.controller.pool import (
    TPU_SLICE_TYPES_ENV,
    RayTrainerPool,
    TpuSliceType,
    TrainerPool,
    parse_tpu_slice_types,
)
from services.controller.ray_link import RayLink
from services.controller.reconciler import start_experiment_reconciler
from services.controller.scheduler import DEFAULT_UNSCHEDULABLE_AFTER_S, Scheduler, StudyCache
from services.controller.servicer import ExperimentServicer
from services.controller.storage import ExperimentStorage, SQLiteStorage

if TYPE_CHECKING:
    from batchlab.rpc.metrics import MetricsServer

__all__ = ["Controller", "ControllerConfig", "known_workloads", "main"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9101
DEFAULT_STATE_DIR = ".batchlab/controller"
MAX_EVALUATE_TIMEOUT_S = 7 * 24 * 3600.0


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer; got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {raw!r}")
    return value


def _float(environ: Mapping[str, str], name: str, default: float,
           minimum: float | None = 0.0) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number; got {raw!r}") from None
    if minimum is None:  # the caller checks the range
        return value
    if not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum:g}; got {raw!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """Everything the controller reads from its environment (see the module docstring).

    Args:
      host: interface to bind.
      port: gRPC port (0: any free one).
      metrics_port: Prometheus port (0: any free one); None: no endpoint.
      state_dir: the database folder.
      advertised_address: the address trainers dial ("" = the bound one).
      ray_address: a Ray cluster to connect to ("" = start a local one, unless Ray is
        initialised in this process already).
      ray_cpus: logical CPUs of a local Ray (None: all).
      num_trainers: trainer actors at most.
      warm_trainers: trainer actors started at connection (None: num_trainers).
      checkpoints_address: the checkpoint service ("" = none).
      sharding_address: the sharding service ("" = none).
      checkpoint_dir: shared checkpoint folder when there is no service ("" = none).
      data_dir: the trainers' tfds folder ("" = their default).
      results_dir: where GetReport keeps results layouts ("" = nowhere).
      jax_cache_dir: trainers' JAX compilation cache ("" = off).
      workloads: workload names to check specs against (None: find them, see
        `known_workloads`).
      report_interval_s: how often trainers report progress.
      auth_token: bearer token ("" = none).
      trainer_metrics_port: trainers' Prometheus port (None = none).
      trainer_metrics_host: the interface trainers' metrics bind ("" = ``host``).
      grace_s: shutdown grace for in-flight calls.
      poll_interval_s: the scheduler's tick interval.
      backup_interval_s: seconds between online database backups (0: none).
      backups_kept: database backups kept.
      evaluator_address: the evaluation service ("" = trainers evaluate in their own
        process; from_env refuses that unless BATCHLAB_EVALUATION=in-process).
      evaluation_concurrency: evaluations in flight at once.
      evaluate_timeout_s: the deadline of one Evaluate call.
      unschedulable_timeout_s: how long a run waits for resources no node provides.
      ray_probe_interval_s: time between two checks of the Ray link.
      ray_probe_timeout_s: a check without an answer in this time means the link is lost.
      example_log_dir: where trainers log the examples each step read ("" = off).
      tpu_slice_types: the TPU slice types the Ray cluster's worker groups can add, scaled
        from zero (BATCHLAB_TPU_SLICE_TYPES; services.controller.pool.parse_tpu_slice_types).
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    metrics_port: int | None = DEFAULT_METRICS_PORT
    state_dir: str = DEFAULT_STATE_DIR
    advertised_address: str = ""
    ray_address: str = ""
    ray_cpus: int | None = None
    num_trainers: int = 2
    warm_trainers: int | None = None
    checkpoints_address: str = ""
    sharding_address: str = ""
    checkpoint_dir: str = ""
    data_dir: str = ""
    results_dir: str = ""
    jax_cache_dir: str = ""
    workloads: tuple[str, ...] | None = None
    report_interval_s: float = 2.0
    auth_token: str = ""
    trainer_metrics_port: int | None = None
    trainer_metrics_host: str = ""
    grace_s: float = 10.0
    poll_interval_s: float = 0.2
    backup_interval_s: float = 3600.0
    backups_kept: int = 5
    evaluator_address: str = ""
    evaluation_concurrency: int = 2
    evaluate_timeout_s: float = 1800.0
    unschedulable_timeout_s: float = DEFAULT_UNSCHEDULABLE_AFTER_S
    ray_probe_interval_s: float = 5.0
    ray_probe_timeout_s: float = 30.0
    example_log_dir: str = ""
    tpu_slice_types: tuple[TpuSliceType, ...] = ()

    def __post_init__(self) -> None:
        if self.evaluator_address and not self.checkpoints_address:
            raise StartupError("the evaluation service (BATCHLAB_EVALUATOR_ADDR) reads each "
                               "evaluation point's checkpoint from the checkpoint service: set "
                               "BATCHLAB_CHECKPOINTS_ADDR too, or BATCHLAB_EVALUATION=in-process")
        # gRPC turns a deadline past its clock's range (about 7e9 s from now) into an instant
        # DEADLINE_EXCEEDED: a week is far beyond any evaluation and far inside that range.
        if not 0 < self.evaluate_timeout_s <= MAX_EVALUATE_TIMEOUT_S:
            raise ValueError(f"BATCHLAB_EVALUATE_TIMEOUT_SECONDS must be > 0 and at most "
                             f"{MAX_EVALUATE_TIMEOUT_S:g} (a week); got {self.evaluate_timeout_s}")
        if self.warm_trainers is not None and self.warm_trainers > self.num_trainers:
            raise StartupError(f"BATCHLAB_WARM_TRAINERS ({self.warm_trainers}) must be at most "
                               f"BATCHLAB_NUM_TRAINERS ({self.num_trainers})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ControllerConfig:
        """Read the configuration; a malformed variable raises ValueError naming it."""
        env = os.environ if environ is None else environ
        workloads = env.get("BATCHLAB_WORKLOADS", "").strip()
        data_dir = env.get("BATCHLAB_DATA_DIR", "").strip()
        trainer_metrics = env.get("BATCHLAB_TRAINER_METRICS_PORT", "").strip()
        evaluation = env.get("BATCHLAB_EVALUATION", "").strip() or "service"
        if evaluation not in ("service", "in-process"):
            raise ValueError(f"BATCHLAB_EVALUATION must be 'service' or 'in-process'; got "
                             f"{evaluation!r}")
        # The evaluation service is a required peer (a missing address is a startup error),
        # unless in-process evaluation is asked for explicitly.
        evaluator = peer_address("evaluator", environ=env) if evaluation == "service" else ""
        # What every server reads (interface, ports, token, grace), read as every server does;
        # the controller alone stays on loopback unless told otherwise.
        server = settings_from_env("controller", default_port=DEFAULT_PORT,
                                   default_metrics_port=DEFAULT_METRICS_PORT,
                                   default_host="127.0.0.1", environ=env)
        return cls(
            host=server.host,
            port=server.port,
            metrics_port=server.metrics_port,
            state_dir=env.get("BATCHLAB_STATE_DIR", "").strip() or DEFAULT_STATE_DIR,
            advertised_address=env.get("BATCHLAB_CONTROLLER_ADDR", "").strip(),
            ray_address=env.get("BATCHLAB_RAY_ADDRESS", "").strip(),
            ray_cpus=_int(env, "BATCHLAB_RAY_CPUS", 0) or None,
            num_trainers=_int(env, "BATCHLAB_NUM_TRAINERS", 2, 1),
            warm_trainers=(_int(env, "BATCHLAB_WARM_TRAINERS", 0)
                           if env.get("BATCHLAB_WARM_TRAINERS", "").strip() else None),
            checkpoints_address=env.get("BATCHLAB_CHECKPOINTS_ADDR", "").strip(),
            sharding_address=env.get("BATCHLAB_SHARDING_ADDR", "").strip(),
            checkpoint_dir=env.get("BATCHLAB_CHECKPOINT_DIR", "").strip(),
            data_dir=str(Path(data_dir) / "tfds") if data_dir else "",
            results_dir=env.get("BATCHLAB_RESULTS_DIR", "").strip(),
            jax_cache_dir=env.get("BATCHLAB_JAX_CACHE_DIR", "").strip(),
            workloads=tuple(w.strip() for w in workloads.split(",") if w.strip())
            if workloads else None,
            report_interval_s=_float(env, "BATCHLAB_REPORT_INTERVAL_SECONDS", 2.0),
            auth_token=server.auth_token or "",
            trainer_metrics_port=(env_port("BATCHLAB_TRAINER_METRICS_PORT", 0, env)
                                  if trainer_metrics else None),
            trainer_metrics_host=env.get("BATCHLAB_TRAINER_METRICS_HOST", "").strip(),
            grace_s=server.grace,
            backup_interval_s=_float(env, "BATCHLAB_DB_BACKUP_INTERVAL_SECONDS", 3600.0),
            backups_kept=_int(env, "BATCHLAB_DB_BACKUPS_KEPT", 5, 1),
            evaluator_address=evaluator,
            evaluation_concurrency=_int(env, "BATCHLAB_EVALUATION_CONCURRENCY", 2, 1),
            evaluate_timeout_s=_float(env, "BATCHLAB_EVALUATE_TIMEOUT_SECONDS", 1800.0,
                                      minimum=None),
            unschedulable_timeout_s=_float(env, "BATCHLAB_UNSCHEDULABLE_TIMEOUT_SECONDS",
                                           DEFAULT_UNSCHEDULABLE_AFTER_S),
            ray_probe_interval_s=_float(env, "BATCHLAB_RAY_PROBE_SECONDS", 5.0),
            ray_probe_timeout_s=_float(env, "BATCHLAB_RAY_PROBE_TIMEOUT_SECONDS", 30.0),
            example_log_dir=env.get("BATCHLAB_EXAMPLE_LOG_DIR", "").strip(),
            tpu_slice_types=tuple(parse_tpu_slice_types(env.get(TPU_SLICE_TYPES_ENV, ""))),
        )


def known_workloads(config: ControllerConfig) -> Collection[str] | None:
    """Workload names specs are checked against.

    From the configuration if given; else the registered workloads' declarations
    (batchlab.workloads, which needs no JAX and which batchlab.train's registry matches).
    """
    if config.workloads is not None:
        return config.workloads
    from batchlab.workloads import DECLARATIONS

    return tuple(sorted(DECLARATIONS))


def connect_ray(config: ControllerConfig) -> bool:
    """Connect to (or start) Ray; returns whether this process started a local Ray."""
    if not config.ray_address:
        # Before the import: Ray reads these when it loads (loopback only, no reporting).
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    # Ray connects from the link's thread, after main() installed its SIGTERM handler; Ray's
    # own failure-signal handler would then take SIGTERM first and abort the process in the
    # middle of the graceful stop. Ray reads this once, when it is imported; the Ray processes
    # this process starts do not inherit it (they keep their crash reports).
    disable = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
    inherited = os.environ.get(disable)
    os.environ[disable] = "1"
    import ray

    if inherited is None:
        os.environ.pop(disable, None)
    else:
        os.environ[disable] = inherited

    if ray.is_initialized():
        return False
    if config.ray_address:
        ray.init(address=config.ray_address, log_to_driver=False)
        log.info("connected to Ray at %s", config.ray_address)
        return False
    ensure_local_ray(num_cpus=config.ray_cpus)
    return True


class Controller:
    """The controller's parts, started and stopped together.

    Args:
      config: the configuration.
      storage: the storage (default: SQLite in config.state_dir).
      pool: the trainer pool (default: Ray actors, on a Ray cluster that `start` connects
        to, or starts, in the background).
      metrics: batchlab.rpc.metrics Metrics with the controller role (default: made here
        when the module is available).
    """

    def __init__(self, config: ControllerConfig, *, storage: ExperimentStorage | None = None,
                 pool: TrainerPool | None = None, metrics: Any = None):
        self.config = config
        self.storage = storage or SQLiteStorage(config.state_dir)
        self.metrics = metrics if metrics is not None else _make_metrics()
        controller_metrics = getattr(self.metrics, "controller", None)
        self.studies = StudyCache()
        self.servicer = ExperimentServicer(
            self.storage, known_workloads=known_workloads(config), studies=self.studies,
            metrics=controller_metrics, results_dir=config.results_dir or None)
        self.server = build_server(
            [Registration.for_service(controller_pb2, controller_pb2_grpc, "ExperimentService",
                                      self.servicer)],
            host=config.host, port=config.port, service_name="controller",
            auth_token=config.auth_token or None, metrics=self.metrics)
        self.link = None
        if pool is None:
            # Serve first: Ray is connected (or started) and the trainers warmed afterwards,
            # in the background; nothing is placed until then.
            pool = RayTrainerPool(config.num_trainers, self.trainer_settings(),
                                  connected=False, warm_size=config.warm_trainers,
                                  tpu_slice_types=config.tpu_slice_types)
            self.link = RayLink(lambda: connect_ray(config), pool, health=self.server.health,
                                metrics=controller_metrics,
                                probe_interval_s=config.ray_probe_interval_s,
                                probe_timeout_s=config.ray_probe_timeout_s,
                                on_change=lambda: self.scheduler.wake())
        self.pool = pool
        self._evaluator_channel = None
        self._checkpoints_channel = None
        self.evaluations = None
        if config.evaluator_address:
            self._evaluator_channel = channel(config.evaluator_address,
                                              token=config.auth_token or None)
            # The driver releases each evaluation hold itself, once the answer is stored.
            self._checkpoints_channel = channel(config.checkpoints_address,
                                                token=config.auth_token or None)
            self.evaluations = EvaluationDriver(
                self.storage, evaluation_pb2_grpc.EvaluationServiceStub(self._evaluator_channel),
                self.studies, concurrency=config.evaluation_concurrency,
                timeout_s=config.evaluate_timeout_s,
                on_evaluated=lambda: self.scheduler.wake(), metrics=controller_metrics,
                checkpoints=checkpoints_pb2_grpc.CheckpointServiceStub(
                    self._checkpoints_channel))
        self.scheduler = Scheduler(self.storage, pool, studies=self.studies,
                                   interval_s=config.poll_interval_s,
                                   metrics=controller_metrics, evaluations=self.evaluations,
                                   unschedulable_after_s=config.unschedulable_timeout_s)
        self.servicer.scheduler = self.scheduler
        self._metrics_server: MetricsServer | None = None
        self.backups = None
        if isinstance(self.storage, SQLiteStorage) and config.backup_interval_s > 0:
            self.backups = BackupScheduler(self.storage.path, interval_s=config.backup_interval_s,
                                           keep=config.backups_kept)
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        """host:port clients on this machine dial."""
        return self.server.address

    def trainer_settings(self) -> dict[str, Any]:
        """What every trainer actor is given: a batchlab.v1.TrainerSettings as its JSON mapping
        (the trainer pool adds each trainer's name; services.trainer.actor parses it back)."""
        config = self.config
        checkpoint_dir = config.checkpoint_dir
        if not config.checkpoints_address and not checkpoint_dir and not config.ray_address:
            # A local Ray: every trainer shares this machine's disk.
            checkpoint_dir = str(Path(config.state_dir).absolute() / "checkpoints")
        if not config.checkpoints_address and not checkpoint_dir:
            log.warning("no BATCHLAB_CHECKPOINTS_ADDR or BATCHLAB_CHECKPOINT_DIR: a retried "
                        "attempt starts from step 0")
        settings = controller_pb2.TrainerSettings(
            controller_address=config.advertised_address or self.server.address,
            checkpoints_address=config.checkpoints_address,
            sharding_address=config.sharding_address,
            checkpoint_root=checkpoint_dir,
            auth_token=config.auth_token,
            data_dir=config.data_dir,
            jax_cache_dir=config.jax_cache_dir,
            report_interval_s=config.report_interval_s,
            metrics_port=config.trainer_metrics_port,
            metrics_host=config.trainer_metrics_host or config.host,
            example_log_dir=config.example_log_dir,
        )
        mapping: dict[str, Any] = json_format.MessageToDict(settings, preserving_proto_field_name=True)
        return mapping

    def start(self) -> None:
        """Recover from a previous controller, start scheduling and serving."""
        if self.metrics is not None and self.config.metrics_port is not None:
            from batchlab.rpc.metrics import start_metrics_server

            self._metrics_server = start_metrics_server(
                self.config.metrics_port, self.metrics.registry, addr=self.config.host)
            log.info("controller metrics on %s:%d", self.config.host, self._metrics_server.port)
        if self.backups is not None:
            self.backups.start()
        self.scheduler.start()
        self.server.start()
        log.info("controller serving on %s (state %s)", self.address, self.config.state_dir)
        if self.evaluations is not None:
            self.evaluations.start()
        if self.link is not None:
            self.link.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop serving (watch streams end, calls in flight get `grace` s), then scheduling."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.grace_s if grace is None else grace
        self.server.health.enter_graceful_shutdown()
        self.servicer.close()
        self.server.stop(grace)
        if self.evaluations is not None:
            self.evaluations.stop()
        if self.link is not None:
            # Before the pool closes, and without waiting (a warm in progress ends when the
            # pool kills its trainers; close() below waits): a connection the link completes
            # from now on warms no trainers for the closing pool.
            self.link.request_stop()
        self.scheduler.stop()
        if self.link is not None:
            self.link.close()
        if self._evaluator_channel is not None:
            self._evaluator_channel.close()
        if self._checkpoints_channel is not None:
            self._checkpoints_channel.close()
        if self.backups is not None:
            self.backups.stop()
        self.storage.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        log.info("controller stopped")


def _make_metrics() -> Any:
    try:
        from batchlab.rpc.metrics import make_metrics
    except ImportError:
        log.warning("batchlab.rpc.metrics is unavailable: no controller metrics")
        return None
    return make_metrics(roles=["controller"])


def main(environ: Mapping[str, str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit status (2 for a bad configuration or
    a damaged database)."""
    configure_logging(environ)
    try:
        config = ControllerConfig.from_env(environ)
        controller = Controller(config)
    except (RuntimeError, ValueError, OSError) as error:
        log.error("controller cannot start: %s", error)
        return 2
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        log.info("controller received %s", signal.Signals(signum).name)
        stop.set()

    # Not batchlab.rpc.server.serve: the controller must end its watch streams before the
    # server's grace period starts, and stop the scheduler after the server.
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    reconciler = None
    try:
        try:
            controller.start()
        except OSError as error:  # a taken port: a setting, which starting again cannot fix
            log.error("controller cannot start: %s (BATCHLAB_CONTROLLER_PORT, "
                      "BATCHLAB_METRICS_PORT)", error)
            return 2
        # Experiments as Kubernetes resources (BATCHLAB_RECONCILE_EXPERIMENTS, in a pod only):
        # services/controller/reconciler.py, a client of this controller's own API.
        reconciler = start_experiment_reconciler(controller.address, token=config.auth_token,
                                                 environ=environ)
        while not stop.wait(0.5):
            pass
    finally:
        if reconciler is not None:
            reconciler.stop()
        controller.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
