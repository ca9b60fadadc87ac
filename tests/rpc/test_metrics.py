"""batchlab.rpc.metrics: names follow Prometheus' conventions, roles get only their metrics, and a
finished trial's series go away."""

from __future__ import annotations

import math
import re
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from batchlab.rpc.metrics import (
    METRICS_PORTS,
    ROLES,
    TRIAL_LABELS,
    make_metrics,
    metrics_port,
    series_names,
    start_metrics_server,
)

NAME = re.compile(r"batchlab_[a-z][a-z0-9_]*[a-z0-9]")
LABEL = re.compile(r"[a-z][a-z0-9_]*")
# Unit words that are not base units (Prometheus wants seconds and bytes).
NOT_BASE_UNITS = re.compile(r"_(milli|micro|nano)?(ms|us|ns|millis|minutes|hours|days|kb|mb|gb|kib|mib|gib|percent)(_|$)")


def families(registry: CollectorRegistry) -> list:
    return [f for f in registry.collect() if f.name.startswith("batchlab_")]


def exposed(registry: CollectorRegistry) -> dict[str, list]:
    """Series name -> samples, parsed back from the text exposition format."""
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_names_follow_prometheus_conventions():
    registry = CollectorRegistry()
    make_metrics(registry)
    found = families(registry)
    assert len(found) >= 30
    for family in found:
        # prometheus_client keeps a counter's name without its _total in the family.
        full = family.name + ("_total" if family.type == "counter" else "")
        assert NAME.fullmatch(full), full
        assert not NOT_BASE_UNITS.search(full), f"{full}: use base units (seconds, bytes)"
        assert family.documentation.strip(), f"{full}: no help text"
        if family.type == "counter":
            assert not family.name.endswith("_total")  # i.e. it was declared once with _total
        else:
            assert not full.endswith("_total"), f"{full}: only counters end in _total"
        if family.type == "histogram":
            assert full.endswith(("_seconds", "_bytes")), f"{full}: histograms carry a unit"
        if "timestamp" in full:
            assert full.endswith("_timestamp_seconds"), full


def test_label_names_are_bounded_and_valid():
    registry = CollectorRegistry()
    metrics = make_metrics(registry)
    for name, collector in registry._names_to_collectors.items():  # noqa: SLF001
        if not name.startswith("batchlab_"):
            continue
        for label in getattr(collector, "_labelnames", ()):
            assert LABEL.fullmatch(label) and not label.startswith("__"), (name, label)
            # Unbounded identifiers are allowed only on the per-trial series, which are removed.
            if label in ("trial", "study"):
                assert name.startswith("batchlab_trial_"), (name, label)
    assert tuple(metrics.trainer.train_loss._labelnames) == TRIAL_LABELS  # noqa: SLF001


def test_the_issue_names_are_defined():
    names = set(series_names(make_metrics(CollectorRegistry()).registry))
    for name in (
        "batchlab_experiments", "batchlab_trials", "batchlab_queue_depth",
        "batchlab_scheduling_latency_seconds_bucket", "batchlab_rpc_requests_total",
        "batchlab_rpc_latency_seconds_bucket", "batchlab_trainer_steps_total",
        "batchlab_trainer_examples_per_second", "batchlab_trainer_step_time_seconds_bucket",
        "batchlab_trial_train_loss", "batchlab_trial_learning_rate", "batchlab_trial_eval_metric",
        "batchlab_checkpoint_store_bytes", "batchlab_trial_divergences_total",
        "batchlab_checkpoint_failures_total", "batchlab_trial_last_progress_timestamp_seconds",
        "batchlab_sharding_examples_total", "batchlab_evaluator_evaluations_total",
    ):
        assert name in names, name


def test_fresh_registries_are_independent_and_a_registry_takes_one_set():
    first, second = make_metrics(CollectorRegistry()), make_metrics(CollectorRegistry())
    first.rpc.observe("batchlab.v1.Controller", "GetExperiment", "OK", 0.01)
    assert "batchlab_rpc_requests_total" not in exposed(second.registry)
    with pytest.raises(ValueError, match="Duplicated"):
        make_metrics(first.registry)


def test_default_registry_includes_process_metrics():
    names = series_names(make_metrics().registry)
    assert "process_resident_memory_bytes" in names
    assert "batchlab_rpc_requests_total" in names


def test_roles_get_only_their_metrics():
    metrics = make_metrics(CollectorRegistry(), roles=["sharding"])
    assert metrics.sharding is not None and metrics.controller is None and metrics.trainer is None
    names = set(series_names(metrics.registry))
    assert "batchlab_sharding_examples_total" in names and "batchlab_rpc_requests_total" in names
    # An unlabelled controller gauge would otherwise be exported as 0 by every service.
    assert "batchlab_queue_depth" not in names
    with pytest.raises(ValueError, match="unknown roles"):
        make_metrics(CollectorRegistry(), roles=["controller", "scheduler"])
    # Each role adds series of its own to the common RPC ones; two roles share only the
    # evaluation gauge (set by the trainer evaluating in process, or the controller relaying
    # the evaluation service's points).
    common = set(series_names(make_metrics(CollectorRegistry(), roles=[]).registry))
    own = {role: set(series_names(make_metrics(CollectorRegistry(), roles=[role]).registry)) - common
           for role in ROLES}
    assert all(own.values()), own
    shared = {name for a in ROLES for b in ROLES if a < b for name in own[a] & own[b]}
    assert shared == {"batchlab_trial_eval_metric"}
    assert "batchlab_trial_eval_metric" in own["controller"] & own["trainer"]


def test_rpc_observe_accepts_status_codes_and_names():
    import grpc

    metrics = make_metrics(CollectorRegistry(), roles=[])
    metrics.rpc.observe("batchlab.v1.Sharding", "ReadBatch", grpc.StatusCode.NOT_FOUND, 0.002)
    metrics.rpc.observe("batchlab.v1.Sharding", "ReadBatch", "OK", 0.001)
    samples = exposed(metrics.registry)
    codes = {s.labels["code"]: s.value for s in samples["batchlab_rpc_requests_total"]}
    assert codes == {"NOT_FOUND": 1.0, "OK": 1.0}
    (count,) = samples["batchlab_rpc_latency_seconds_count"]
    assert count.value == 2 and count.labels == {"service": "batchlab.v1.Sharding", "method": "ReadBatch"}


def test_a_finished_trial_loses_all_its_series():
    metrics = make_metrics(CollectorRegistry(), roles=["trainer"])
    running = metrics.trainer.trial("minimal", "mnist1d.nesterov.b128.s200", "3")
    other = metrics.trainer.trial("minimal", "mnist1d.nesterov.b128.s200", "4")
    for trial in (running, other):
        trial.report_train(step=20, loss=0.7, learning_rate=0.1)
        trial.report_eval({"validation/accuracy": 0.61, "validation/loss": 0.9})
    per_trial = ("batchlab_trial_step", "batchlab_trial_train_loss",
                 "batchlab_trial_learning_rate", "batchlab_trial_eval_metric")
    before = exposed(metrics.registry)
    assert all(len(before[name]) == (4 if name.endswith("eval_metric") else 2) for name in per_trial)

    running.remove()

    after = exposed(metrics.registry)
    for name in per_trial:
        trials = {s.labels["trial"] for s in after.get(name, ())}
        assert trials == {"4"}, name
    # Removing again, or a trial never seen, is harmless.
    running.remove()
    metrics.trainer.remove_trial("other", "study", "1")
    other.remove()
    assert not any(exposed(metrics.registry).get(name) for name in per_trial)


def test_diverged_values_are_exported_as_they_are():
    metrics = make_metrics(CollectorRegistry(), roles=["trainer"])
    metrics.trainer.trial("e", "s", "1").report_train(step=5, loss=math.nan, learning_rate=10.0)
    (loss,) = exposed(metrics.registry)["batchlab_trial_train_loss"]
    assert math.isnan(loss.value)


def test_trainer_step_accounting():
    metrics = make_metrics(CollectorRegistry(), roles=["trainer"])
    metrics.trainer.observe_step(0.5, examples=256)
    metrics.trainer.observe_step(0.0, examples=256)  # a zero duration leaves the rate alone
    samples = exposed(metrics.registry)
    assert samples["batchlab_trainer_steps_total"][0].value == 2
    assert samples["batchlab_trainer_examples_total"][0].value == 512
    assert samples["batchlab_trainer_examples_per_second"][0].value == 512.0


def test_controller_progress_and_trial_counts():
    metrics = make_metrics(CollectorRegistry(), roles=["controller"])
    controller = metrics.controller
    controller.record_progress("e", "s", "1", when=1000.0)
    controller.record_progress("e", "s", "2")
    controller.set_trial_counts("e", {("RUNNING", "none"): 2, ("COMPLETED", "DIVERGED"): 1})
    controller.set_trial_counts("e", {("RUNNING", "none"): 1, ("COMPLETED", "SUCCEEDED"): 2})
    controller.set_trial_counts("f", {("PENDING", "none"): 5})
    samples = exposed(metrics.registry)
    trials = {(s.labels["experiment"], s.labels["state"], s.labels["outcome"]): s.value
              for s in samples["batchlab_trials"]}
    # The second report for "e" replaced the first: no stale DIVERGED count is left behind.
    assert trials == {("e", "RUNNING", "none"): 1, ("e", "COMPLETED", "SUCCEEDED"): 2,
                      ("f", "PENDING", "none"): 5}
    progress = {s.labels["trial"]: s.value
                for s in samples["batchlab_trial_last_progress_timestamp_seconds"]}
    assert progress["1"] == 1000.0 and progress["2"] > 1e9

    controller.end_trial("e", "s", "1")
    assert {s.labels["trial"] for s in
            exposed(metrics.registry)["batchlab_trial_last_progress_timestamp_seconds"]} == {"2"}
    controller.divergences.labels(experiment="e").inc()
    controller.forget_experiment("e")
    after = exposed(metrics.registry)
    assert {s.labels["experiment"] for s in after["batchlab_trials"]} == {"f"}
    assert not after.get("batchlab_trial_last_progress_timestamp_seconds")
    assert not after.get("batchlab_trial_divergences_total")


def test_metrics_server_serves_the_registry():
    metrics = make_metrics(CollectorRegistry(), roles=["checkpoints"])
    metrics.checkpoints.store_bytes.set(3 * 2**30)
    server = start_metrics_server(0, metrics.registry, addr="127.0.0.1")
    try:
        assert server.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            body = r.read().decode()
        assert "batchlab_checkpoint_store_bytes 3.221225472e+09" in body
    finally:
        server.close()


def test_metrics_port_per_role_and_from_the_environment():
    assert METRICS_PORTS == {"controller": 9101, "sharding": 9102, "checkpoints": 9103,
                             "evaluator": 9104, "trainer": 9110}
    assert metrics_port("sharding", environ={}) == 9102
    assert metrics_port("sharding", environ={"BATCHLAB_METRICS_PORT": "9200"}) == 9200
    with pytest.raises(ValueError, match="BATCHLAB_METRICS_PORT"):
        metrics_port("sharding", environ={"BATCHLAB_METRICS_PORT": "ninety"})
