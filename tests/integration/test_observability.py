"""The embedded stack scraped by a real Prometheus: every dashboard query and every rule has data.

Starts the whole stack (sharding, checkpoints, evaluator, controller with one Ray trainer) on
free loopback ports, a real Prometheus (Debian's package, installed by `make setup`) scraping
every metrics endpoint and evaluating k8s/components/prometheus/batchlab.rules.yml, runs a
small experiment with a diverging study, exercises the evaluator and a failing checkpoint
upload, then evaluates every query of every Grafana dashboard and every recording rule over
the test's time window (each must return data), and checks that every series an alert rule
reads exists (an alert's own expression is empty while nothing is wrong).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from observability_queries import (
    observability_queries,
    promql_metric_names,
    recording_rule_names,
)

from batchlab.rpc.client import free_ports

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "k8s" / "components" / "prometheus" / "batchlab.rules.yml"
ROLES = ("controller", "sharding", "checkpoints", "evaluator", "trainer")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed (make setup installs it)"),
]

SPEC = {
    "name": "observed",
    "search_seed": 0,
    "trials_per_study": 1,
    "max_total_trials": 2,
    "seeds_per_best": 1,
    "selection": "BEST_VALIDATION_METRIC",
    "workloads": [{
        "workload": "mnist1d_resnet1d_small",
        "target": {"metric": "validation/accuracy", "value": 0.2, "goal": "MAXIMIZE"},
        # Long enough for several scrapes of each running trial's series (1 s interval).
        "points": [{"batch_size": 128, "step_budget": 1000, "eval_every_steps": 50}],
    }],
    "optimizers": [
        # Overflows to inf at once: its trials end DIVERGED (the divergence series need one).
        # Listed first so it runs first and its series are scraped while the rest runs.
        {"name": "diverging", "config": {"optimizer": "nesterov", "learning_rate": 1e38, "momentum": 0.9}},
        {"name": "nesterov", "config": {"optimizer": "nesterov", "learning_rate": 0.05, "momentum": 0.9}},
    ],
}


def _prom_get(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture(scope="module")
def observed_stack(tmp_path_factory):
    from batchlab.client import ExperimentClient, Stack
    from batchlab.search import load_spec

    root = tmp_path_factory.mktemp("observed")
    grpc_ports = dict(zip(["controller", "sharding", "checkpoints", "evaluator"], free_ports(4), strict=True))
    metric_ports = dict(zip(ROLES, free_ports(5), strict=True))
    prom_port = free_ports(1)[0]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": "batchlab",
            "static_configs": [{"targets": [f"127.0.0.1:{metric_ports[r]}"], "labels": {"role": r}} for r in ROLES],
        }],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=open(root / "prometheus.log", "wb"), stderr=subprocess.STDOUT,
    )
    stack = Stack(root / "state", ports=grpc_ports, metrics_ports=metric_ports, num_trainers=1,
                  extra_env={"BATCHLAB_REPORT_INTERVAL_SECONDS": "0.5", "BATCHLAB_RAY_CPUS": "2"})
    start = time.time()
    try:
        stack.up(timeout=180)
        _refused_calls(stack)
        with ExperimentClient(stack.address("controller")) as client:
            exp = client.submit(load_spec(SPEC, validate_optimizers=False))
            deadline = time.time() + 420
            while time.time() < deadline:
                exp = client.get(exp.name)
                if exp.state >= 3:
                    break
                time.sleep(1)
            trials = list(client.trials(exp.name))
        _evaluate_a_trial(stack, trials)
        # Scrapes and rule evaluations run every second, but a rate over a counter needs two
        # samples after the series appears: wait until every dashboard query and recording rule
        # has data (or a minute has passed; the tests then name what has none), instead of a
        # fixed sleep that a fast machine's short experiment outran (8 s failed once here).
        deadline = time.time() + 60
        queries = [q.promql() for q in observability_queries(ROOT) if q.kind != "alert"]
        while time.time() < deadline:
            if all(_range_has_data(prom_port, q, start, time.time()) for q in queries):
                break
            time.sleep(2)
        time.sleep(3)  # a few more scrapes and rule evaluations for the alerts' inputs
        yield {"prom_port": prom_port, "start": start, "end": time.time(), "experiment": exp, "trials": trials}
    finally:
        stack.down()
        prom.terminate()
        prom.wait(timeout=30)


def _refused_calls(stack) -> None:
    """Calls the servers refuse (a corrupt upload, a bad shard request): the error series exist."""
    from batchlab.proto.v1 import (
        checkpoints_pb2,
        checkpoints_pb2_grpc,
        sharding_pb2,
        sharding_pb2_grpc,
    )
    from batchlab.rpc.client import channel

    with channel(stack.address("checkpoints")) as ch:
        header = checkpoints_pb2.CheckpointHeader(trial="experiments/x/studies/s/trials/bad", step=1,
                                                  sha256="0" * 64, size_bytes=3)
        with pytest.raises(grpc.RpcError) as err:
            checkpoints_pb2_grpc.CheckpointServiceStub(ch).SaveCheckpoint(
                iter([checkpoints_pb2.SaveCheckpointRequest(header=header),
                      checkpoints_pb2.SaveCheckpointRequest(data=b"abc")]), timeout=30)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
    with channel(stack.address("sharding")) as ch:
        with pytest.raises(grpc.RpcError) as err:
            sharding_pb2_grpc.ShardingServiceStub(ch).GetShard(sharding_pb2.GetShardRequest(
                dataset="mnist2d", split="train", shard_count=1), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _evaluate_a_trial(stack, trials) -> None:
    """The evaluation service evaluates a finished trial's stored checkpoint."""
    from batchlab.proto.v1 import evaluation_pb2, evaluation_pb2_grpc
    from batchlab.rpc.checkpoint_client import CheckpointClient
    from batchlab.rpc.client import channel

    done = [t for t in trials if t.outcome == 1]
    assert done, "no trial succeeded"
    trial = done[0]
    with channel(stack.address("checkpoints")) as ch:
        assert CheckpointClient(ch).list(trial.name), "the trainer uploaded no checkpoint"
    with channel(stack.address("evaluator")) as ch:
        response = evaluation_pb2_grpc.EvaluationServiceStub(ch).Evaluate(evaluation_pb2.EvaluateRequest(
            trial=trial.name, workload="mnist1d_resnet1d_small", hyperparameters=trial.hyperparameters,
            batch_size=128, step_budget=1000), timeout=300)
    assert 0.0 <= response.metrics["validation/accuracy"] <= 1.0
    assert trial.final_metrics["validation/accuracy"] == pytest.approx(response.metrics["validation/accuracy"], abs=1e-6)


def test_experiment_completed_with_a_diverged_study(observed_stack):
    exp = observed_stack["experiment"]
    assert exp.state == 3, exp  # SUCCEEDED
    outcomes = {t.outcome for t in observed_stack["trials"]}
    assert 2 in outcomes  # DIVERGED


def _range_has_data(port: int, expr: str, start: float, end: float) -> bool:
    data = _prom_get(port, "/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1")
    return any(series["values"] for series in data["result"])


def test_every_dashboard_query_and_recording_rule_returns_data(observed_stack):
    port, start, end = observed_stack["prom_port"], observed_stack["start"], observed_stack["end"]
    queries = [q for q in observability_queries(ROOT) if q.kind != "alert"]
    assert len(queries) > 40
    empty = [f"{q.source}: {q.promql()}" for q in queries if not _range_has_data(port, q.promql(), start, end)]
    codes = _prom_get(port, "/api/v1/query_range", query='sum by (service, method, code) (batchlab_rpc_requests_total{code!="OK"})',
                      start=f"{start:.3f}", end=f"{end:.3f}", step="5")["result"]
    assert not empty, "queries without data:\n" + "\n".join(empty) + f"\nnon-OK RPCs seen: {[c['metric'] for c in codes]}"


def test_every_series_an_alert_reads_exists_and_alerts_evaluate(observed_stack):
    port, start, end = observed_stack["prom_port"], observed_stack["start"], observed_stack["end"]
    alerts = [q for q in observability_queries(ROOT) if q.kind == "alert"]
    assert len(alerts) >= 5
    records = recording_rule_names(RULES)
    missing = []
    for q in alerts:
        _prom_get(port, "/api/v1/query", query=q.promql(), time=f"{end:.3f}")  # evaluates without error
        for name in sorted(promql_metric_names(q.expr)):
            selector = name if name in records else f'{{__name__="{name}"}}'
            if not _range_has_data(port, selector, start, end):
                missing.append(f"{q.source}: {name}")
    assert not missing, "alert inputs without data:\n" + "\n".join(missing)
    # Prometheus loaded and evaluates every rule group without errors.
    groups = _prom_get(port, "/api/v1/rules")["groups"]
    assert groups and all(rule.get("health") == "ok" for g in groups for rule in g["rules"]), groups
