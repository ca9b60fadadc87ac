"""Experiments as Kubernetes resources: the controller's reconciler for batchlab.io/v1 Experiment.

`kubectl apply -f` of an Experiment (its spec is an ExperimentSpec, see batchlab.proto.crd)
submits it here; `kubectl get experiments` shows its progress; `kubectl delete` cancels it.
The reconciler runs inside the controller, level-triggered: every `interval_s` it lists the
namespace's Experiments and, for each one,

1. adds the finalizer `batchlab.io/cancel-on-delete` (before submitting, so that a deletion
   right after the submission still cancels the run);
2. submits the spec once through the controller's own gRPC API (ExperimentService), with the
   object's uid as the idempotency key (request_id `k8s-<uid>`): a reconciler that dies between
   submitting and writing the status submits again and gets the same experiment back;
3. writes the status back: the controller's state and resource name, trials by state and
   outcome, the best value of each workload's target metric among finished trials, and once the
   experiment has ended, where its report is (the controller writes it under
   BATCHLAB_RESULTS_DIR). A spec the controller refuses is REJECTED with the controller's
   message, which names the offending field;
4. on deletion, cancels the experiment if it still runs, then removes the finalizer.

Experiments are immutable once submitted: editing the spec of a submitted Experiment changes
nothing (the status says so); delete it and create a new one. A REJECTED spec is submitted
again when it is edited (a new metadata.generation).

It talks to the API server with the `kubernetes` package's CustomObjectsApi (list, patch, patch
status: exactly what k8s/base/rbac.yaml grants) and to the controller with
batchlab.client.ExperimentClient. Both are injected, so tests drive it with an in-memory API.

Environment (`ReconcilerConfig.from_env`):
  BATCHLAB_RECONCILE_EXPERIMENTS: "true" to run it (off by default: outside a cluster there is
    no API server to reconcile against).
  BATCHLAB_NAMESPACE: the namespace whose Experiments it reconciles (default: the pod's own,
    from its service account).
  BATCHLAB_RECONCILE_INTERVAL_SECONDS: seconds between passes (default 5).
  BATCHLAB_RESULTS_DIR: the controller's results folder, where reports are written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format

from batchlab.proto import crd
from batchlab.proto.v1 import common_pb2, controller_pb2, experiment_pb2

if TYPE_CHECKING:
    from batchlab.client.experiments import ExperimentClient

__all__ = ["ExperimentReconciler", "ReconcilerConfig", "start_experiment_reconciler"]

log = logging.getLogger(__name__)

REQUEST_ID_PREFIX = "k8s-"
#: The state of an Experiment whose spec the controller (or the JSON mapping) refused.
REJECTED = "REJECTED"
_TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_TRUE = {"1", "true", "yes", "on"}
# Errors that mean "try again later" rather than "this spec is wrong".
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
              grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
              grpc.StatusCode.UNAUTHENTICATED}


@dataclasses.dataclass(frozen=True)
class ReconcilerConfig:
    """Where and how often to reconcile.

    Args:
      namespace: the namespace whose Experiments are reconciled.
      interval_s: seconds between passes.
      results_dir: the controller's BATCHLAB_RESULTS_DIR ("" = reports are not kept).
    """

    namespace: str
    interval_s: float = 5.0
    results_dir: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ReconcilerConfig | None:
        """The configuration, or None when BATCHLAB_RECONCILE_EXPERIMENTS is not on.

        Raises:
          ValueError: naming the variable, for a malformed value or no namespace.
        """
        env = os.environ if environ is None else environ
        if env.get("BATCHLAB_RECONCILE_EXPERIMENTS", "").strip().lower() not in _TRUE:
            return None
        namespace = env.get("BATCHLAB_NAMESPACE", "").strip()
        if not namespace and _SERVICE_ACCOUNT_NAMESPACE.is_file():
            namespace = _SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        if not namespace:
            raise ValueError("BATCHLAB_NAMESPACE is not set and the pod has no service account "
                             "namespace file: the reconciler needs a namespace")
        raw = env.get("BATCHLAB_RECONCILE_INTERVAL_SECONDS", "").strip() or "5"
        try:
            interval = float(raw)
        except ValueError:
            raise ValueError(f"BATCHLAB_RECONCILE_INTERVAL_SECONDS must be a number; got {raw!r}"
                             ) from None
        if not interval > 0:
            raise ValueError(f"BATCHLAB_RECONCILE_INTERVAL_SECONDS must be > 0; got {raw!r}")
        return cls(namespace=namespace, interval_s=interval,
                   results_dir=env.get("BATCHLAB_RESULTS_DIR", "").strip())


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def _details(error: grpc.RpcError) -> str:
    details = getattr(error, "details", None)
    return (details() if callable(details) else None) or str(error)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ExperimentReconciler:
    """Keeps the namespace's Experiment objects and the controller's experiments in step.

    Args:
      api: a kubernetes.client.CustomObjectsApi (or anything with its list, patch and
        patch-status methods for namespaced custom objects).
      client: a batchlab.client.ExperimentClient of the controller.
      config: the namespace, interval and results folder.
      now: the clock for status.lastUpdateTime (RFC 3339 text).
    """

    def __init__(self, api: Any, client: ExperimentClient, config: ReconcilerConfig, *,
                 now: Callable[[], str] = _now):
        self.api = api
        self.client = client
        self.config = config
        self._now = now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop -----------------------------------------------------------------------------
    def start(self) -> None:
        """Reconcile every `interval_s` in a daemon thread until `stop()`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="experiment-reconciler",
                                        daemon=True)
        self._thread.start()
        log.info("reconciling %s.%s in namespace %s every %.0f s", crd.PLURAL, crd.GROUP,
                 self.config.namespace, self.config.interval_s)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop (a pass in progress finishes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - the API server may be away; try again later
                log.exception("listing %s failed; retrying in %.0f s", crd.PLURAL,
                              self.config.interval_s)
            self._stop.wait(self.config.interval_s)

    def sync(self) -> int:
        """One pass over every Experiment of the namespace; returns how many were seen.

        A failure on one object is logged and does not stop the others.
        """
        listing = self.api.list_namespaced_custom_object(
            crd.GROUP, crd.VERSION, self.config.namespace, crd.PLURAL)
        items = listing.get("items") or []
        for obj in items:
            try:
                self.reconcile(obj)
            except Exception:  # noqa: BLE001 - one bad object must not stop the others
                log.exception("reconciling Experiment %s failed",
                              obj.get("metadata", {}).get("name"))
        return len(items)

    # -- one object ---------------------------------------------------------------------------
    def reconcile(self, obj: Mapping[str, Any]) -> None:
        """Bring one Experiment object one step closer to its controller experiment."""
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if meta.get("deletionTimestamp"):
            if crd.FINALIZER in finalizers:
                self._finalize(obj)
            return
        if crd.FINALIZER not in finalizers:
            obj = self._patch(meta["name"], {"metadata": {
                "finalizers": [*finalizers, crd.FINALIZER],
                "resourceVersion": meta.get("resourceVersion")}})
            meta = obj["metadata"]
        old = dict(obj.get("status") or {})
        status = dict(old)
        generation = meta.get("generation")
        name = status.get("experiment")
        if not name:
            if status.get("state") == REJECTED and status.get("observedGeneration") == generation:
                return  # the same spec again would be refused again; wait for an edit
            experiment = self._submit(obj, status)
            if experiment is None:
                self._write_status(meta["name"], old, status)
                return
        else:
            if (status.get("state") in _TERMINAL and "report" in status
                    and status.get("observedGeneration") == generation):
                return  # an ended experiment changes no more
            try:
                experiment = self.client.get(name)
            except grpc.RpcError as error:
                if _code(error) == grpc.StatusCode.NOT_FOUND:
                    status.update(state="FAILED", message=f"the controller has no {name} (its "
                                  "state was lost): delete and re-create this Experiment")
                    self._write_status(meta["name"], old, status)
                    return
                raise
            if generation != status.get("observedGeneration"):
                status["message"] = (
                    f"the spec changed after {name} was submitted (generation "
                    f"{status.get('observedGeneration')}); submitted experiments do not "
                    "change: delete this Experiment and create a new one")
            elif status.get("message", "").startswith("the spec changed"):
                status.pop("message")
        self._describe(experiment, status)
        self._write_status(meta["name"], old, status)

    def _submit(self, obj: Mapping[str, Any], status: dict[str, Any]
                ) -> controller_pb2.Experiment | None:
        """Submit the object's spec; None when refused (status REJECTED) or deferred."""
        meta = obj["metadata"]
        data = dict(obj.get("spec") or {})
        data.setdefault("name", meta["name"])
        status["observedGeneration"] = meta.get("generation")
        spec = experiment_pb2.ExperimentSpec()
        try:
            json_format.ParseDict(data, spec)
        except json_format.ParseError as error:
            status.update(state=REJECTED, message=f"spec: {error}")
            return None
        try:
            experiment = self.client.submit(spec, request_id=REQUEST_ID_PREFIX + meta["uid"])
        except grpc.RpcError as error:
            if _code(error) in _TRANSIENT:
                status["message"] = f"waiting for the controller: {_details(error)}"
                log.warning("submitting Experiment %s: %s", meta["name"], _details(error))
                return None
            status.update(state=REJECTED, message=_details(error))
            log.info("Experiment %s rejected: %s", meta["name"], _details(error))
            return None
        status.pop("message", None)
        status["experiment"] = experiment.name
        log.info("Experiment %s submitted as %s", meta["name"], experiment.name)
        return experiment

    def _describe(self, experiment: controller_pb2.Experiment, status: dict[str, Any]) -> None:
        """Fill the status from the controller's view of the experiment."""
        state = controller_pb2.Experiment.State.Name(experiment.state)
        status["experiment"] = experiment.name
        status["state"] = state
        if experiment.error:
            status["message"] = experiment.error
        if experiment.pending_reason:
            status["waiting"] = experiment.pending_reason
        else:
            status.pop("waiting", None)
        counts = json_format.MessageToDict(experiment.trial_counts,
                                           always_print_fields_with_no_presence=True,
                                           preserving_proto_field_name=True)
        counts["total"] = sum(counts.values())
        status["trials"] = counts
        best = self._best(experiment)
        status["best"] = best
        if best:
            first = best[0]
            status["bestSoFar"] = f"{first['metric']}={first['value']:.4g} ({first['study']})"
        else:
            status.pop("bestSoFar", None)
        if state in _TERMINAL and "report" not in status:
            self._report(experiment, status)

    def _best(self, experiment: controller_pb2.Experiment) -> list[dict[str, Any]]:
        """Per workload: the best final target metric among its succeeded trials."""
        workload_of = {s.name: s.workload for s in experiment.studies}
        targets = {w.workload: w.target for w in experiment.spec.workloads}
        best: dict[str, dict[str, Any]] = {}
        for trial in self.client.trials(experiment.name):
            if trial.outcome != common_pb2.SUCCEEDED:
                continue
            study = trial.name.split("/trials/")[0]
            workload = workload_of.get(study)
            if workload is None:
                continue
            target = targets.get(workload)
            if target is None or target.metric not in trial.final_metrics:
                continue
            value = trial.final_metrics[target.metric]
            if not math.isfinite(value):
                continue
            minimize = target.goal == common_pb2.MINIMIZE
            current = best.get(workload)
            if current is None or (value < current["value"] if minimize
                                   else value > current["value"]):
                best[workload] = {
                    "workload": workload, "metric": target.metric,
                    "goal": "MINIMIZE" if minimize else "MAXIMIZE", "value": value,
                    "study": study.rsplit("/", 1)[-1], "trial": trial.name,
                }
        order = [w.workload for w in experiment.spec.workloads]
        return [best[w] for w in order if w in best]

    def _report(self, experiment: controller_pb2.Experiment, status: dict[str, Any]) -> None:
        """Have the controller write the report once the experiment ended; record where."""
        experiment_id = experiment.name.split("/", 1)[1]
        command = f"batchlab report {experiment.name} --out report-{experiment_id}/"
        try:
            # The controller keeps the report under BATCHLAB_RESULTS_DIR/<id>/report; the copy
            # the RPC returns is not needed here.
            with tempfile.TemporaryDirectory(prefix="batchlab-reconciler-") as tmp:
                self.client.report(experiment.name, tmp)
        except grpc.RpcError as error:
            if _code(error) == grpc.StatusCode.FAILED_PRECONDITION:
                status["report"] = {"command": "", "path": ""}
                status["message"] = f"no report: {_details(error)}"
                return
            log.warning("report of %s failed: %s", experiment.name, _details(error))
            return
        report: dict[str, str] = {"command": command, "path": ""}
        if self.config.results_dir:
            report["path"] = str(Path(self.config.results_dir) / experiment_id / "report"
                                 / "report.md")
        status["report"] = report

    def _finalize(self, obj: Mapping[str, Any]) -> None:
        """Cancel a deleted Experiment's run, then let the API server remove the object."""
        meta = obj["metadata"]
        name = (obj.get("status") or {}).get("experiment") or self._find(meta["uid"])
        if name:
            try:
                self.client.cancel(name)
                log.info("Experiment %s deleted: cancelled %s", meta["name"], name)
            except grpc.RpcError as error:
                # NOT_FOUND: nothing to cancel; FAILED_PRECONDITION: it has already ended.
                if _code(error) not in (grpc.StatusCode.NOT_FOUND,
                                        grpc.StatusCode.FAILED_PRECONDITION):
                    raise
        finalizers = [f for f in meta.get("finalizers") or [] if f != crd.FINALIZER]
        self._patch(meta["name"], {"metadata": {"finalizers": finalizers,
                                                "resourceVersion": meta.get("resourceVersion")}})

    def _find(self, uid: str) -> str | None:
        """The controller experiment submitted for an object uid whose status was never written."""
        request_id = REQUEST_ID_PREFIX + uid
        for experiment in self.client.list():
            if experiment.request_id == request_id:
                return experiment.name
        return None

    # -- API writes ---------------------------------------------------------------------------
    def _patch(self, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        patched: dict[str, Any] = self.api.patch_namespaced_custom_object(
            crd.GROUP, crd.VERSION, self.config.namespace, crd.PLURAL, name, body)
        return patched

    def _write_status(self, name: str, old: Mapping[str, Any], new: dict[str, Any]) -> None:
        """Patch the status subresource when something other than the timestamp changed."""
        comparable_old = {k: v for k, v in old.items() if k != "lastUpdateTime"}
        comparable_new = {k: v for k, v in new.items() if k != "lastUpdateTime"}
        if comparable_old == comparable_new:
            return
        new["lastUpdateTime"] = self._now()
        # A merge patch: keys that disappeared are set to null to remove them.
        body = {**{k: None for k in old if k not in new}, **new}
        self.api.patch_namespaced_custom_object_status(
            crd.GROUP, crd.VERSION, self.config.namespace, crd.PLURAL, name, {"status": body})


def start_experiment_reconciler(controller_address: str, *, token: str | None = None,
                                environ: Mapping[str, str] | None = None,
                                ) -> ExperimentReconciler | None:
    """Start the reconciler when BATCHLAB_RECONCILE_EXPERIMENTS is on; None otherwise.

    Uses the pod's service account (kubernetes.config.load_incluster_config) and a client of
    the controller at `controller_address`.

    Raises:
      ValueError: a malformed setting, naming it.
      kubernetes.config.ConfigException: not running in a pod with a service account token.
    """
    config = ReconcilerConfig.from_env(environ)
    if config is None:
        return None
    from kubernetes import client as kube_client
    from kubernetes import config as kube_config

    from batchlab.client.experiments import ExperimentClient

    kube_config.load_incluster_config()
    reconciler = ExperimentReconciler(kube_client.CustomObjectsApi(),
                                      ExperimentClient(controller_address, token=token or ""),
                                      config)
    reconciler.start()
    return reconciler
