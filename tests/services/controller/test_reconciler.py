"""The Experiment reconciler against a real controller (gRPC on loopback, fake trainer pool) and
an in-memory Kubernetes API (kube_fake) that the tests drive as kubectl would: create, edit,
delete. No API server runs here; kube_fake keeps the API server rules the reconciler relies on
(resource versions, generations, the status subresource, finalizers, schema validation)."""

from __future__ import annotations

import copy
from pathlib import Path

import grpc
import pytest
import yaml
from controller_fakes import WORKLOAD, FakePool, fake_result, spec_dict
from kube_fake import FakeCustomObjects
from kubernetes.client.exceptions import ApiException

from batchlab.client.experiments import ExperimentClient
from batchlab.proto import crd
from batchlab.proto.v1 import controller_pb2
from services.controller.reconciler import (
    REJECTED,
    REQUEST_ID_PREFIX,
    ExperimentReconciler,
    ReconcilerConfig,
)
from services.controller.server import Controller, ControllerConfig
from services.controller.storage import InMemoryStorage

REPO_ROOT = Path(__file__).resolve().parents[3]
NAMESPACE = "batchlab"
State = controller_pb2.Experiment.State


@pytest.fixture(scope="module")
def experiment_crd():
    return yaml.safe_load((REPO_ROOT / "k8s" / "base" / "experiment-crd.yaml").read_text())


class World:
    """A controller serving on loopback, its client, the fake API and a reconciler."""

    def __init__(self, tmp_path: Path, experiment_crd: dict):
        self.pool = FakePool(size=4)
        self.results = tmp_path / "results"
        config = ControllerConfig(port=0, metrics_port=None, state_dir=str(tmp_path / "state"),
                                  workloads=(WORKLOAD,), results_dir=str(self.results),
                                  poll_interval_s=0.05)
        self.controller = Controller(config, storage=InMemoryStorage(), pool=self.pool)
        # The scheduler is ticked by the tests (deterministic); only the server runs.
        self.controller.server.start()
        self.client = ExperimentClient(self.controller.address, token="")
        self.kube = FakeCustomObjects(experiment_crd)
        self.reconciler = ExperimentReconciler(
            self.kube, self.client,
            ReconcilerConfig(namespace=NAMESPACE, results_dir=str(self.results)),
            now=lambda: "2026-01-01T00:00:00Z")

    def apply(self, name: str, spec: dict) -> dict:
        return self.kube.create(NAMESPACE, crd.experiment_manifest(spec, name=name))

    def status(self, name: str) -> dict:
        return (self.kube.get(NAMESPACE, name) or {}).get("status") or {}

    def run_to_end(self, experiment: str, ticks: int = 60) -> controller_pb2.Experiment:
        for _ in range(ticks):
            self.controller.scheduler.tick()
            current = self.client.get(experiment)
            if current.state not in (State.PENDING, State.RUNNING):
                return current
        raise AssertionError(f"{experiment} did not end")

    def close(self) -> None:
        self.client.close()
        self.controller.server.stop(0)


@pytest.fixture
def world(tmp_path, experiment_crd):
    w = World(tmp_path, experiment_crd)
    yield w
    w.close()


def test_new_experiment_is_submitted_once_with_the_uid_as_request_id(world):
    obj = world.apply("tiny", spec_dict())
    assert world.reconciler.sync() == 1
    world.reconciler.sync()  # a second pass submits nothing new
    experiments = list(world.client.list())
    assert len(experiments) == 1
    assert experiments[0].request_id == REQUEST_ID_PREFIX + obj["metadata"]["uid"]
    stored = world.kube.get(NAMESPACE, "tiny")
    assert crd.FINALIZER in stored["metadata"]["finalizers"]
    status = stored["status"]
    assert status["experiment"] == experiments[0].name
    assert status["state"] in ("PENDING", "RUNNING")
    assert status["observedGeneration"] == 1


def test_a_reconciler_that_died_before_writing_status_gets_the_same_experiment(world):
    obj = world.apply("tiny", spec_dict())
    # What a crash between Submit and the status write leaves: a submitted experiment.
    first = world.client.submit(_spec(spec_dict()),
                                request_id=REQUEST_ID_PREFIX + obj["metadata"]["uid"])
    world.reconciler.sync()
    assert world.status("tiny")["experiment"] == first.name
    assert len(list(world.client.list())) == 1


def test_status_follows_the_run_to_success_with_counts_best_and_report(world):
    world.apply("tiny", spec_dict())
    world.reconciler.sync()
    name = world.status("tiny")["experiment"]
    final = world.run_to_end(name)
    assert final.state == State.SUCCEEDED
    world.reconciler.sync()
    status = world.status("tiny")
    assert status["state"] == "SUCCEEDED"
    counts = {f.name: getattr(final.trial_counts, f.name)
              for f in final.trial_counts.DESCRIPTOR.fields}
    assert status["trials"] == {**counts, "total": sum(counts.values())}
    assert status["trials"]["succeeded"] >= 1
    # Best so far: the fake pool's reference results, best accuracy among succeeded runs.
    results = [fake_result(r) for r in world.pool.started]
    expected = max(r["final_metrics"]["validation/accuracy"] for r in results
                   if r["outcome"] == "SUCCEEDED")
    (best,) = status["best"]
    assert best["workload"] == WORKLOAD and best["goal"] == "MAXIMIZE"
    assert best["metric"] == "validation/accuracy"
    assert best["value"] == pytest.approx(expected)
    assert status["bestSoFar"].startswith(f"validation/accuracy={expected:.4g} (")
    # The controller wrote the report where the status says.
    experiment_id = name.split("/", 1)[1]
    report = Path(status["report"]["path"])
    assert report == world.results / experiment_id / "report" / "report.md"
    assert report.read_text().startswith("# Optimizer comparison")
    assert status["report"]["command"].startswith(f"batchlab report {name}")


def test_status_says_why_the_runs_wait_and_drops_it_when_they_stop_waiting(world):
    world.apply("tiny", spec_dict())
    world.reconciler.sync()
    experiment = world.client.get(world.status("tiny")["experiment"])
    experiment.pending_reason = "waiting for a v5p-256 slice to scale up"
    status: dict = {}
    world.reconciler._describe(experiment, status)
    assert status["waiting"] == "waiting for a v5p-256 slice to scale up"
    experiment.pending_reason = ""
    world.reconciler._describe(experiment, status)
    assert "waiting" not in status


def test_status_is_written_only_when_it_changes(world):
    world.apply("tiny", spec_dict())
    world.reconciler.sync()
    writes = world.kube.calls.count(("experiments/status", "patch"))
    world.reconciler.sync()
    assert world.kube.calls.count(("experiments/status", "patch")) == writes


def test_delete_cancels_the_run_then_releases_the_object(world):
    world.apply("tiny", spec_dict())
    world.reconciler.sync()
    name = world.status("tiny")["experiment"]
    world.pool.hold = True  # trials stay running
    world.controller.scheduler.tick()
    assert world.client.get(name).state == State.RUNNING
    world.kube.delete(NAMESPACE, "tiny")
    assert world.kube.get(NAMESPACE, "tiny")["metadata"]["deletionTimestamp"]
    world.reconciler.sync()
    assert world.client.get(name).state == State.CANCELLED
    assert world.kube.get(NAMESPACE, "tiny") is None


def test_delete_before_the_status_was_written_still_cancels(world):
    obj = world.apply("tiny", spec_dict())
    world.reconciler.sync()
    name = world.status("tiny")["experiment"]
    # The status write was lost (e.g. the API server was away): only the finalizer is there.
    world.kube.patch_namespaced_custom_object_status(
        crd.GROUP, crd.VERSION, NAMESPACE, crd.PLURAL, "tiny",
        {"status": {k: None for k in world.status("tiny")}})
    assert world.kube.get(NAMESPACE, "tiny").get("status") in (None, {})
    world.kube.delete(NAMESPACE, "tiny")
    world.reconciler.sync()
    assert world.client.get(name).state == State.CANCELLED
    assert world.client.get(name).request_id == REQUEST_ID_PREFIX + obj["metadata"]["uid"]
    assert world.kube.get(NAMESPACE, "tiny") is None


def test_delete_of_a_finished_experiment_just_releases_it(world):
    world.apply("tiny", spec_dict())
    world.reconciler.sync()
    name = world.status("tiny")["experiment"]
    world.run_to_end(name)
    world.kube.delete(NAMESPACE, "tiny")
    world.reconciler.sync()
    assert world.client.get(name).state == State.SUCCEEDED
    assert world.kube.get(NAMESPACE, "tiny") is None


def test_a_spec_the_controller_refuses_is_rejected_naming_the_field(world):
    bad = spec_dict()
    bad["workloads"][0]["workload"] = "no_such_workload"
    world.apply("bad", bad)
    world.reconciler.sync()
    status = world.status("bad")
    assert status["state"] == REJECTED
    assert "spec.workloads[0].workload" in status["message"]
    assert "experiment" not in status
    assert list(world.client.list()) == []
    # The same generation is not submitted again...
    calls = len(world.kube.calls)
    world.reconciler.sync()
    assert world.status("bad")["state"] == REJECTED
    assert ("experiments/status", "patch") not in world.kube.calls[calls:]
    # ...but a corrected spec is.
    world.kube.update_spec(NAMESPACE, "bad", spec_dict())
    world.reconciler.sync()
    status = world.status("bad")
    assert status["state"] in ("PENDING", "RUNNING") and status["observedGeneration"] == 2
    assert "message" not in status


def test_a_malformed_spec_is_refused_by_the_crd_schema_before_the_controller(world):
    for change, path in (({"trials_per_study": "four"}, "spec/trials_per_study"),
                         ({"selection": "BEST"}, "spec/selection"),
                         ({"optimisers": []}, "spec"),
                         ({"resources": {"gpus": -1}}, "spec/resources/gpus")):
        bad = spec_dict(**change)
        with pytest.raises(ApiException) as info:
            world.apply("bad", bad)
        assert info.value.status == 422 and path in info.value.reason, (change, info.value.reason)
    assert world.reconciler.sync() == 0


def test_a_spec_the_json_mapping_cannot_read_is_rejected(world, experiment_crd):
    # Without the schema (an API server with an older CRD), the reconciler still refuses it.
    world.kube = FakeCustomObjects(None)
    world.reconciler.api = world.kube
    world.apply("odd", spec_dict(optimisers=[]))
    world.reconciler.sync()
    status = world.status("odd")
    assert status["state"] == REJECTED and "optimisers" in status["message"]


def test_spec_edits_after_submission_are_reported_not_applied(world):
    world.apply("tiny", spec_dict())
    world.reconciler.sync()
    name = world.status("tiny")["experiment"]
    world.kube.update_spec(NAMESPACE, "tiny", spec_dict(search_seed=99))
    world.reconciler.sync()
    status = world.status("tiny")
    assert status["experiment"] == name and status["observedGeneration"] == 1
    assert "delete this Experiment and create a new one" in status["message"]
    assert len(list(world.client.list())) == 1


def test_an_unreachable_controller_defers_instead_of_rejecting(world, tmp_path, experiment_crd):
    down = ExperimentClient("127.0.0.1:1", token="", timeout=2.0)
    reconciler = ExperimentReconciler(world.kube, down, ReconcilerConfig(namespace=NAMESPACE))
    world.apply("tiny", spec_dict())
    reconciler.sync()
    status = world.status("tiny")
    assert "state" not in status and status["message"].startswith("waiting for the controller")
    down.close()
    world.reconciler.sync()  # the controller is back
    assert world.status("tiny")["state"] in ("PENDING", "RUNNING")


def test_a_concurrent_writer_makes_the_finalizer_patch_conflict_and_retry(world):
    world.apply("tiny", spec_dict())
    listed = world.kube.list_namespaced_custom_object(crd.GROUP, crd.VERSION, NAMESPACE,
                                                      crd.PLURAL)["items"]
    # Someone else writes the object after the reconciler listed it.
    world.kube.patch_namespaced_custom_object(crd.GROUP, crd.VERSION, NAMESPACE, crd.PLURAL,
                                              "tiny", {"metadata": {"labels": {"x": "y"}}})
    with pytest.raises(ApiException) as info:
        world.reconciler.reconcile(listed[0])
    assert info.value.status == 409
    assert list(world.client.list()) == []  # nothing submitted on a stale read
    world.reconciler.sync()
    assert world.status("tiny")["experiment"]


def test_the_rbac_role_grants_exactly_what_the_reconciler_calls(world):
    world.apply("tiny", spec_dict())
    world.reconciler.sync()
    name = world.status("tiny")["experiment"]
    world.run_to_end(name)
    world.reconciler.sync()
    world.kube.delete(NAMESPACE, "tiny")
    world.reconciler.sync()
    used = set(world.kube.calls)
    roles = [d for d in yaml.safe_load_all((REPO_ROOT / "k8s/base/rbac.yaml").read_text())
             if d and d["kind"] == "Role"]
    (role,) = roles
    granted = {(resource, verb) for rule in role["rules"] if crd.GROUP in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert used == granted, f"calls {sorted(used)} vs Role {sorted(granted)}"


def test_config_from_env():
    assert ReconcilerConfig.from_env({}) is None
    assert ReconcilerConfig.from_env({"BATCHLAB_RECONCILE_EXPERIMENTS": "false"}) is None
    config = ReconcilerConfig.from_env({
        "BATCHLAB_RECONCILE_EXPERIMENTS": "true", "BATCHLAB_NAMESPACE": "lab",
        "BATCHLAB_RECONCILE_INTERVAL_SECONDS": "2.5", "BATCHLAB_RESULTS_DIR": "/r"})
    assert config == ReconcilerConfig(namespace="lab", interval_s=2.5, results_dir="/r")
    with pytest.raises(ValueError, match="BATCHLAB_RECONCILE_INTERVAL_SECONDS"):
        ReconcilerConfig.from_env({"BATCHLAB_RECONCILE_EXPERIMENTS": "1",
                                   "BATCHLAB_NAMESPACE": "lab",
                                   "BATCHLAB_RECONCILE_INTERVAL_SECONDS": "soon"})


def _spec(data: dict):
    from google.protobuf import json_format

    from batchlab.proto.v1 import experiment_pb2

    return json_format.ParseDict(copy.deepcopy(data), experiment_pb2.ExperimentSpec())


def test_grpc_errors_other_than_refusals_are_not_rejections(world):
    class Flaky:
        def __init__(self, inner):
            self.inner = inner

        def submit(self, spec, request_id):
            error = grpc.RpcError()
            error.code = lambda: grpc.StatusCode.DEADLINE_EXCEEDED
            error.details = lambda: "deadline"
            raise error

    reconciler = ExperimentReconciler(world.kube, Flaky(world.client),
                                      ReconcilerConfig(namespace=NAMESPACE))
    world.apply("tiny", spec_dict())
    reconciler.sync()
    assert world.status("tiny")["message"] == "waiting for the controller: deadline"


def test_start_is_off_by_default_and_needs_a_pod(monkeypatch):
    from kubernetes.config import ConfigException

    from services.controller.reconciler import start_experiment_reconciler

    assert start_experiment_reconciler("127.0.0.1:1", environ={}) is None
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigException):
        start_experiment_reconciler("127.0.0.1:1", environ={
            "BATCHLAB_RECONCILE_EXPERIMENTS": "true", "BATCHLAB_NAMESPACE": "lab"})
