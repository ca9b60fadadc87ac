"""Every trainer actor of a Ray worker pod reaches Prometheus through the pod's one metrics port:
two real TrainerWorkers write their registries to the shared folder, the sidecar's collector
serves both (told apart by the `actor` label), and an actor's series leave when it stops or
dies."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from batchlab.rpc.metrics import start_metrics_server
from services.trainer.actor import TrainerWorker
from services.trainer.metrics_exporter import METRICS_DIR_ENV, TrainerFilesCollector


def _serve(directory, **kwargs):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TrainerFilesCollector(directory, **kwargs))
    return start_metrics_server(0, registry, addr="127.0.0.1")


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def _samples(text: str, name: str) -> dict[str, float]:
    """value of each sample `name` by its actor label."""
    return {s.labels["actor"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


@pytest.fixture
def workers(tmp_path, monkeypatch):
    shared = tmp_path / "metrics"
    monkeypatch.setenv(METRICS_DIR_ENV, str(shared))
    made = [TrainerWorker({"name": f"t{i}", "metrics_port": 9110, "work_dir": str(tmp_path / f"w{i}"),
                           "jax_cache_dir": str(tmp_path / "cache")}) for i in range(2)]
    yield shared, made
    for worker in made:
        worker.shutdown()


def test_every_actor_of_a_pod_is_served_on_one_port(workers):
    shared, (first, second) = workers
    # With the shared folder, no actor binds a port of its own (none would be scraped).
    assert first.info()["metrics_port"] is None and second.info()["metrics_port"] is None
    for worker, (trial, step) in zip((first, second), (("0-r0", 10.0), ("1-r0", 30.0)), strict=True):
        series = worker._metrics.trainer.trial("e", "s", trial)
        worker._observe(series, {"step": step, "learning_rate": 0.1, "train/batch_loss": 2.0,
                                 "validation/accuracy": 0.5}, {"step": 0, "time": 0.0}, 32)
        worker._metrics_writer.write()
    server = _serve(shared)
    try:
        text = _scrape(server.port)
        steps = _samples(text, "batchlab_trial_step")
        assert sorted(steps.values()) == [10.0, 30.0]
        assert len(steps) == 2  # one actor label each
        # Series the two processes share by name stay apart (no duplicate samples).
        assert len(_samples(text, "process_resident_memory_bytes")) == 2
        assert sorted(_samples(text, "batchlab_trainer_steps_total").values()) == [10.0, 30.0]
        # An actor that stops removes its series from the pod's endpoint.
        second.shutdown()
        assert sorted(_samples(_scrape(server.port), "batchlab_trial_step").values()) == [10.0]
    finally:
        server.close()


def test_an_actor_that_died_is_dropped_after_the_stale_time(workers):
    shared, (first, _) = workers
    first._metrics_writer.write()
    clock = {"now": 0.0}
    collector = TrainerFilesCollector(shared, stale_s=60.0, clock=lambda: clock["now"])
    mtime = max(p.stat().st_mtime for p in shared.glob("*.prom"))
    clock["now"] = mtime + 30
    assert {m.name for m in collector.collect()} >= {"batchlab_trainer_steps"}
    clock["now"] = mtime + 61
    assert list(collector.collect()) == []


def test_an_unreadable_file_is_skipped(tmp_path):
    (tmp_path / "broken.prom").write_text("this is { not an exposition\n")
    (tmp_path / "ok.prom").write_text("# TYPE up gauge\nup 1.0\n")
    families = list(TrainerFilesCollector(tmp_path).collect())
    assert [(s.name, s.labels, s.value) for f in families for s in f.samples] == [
        ("up", {"actor": "ok"}, 1.0)]


def test_the_merged_exposition_passes_promtool(workers, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/ensure_prometheus.sh installs it)")
    shared, workers_ = workers
    for worker in workers_:
        worker._metrics_writer.write()
    server = _serve(shared)
    try:
        text = _scrape(server.port)
    finally:
        server.close()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=60, check=False)
    # promtool exits 3 for naming lint only; a malformed exposition (e.g. a family twice) is 1.
    assert result.returncode in (0, 3), result.stdout + result.stderr
    assert "error" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr
