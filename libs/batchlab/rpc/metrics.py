"""The Prometheus metrics every batchlab service exports, defined in one place.

Each service builds its metrics with `make_metrics`, on a registry of its own, and serves them
with `start_metrics_server` on its role's port (`METRICS_PORTS`). The dashboards under
k8s/components/grafana/dashboards and the rules under k8s/components/prometheus may name only
series defined here (or recording rules); tests/k8s/test_dashboards.py checks that.

Naming follows the Prometheus conventions: a `batchlab_` prefix, base units in the name
(`_seconds`, `_bytes`), `_total` on counters and on nothing else, and labels with bounded values.
Per-trial series (`batchlab_trial_*`) are the one place with a label per trial: they exist only
while a trial runs, and `TrainerMetrics.remove_trial` / `ControllerMetrics.end_trial` delete them
when it ends, so the number of series follows the running trials, not the trials ever run.

Example:
    >>> from prometheus_client import CollectorRegistry
    >>> m = make_metrics(CollectorRegistry(), roles=["trainer"])
    >>> trial = m.trainer.trial("minimal", "mnist1d_resnet1d.nesterov.b128.s200", "3")
    >>> trial.report_train(step=10, loss=1.5, learning_rate=0.1)
    >>> trial.report_eval({"validation/accuracy": 0.61})
    >>> trial.remove()   # the run ended: its series go away
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = [
    "METRICS_PORTS",
    "ROLES",
    "TRIAL_LABELS",
    "CheckpointMetrics",
    "ControllerMetrics",
    "EvaluatorMetrics",
    "Metrics",
    "MetricsServer",
    "RpcMetrics",
    "ShardingMetrics",
    "TrainerMetrics",
    "TrialSeries",
    "make_metrics",
    "metrics_port",
    "series_names",
    "start_metrics_server",
]

ROLES = ("controller", "sharding", "checkpoints", "evaluator", "trainer")

# The metrics HTTP port of each role; the Kubernetes manifests name the same numbers.
METRICS_PORTS: Mapping[str, int] = {
    "controller": 9101,
    "sharding": 9102,
    "checkpoints": 9103,
    "evaluator": 9104,
    "trainer": 9110,
}

# Labels that identify one trial; the resource name is experiments/{e}/studies/{s}/trials/{t}.
TRIAL_LABELS = ("experiment", "study", "trial")

# Unary RPCs on loopback take about a millisecond; checkpoint and batch streams take seconds.
RPC_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
# A CPU ResNet-20 step is about 2.5 s, a GPU ResNet-50 step tens of milliseconds.
STEP_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# From a run becoming runnable to its placement on a trainer: seconds when a worker is free,
# up to hours when the queue is long.
SCHEDULING_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
# Reading a shard, saving or restoring a checkpoint, one evaluation pass.
IO_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


def _code_name(code: Any) -> str:
    """The name of a gRPC status code ('OK', 'NOT_FOUND'), given a grpc.StatusCode or a string."""
    return getattr(code, "name", None) or str(code)


@dataclass(frozen=True)
class RpcMetrics:
    """Server-side RPC metrics, exported by every gRPC service.

    `service` is the full gRPC service name (batchlab.v1.Controller), `method` the bare method
    name, `code` the status code name; together they are bounded by the contracts.
    """

    requests: Counter
    latency: Histogram

    def observe(self, service: str, method: str, code: Any, seconds: float) -> None:
        """Count one finished RPC and record how long it took.

        Args:
          service: the full gRPC service name, e.g. "batchlab.v1.Controller".
          method: the method name, e.g. "CreateExperiment".
          code: a grpc.StatusCode or its name ("OK", "INVALID_ARGUMENT", ...).
          seconds: wall time from the request's arrival to the response.
        """
        self.requests.labels(service=service, method=method, code=_code_name(code)).inc()
        self.latency.labels(service=service, method=method).observe(seconds)


@dataclass(frozen=True)
class ControllerMetrics:
    """What the experiment controller knows: experiments, trials, the run queue, progress.

    The controller owns `batchlab_trial_last_progress_timestamp_seconds` (not the trainer) so
    that a trial whose trainer died still has a series, and the "no progress" alert fires.
    """

    experiments: Gauge
    trials: Gauge
    queue_depth: Gauge
    trainers: Gauge
    scheduling_latency: Histogram
    runs_finished: Counter
    divergences: Counter
    last_progress: Gauge
    ray_connected: Gauge
    cluster_resources: Gauge
    eval_metric: Gauge

    def set_trial_counts(self, experiment: str, counts: Mapping[tuple[str, str], int]) -> None:
        """Replace an experiment's `batchlab_trials` series with the given counts.

        Args:
          experiment: the experiment id.
          counts: number of trials per (state, outcome); outcome is "none" until a trial ends
            (e.g. {("RUNNING", "none"): 3, ("COMPLETED", "DIVERGED"): 1}).
        """
        self.trials.remove_by_labels({"experiment": experiment})
        for (state, outcome), n in counts.items():
            self.trials.labels(experiment=experiment, state=state, outcome=outcome).set(n)

    def record_progress(
        self, experiment: str, study: str, trial: str, when: float | None = None
    ) -> None:
        """Mark that a running trial made progress (reported a step) at `when` (default now)."""
        self.last_progress.labels(experiment=experiment, study=study, trial=trial).set(
            time.time() if when is None else when
        )

    def end_trial(self, experiment: str, study: str, trial: str) -> None:
        """Drop a trial's progress series (it no longer runs, so it cannot stall) and the
        evaluation metrics the controller exported for it."""
        labels = {"experiment": experiment, "study": study, "trial": trial}
        self.last_progress.remove_by_labels(labels)
        self.eval_metric.remove_by_labels(labels)

    def report_eval(self, experiment: str, study: str, trial: str,
                    values: Mapping[str, float]) -> None:
        """Export a trial's latest evaluation metrics when the evaluation service computed
        them (the trainer exports them itself when it evaluates in its own process)."""
        for name, value in values.items():
            self.eval_metric.labels(experiment=experiment, study=study, trial=trial,
                                    metric=name).set(float(value))

    def forget_experiment(self, experiment: str) -> None:
        """Drop every series labelled with an experiment that is finished or deleted."""
        for metric in (self.trials, self.last_progress, self.runs_finished, self.divergences,
                       self.eval_metric):
            metric.remove_by_labels({"experiment": experiment})


@dataclass(frozen=True)
class TrialSeries:
    """The live series of one running trial on one trainer; `remove()` when the run ends."""

    metrics: TrainerMetrics
    experiment: str
    study: str
    trial: str

    @property
    def _labels(self) -> dict[str, str]:
        return {"experiment": self.experiment, "study": self.study, "trial": self.trial}

    def report_train(self, step: int, loss: float, learning_rate: float) -> None:
        """Set the trial's current step, training loss and learning rate."""
        labels = self._labels
        self.metrics.trial_step.labels(**labels).set(step)
        self.metrics.train_loss.labels(**labels).set(loss)
        self.metrics.learning_rate.labels(**labels).set(learning_rate)

    def report_eval(self, values: Mapping[str, float]) -> None:
        """Set the trial's latest evaluation metrics, e.g. {"validation/accuracy": 0.7}.

        A diverged evaluation (NaN or inf) is exported as it is: Grafana shows the gap.
        """
        for name, value in values.items():
            self.metrics.eval_metric.labels(**self._labels, metric=name).set(float(value))

    def remove(self) -> None:
        """Delete every series of this trial."""
        self.metrics.remove_trial(self.experiment, self.study, self.trial)


@dataclass(frozen=True)
class TrainerMetrics:
    """What a trainer process reports: throughput of the process, and per running trial, its
    training curve (`batchlab_trial_*`)."""

    steps: Counter
    examples: Counter
    examples_per_second: Gauge
    step_time: Histogram
    trial_step: Gauge
    train_loss: Gauge
    learning_rate: Gauge
    eval_metric: Gauge

    def trial(self, experiment: str, study: str, trial: str) -> TrialSeries:
        """The series of one trial, to report into while it runs."""
        return TrialSeries(self, experiment, study, trial)

    def observe_step(self, seconds: float, examples: int) -> None:
        """Count one training step of `examples` examples that took `seconds`."""
        self.steps.inc()
        self.examples.inc(examples)
        self.step_time.observe(seconds)
        if seconds > 0 and math.isfinite(seconds):
            self.examples_per_second.set(examples / seconds)

    def remove_trial(self, experiment: str, study: str, trial: str) -> None:
        """Delete every `batchlab_trial_*` series of a trial (any eval metric name included)."""
        labels = {"experiment": experiment, "study": study, "trial": trial}
        for gauge in (self.trial_step, self.train_loss, self.learning_rate, self.eval_metric):
            gauge.remove_by_labels(labels)


@dataclass(frozen=True)
class ShardingMetrics:
    """The data sharding service: shard assignments served, per dataset and split.

    The service hands out example indices, not example bytes (trainers read the data
    themselves), so it counts requests and examples assigned; its latency is the RPC latency.
    """

    requests: Counter
    examples: Counter
    errors: Counter


@dataclass(frozen=True)
class CheckpointMetrics:
    """The checkpoint store: operations (save, restore, delete, list), bytes moved, failures,
    and the size of what is stored."""

    operations: Counter
    bytes: Counter
    latency: Histogram
    failures: Counter
    store_bytes: Gauge
    store_capacity_bytes: Gauge
    store_checkpoints: Gauge


@dataclass(frozen=True)
class EvaluatorMetrics:
    """The evaluation service: evaluations per workload and outcome, examples, checkpoint bytes
    read, latency, errors."""

    evaluations: Counter
    examples: Counter
    checkpoint_bytes: Counter
    latency: Histogram
    errors: Counter


@dataclass(frozen=True)
class Metrics:
    """All the metrics of one process; the roles it was not built for are None."""

    registry: CollectorRegistry
    rpc: RpcMetrics
    controller: ControllerMetrics | None = None
    sharding: ShardingMetrics | None = None
    checkpoints: CheckpointMetrics | None = None
    evaluator: EvaluatorMetrics | None = None
    trainer: TrainerMetrics | None = None


def _rpc(r: CollectorRegistry) -> RpcMetrics:
    return RpcMetrics(
        requests=Counter(
            "batchlab_rpc_requests_total",
            "gRPC requests handled, by service, method and status code.",
            ["service", "method", "code"], registry=r,
        ),
        latency=Histogram(
            "batchlab_rpc_latency_seconds",
            "Time to handle a gRPC request, from arrival to response.",
            ["service", "method"], buckets=RPC_LATENCY_BUCKETS, registry=r,
        ),
    )


def _controller(r: CollectorRegistry) -> ControllerMetrics:
    return ControllerMetrics(
        experiments=Gauge(
            "batchlab_experiments", "Experiments known to the controller, by state.",
            ["state"], registry=r,
        ),
        trials=Gauge(
            "batchlab_trials",
            "Trials per experiment by state and outcome (outcome 'none' until a trial ends).",
            ["experiment", "state", "outcome"], registry=r,
        ),
        queue_depth=Gauge(
            "batchlab_queue_depth", "Runs waiting for a free trainer.", registry=r,
        ),
        trainers=Gauge(
            "batchlab_trainers", "Trainer actors the controller holds, by state (idle, busy).",
            ["state"], registry=r,
        ),
        scheduling_latency=Histogram(
            "batchlab_scheduling_latency_seconds",
            "Time from a run becoming runnable to its start on a trainer.",
            buckets=SCHEDULING_BUCKETS, registry=r,
        ),
        runs_finished=Counter(
            "batchlab_trial_runs_finished_total",
            "Runs (attempts of trials) that reached a terminal outcome, by experiment and outcome.",
            ["experiment", "outcome"], registry=r,
        ),
        divergences=Counter(
            "batchlab_trial_divergences_total",
            "Runs that diverged (non-finite loss or metric), by experiment.",
            ["experiment"], registry=r,
        ),
        last_progress=Gauge(
            "batchlab_trial_last_progress_timestamp_seconds",
            "Unix time of the last step a running trial reported; removed when it ends.",
            list(TRIAL_LABELS), registry=r,
        ),
        ray_connected=Gauge(
            "batchlab_ray_connected",
            "1 while the controller is connected to its Ray cluster (trainers can run), else 0.",
            registry=r,
        ),
        cluster_resources=Gauge(
            "batchlab_cluster_resources",
            "Resources of the Ray cluster's alive nodes (CPU, GPU, TPU, memory bytes): the "
            "capacity trainers are placed on.",
            ["resource"], registry=r,
        ),
        eval_metric=_trial_eval_metric(r),
    )


# One batchlab_trial_eval_metric per registry, shared by the trainer role (which sets it when
# it evaluates in its own process) and the controller role (when the evaluation service does).
_EVAL_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, Gauge] = weakref.WeakKeyDictionary()


def _trial_eval_metric(r: CollectorRegistry) -> Gauge:
    gauge = _EVAL_METRICS.get(r)
    if gauge is None:
        gauge = Gauge(
            "batchlab_trial_eval_metric",
            "Latest evaluation metric of a running trial, by metric name (validation/accuracy).",
            [*TRIAL_LABELS, "metric"], registry=r,
        )
        _EVAL_METRICS[r] = gauge
    return gauge


def _trainer(r: CollectorRegistry) -> TrainerMetrics:
    return TrainerMetrics(
        steps=Counter(
            "batchlab_trainer_steps_total", "Training steps taken by this trainer.", registry=r,
        ),
        examples=Counter(
            "batchlab_trainer_examples_total", "Training examples processed by this trainer.",
            registry=r,
        ),
        examples_per_second=Gauge(
            "batchlab_trainer_examples_per_second",
            "Training throughput of the last step (examples over step time).", registry=r,
        ),
        step_time=Histogram(
            "batchlab_trainer_step_time_seconds", "Wall time of one training step.",
            buckets=STEP_TIME_BUCKETS, registry=r,
        ),
        trial_step=Gauge(
            "batchlab_trial_step", "Current step of a running trial.", list(TRIAL_LABELS), registry=r,
        ),
        train_loss=Gauge(
            "batchlab_trial_train_loss", "Latest training loss of a running trial.",
            list(TRIAL_LABELS), registry=r,
        ),
        learning_rate=Gauge(
            "batchlab_trial_learning_rate", "Learning rate at the current step of a running trial.",
            list(TRIAL_LABELS), registry=r,
        ),
        eval_metric=_trial_eval_metric(r),
    )


def _sharding(r: CollectorRegistry) -> ShardingMetrics:
    labels = ["dataset", "split"]
    return ShardingMetrics(
        requests=Counter(
            "batchlab_sharding_requests_total", "Shard or batch requests served.", labels, registry=r,
        ),
        examples=Counter(
            "batchlab_sharding_examples_total", "Example indices assigned to shards.", labels, registry=r,
        ),
        errors=Counter(
            "batchlab_sharding_errors_total", "Requests that failed, by dataset and reason.",
            ["dataset", "reason"], registry=r,
        ),
    )


def _checkpoints(r: CollectorRegistry) -> CheckpointMetrics:
    return CheckpointMetrics(
        operations=Counter(
            "batchlab_checkpoint_operations_total",
            "Checkpoint operations (save, restore, delete, list) completed.",
            ["operation"], registry=r,
        ),
        bytes=Counter(
            "batchlab_checkpoint_bytes_total",
            "Checkpoint bytes moved, by operation (save: written, restore: read).",
            ["operation"], registry=r,
        ),
        latency=Histogram(
            "batchlab_checkpoint_operation_seconds", "Time of one checkpoint operation.",
            ["operation"], buckets=IO_BUCKETS, registry=r,
        ),
        failures=Counter(
            "batchlab_checkpoint_failures_total", "Checkpoint operations that failed.",
            ["operation", "reason"], registry=r,
        ),
        store_bytes=Gauge(
            "batchlab_checkpoint_store_bytes", "Bytes the checkpoint store holds on disk.",
            registry=r,
        ),
        store_capacity_bytes=Gauge(
            "batchlab_checkpoint_store_capacity_bytes",
            "Size of the file system the checkpoint store writes to.", registry=r,
        ),
        store_checkpoints=Gauge(
            "batchlab_checkpoint_store_checkpoints", "Checkpoints the store holds.", registry=r,
        ),
    )


def _evaluator(r: CollectorRegistry) -> EvaluatorMetrics:
    return EvaluatorMetrics(
        evaluations=Counter(
            "batchlab_evaluator_evaluations_total", "Evaluations finished, by workload and outcome.",
            ["workload", "outcome"], registry=r,
        ),
        examples=Counter(
            "batchlab_evaluator_examples_total", "Examples evaluated.", ["workload"], registry=r,
        ),
        checkpoint_bytes=Counter(
            "batchlab_evaluator_checkpoint_bytes_total", "Checkpoint bytes read to evaluate.",
            ["workload"], registry=r,
        ),
        latency=Histogram(
            "batchlab_evaluator_evaluation_seconds", "Time of one evaluation pass.",
            ["workload"], buckets=IO_BUCKETS, registry=r,
        ),
        errors=Counter(
            "batchlab_evaluator_errors_total", "Evaluations that failed, by workload and reason.",
            ["workload", "reason"], registry=r,
        ),
    )


# Each role's builder returns its own metrics dataclass: Metrics takes them by keyword.
_BUILDERS: dict[str, Callable[[CollectorRegistry], Any]] = {
    "controller": _controller,
    "sharding": _sharding,
    "checkpoints": _checkpoints,
    "evaluator": _evaluator,
    "trainer": _trainer,
}


def make_metrics(
    registry: CollectorRegistry | None = None, *, roles: Iterable[str] = ROLES
) -> Metrics:
    """Create the metrics of the given roles (and the RPC metrics) on a registry.

    Args:
      registry: where to register. None makes a fresh registry that also exports the process,
        platform and garbage-collector metrics (process_resident_memory_bytes, ...), as the
        default registry would; a given registry gets only batchlab's metrics.
      roles: the roles this process plays (a subset of ROLES). A role's metrics without labels
        would otherwise be exported as zeros by every service.

    Returns:
      A Metrics whose fields for the other roles are None.

    Raises:
      ValueError: for an unknown role, or if the registry already holds these metrics.
    """
    roles = tuple(roles)
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown roles {unknown}; expected some of {list(ROLES)}")
    if registry is None:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    built = {role: _BUILDERS[role](registry) for role in ROLES if role in roles}
    return Metrics(registry=registry, rpc=_rpc(registry), **built)


def series_names(registry: CollectorRegistry) -> dict[str, str]:
    """Every series name a registry can expose, mapped to its metric type.

    Labelled metrics with no children yet expose no samples, so the names are derived from each
    family's type: a counter `x` exposes `x_total`, a histogram `x_bucket`, `x_sum`, `x_count`.
    The `_created` series are left out: queries should not depend on them.
    """
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count", ""),
        "info": ("_info",),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    }
    names: dict[str, str] = {}
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names[family.name + suffix] = family.type
    return names


def metrics_port(role: str, environ: Mapping[str, str] | None = None) -> int:
    """The metrics port of a role: BATCHLAB_METRICS_PORT if set, else METRICS_PORTS[role]."""
    environ = os.environ if environ is None else environ
    value = environ.get("BATCHLAB_METRICS_PORT")
    if value:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"BATCHLAB_METRICS_PORT must be a port number, got {value!r}") from None
    return METRICS_PORTS[role]


@dataclass
class MetricsServer:
    """A running /metrics HTTP server; `port` is the bound port (useful after asking for 0)."""

    port: int
    _httpd: Any
    _thread: threading.Thread

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    port: int, registry: CollectorRegistry, *, addr: str = "127.0.0.1"
) -> MetricsServer:
    """Serve a registry's metrics over HTTP (any path answers; Prometheus scrapes /metrics).

    Args:
      port: the port to listen on; 0 picks a free one (tests).
      registry: the registry to expose, e.g. `make_metrics(...).registry`.
      addr: the address to bind: the process's configured host (BATCHLAB_BIND_HOST; the
        containers bind all interfaces). Loopback unless told otherwise.

    Returns:
      The running server, serving from a daemon thread.
    """
    httpd, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(port=httpd.server_port, _httpd=httpd, _thread=thread)

