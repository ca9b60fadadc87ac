"""Every batchlab series reaches Prometheus with its own labels: the monitors select every metrics
endpoint, no label of batchlab's metrics is overwritten by a target label, and every trainer
actor of a pod is scraped through the pod's one declared metrics port."""

from __future__ import annotations

import re

import pytest
import yaml
from prometheus_client import CollectorRegistry

from batchlab.rpc.metrics import METRICS_PORTS, make_metrics
from services.trainer.metrics_exporter import ACTOR_LABEL
from tests.k8s import kuberay
from tests.k8s.objects import (
    REPO_ROOT,
    by_name,
    env_of,
    of_kind,
    pod_templates,
    raycluster,
    selector_matches,
)

SERVICE_ROLES = ("controller", "sharding", "checkpoints", "evaluator")
# prometheus-operator's target labels (its generated relabelings; kuberay-notes.md,
# "prometheus-operator"): a scraped series that has one of these gets it renamed exported_<name>
# unless honorLabels is set.
SERVICE_MONITOR_TARGET_LABELS = {"service", "namespace", "pod", "endpoint", "job", "instance",
                                 "container"}
POD_MONITOR_TARGET_LABELS = {"namespace", "pod", "endpoint", "job", "instance", "container"}
PROMETHEUS_YML = REPO_ROOT / "k8s" / "components" / "prometheus" / "prometheus.yml"


def metric_label_names() -> set[str]:
    """Every label name batchlab's metrics carry (all roles), plus the trainer exporter's."""
    registry = CollectorRegistry()
    make_metrics(registry)
    names = {ACTOR_LABEL}
    for collector in list(registry._collector_to_names):  # noqa: SLF001 - no public listing
        names.update(getattr(collector, "_labelnames", ()))
    return names


def relabel_targets(endpoint: dict) -> set[str]:
    return {r["targetLabel"] for r in endpoint.get("relabelings", ()) if "targetLabel" in r}


def test_metric_labels_include_the_one_that_clashed():
    """The check below is not vacuous: the RPC metrics' `service` label is what clashed."""
    assert "service" in metric_label_names()


def test_no_metric_label_is_overwritten_by_a_target_label(rendered):
    """Defect: the ServiceMonitor's `service` target label overrode batchlab's own `service`
    label (which became exported_service), so the per-service panels stayed empty."""
    labels = metric_label_names()
    objects = rendered("gpu")
    monitors = [(m, m["spec"]["endpoints"], SERVICE_MONITOR_TARGET_LABELS)
                for m in of_kind(objects, "ServiceMonitor")]
    monitors += [(m, m["spec"]["podMetricsEndpoints"], POD_MONITOR_TARGET_LABELS)
                 for m in of_kind(objects, "PodMonitor")]
    assert len(monitors) == 2
    for monitor, endpoints, target_labels in monitors:
        for endpoint in endpoints:
            clash = labels & (target_labels | relabel_targets(endpoint))
            assert not clash or endpoint.get("honorLabels") is True, (
                f"{monitor['kind']}/{monitor['metadata']['name']}: batchlab's labels {clash} "
                "would be renamed exported_*: set honorLabels: true")
    # The plain Prometheus configuration: job and instance, and what its relabelling sets.
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    for scrape in config["scrape_configs"]:
        targets = {"job", "instance"} | {r["target_label"] for r in scrape["relabel_configs"]
                                         if "target_label" in r}
        clash = labels & (targets - {"__metrics_path__"})
        assert not clash or scrape.get("honor_labels") is True, (scrape["job_name"], clash)


def test_monitors_select_every_metrics_endpoint(rendered):
    objects = rendered("gpu")
    (service_monitor,) = of_kind(objects, "ServiceMonitor")
    selected = [
        s for s in of_kind(objects, "Service")
        if selector_matches(service_monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert sorted(s["metadata"]["name"] for s in selected) == sorted(SERVICE_ROLES)
    endpoint_ports = {e["port"] for e in service_monitor["spec"]["endpoints"]}
    for service in selected:
        assert endpoint_ports <= {p["name"] for p in service["spec"]["ports"]}


def test_every_trainer_actor_reaches_prometheus_through_its_pods_port(rendered):
    """Defect: only the first trainer actor of a pod owned the scraped port; the others picked
    random ports that were neither scraped nor allowed. Now every actor writes to the pod's
    shared folder and the pod's exporter serves them all on its one declared port, which the
    PodMonitor and the plain configuration scrape."""
    objects = rendered("gpu")
    (pod_monitor,) = of_kind(objects, "PodMonitor")
    templates = [(where, t) for where, t in pod_templates(objects)
                 if selector_matches(pod_monitor["spec"]["selector"], t["metadata"]["labels"])]
    groups = {g["groupName"] for g in by_name(objects, "RayCluster")["trainers"]["spec"][
        "workerGroupSpecs"]}
    assert {where.rsplit(" ", 1)[-1] for where, _ in templates} == groups
    (port_name,) = {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]}
    for where, template in templates:
        containers = template["spec"]["containers"]
        serving = [c for c in containers for p in c.get("ports", ()) if p["name"] == port_name]
        (exporter,) = serving
        assert exporter["command"][-1] == "services.trainer.metrics_exporter", where
        assert {p["containerPort"] for p in exporter["ports"]} == {METRICS_PORTS["trainer"]}
        shared = env_of(exporter)["BATCHLAB_TRAINER_METRICS_DIR"]
        assert env_of(containers[0])["BATCHLAB_TRAINER_METRICS_DIR"] == shared, where
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(METRICS_PORTS["trainer"]), where


def _plain_config_keeps(metadata: dict, port_name: str) -> bool:
    """Whether prometheus.yml's `keep` relabellings keep a port of a pod with this metadata
    (Kubernetes service discovery's meta labels; Prometheus anchors each regex)."""
    def meta_name(key: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", key)

    meta = {"__meta_kubernetes_pod_container_port_name": port_name}
    for key, value in metadata.get("labels", {}).items():
        meta[f"__meta_kubernetes_pod_label_{meta_name(key)}"] = value
    for key, value in metadata.get("annotations", {}).items():
        meta[f"__meta_kubernetes_pod_annotation_{meta_name(key)}"] = value
    (scrape,) = yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]
    for rule in scrape["relabel_configs"]:
        if rule.get("action") != "keep":
            continue
        value = rule.get("separator", ";").join(meta.get(s, "") for s in rule["source_labels"])
        if not re.fullmatch(rule["regex"], value):
            return False
    return True


@pytest.mark.builds("gpu", "tpu")
def test_monitors_select_only_batchlabs_metrics_ports(build, rendered):
    """Defect: the PodMonitor scraped the trainer pods' port named `metrics`, which KubeRay also
    gives Ray's own 8080 (tests/k8s/kuberay.py). In the pods KubeRay builds, every monitor port
    name (and the plain configuration) must mean exactly the batchlab exporter's port."""
    objects = rendered(build)
    cluster = raycluster(objects)
    (pod_monitor,) = of_kind(objects, "PodMonitor")
    names = {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]}
    for group in kuberay.groups(cluster):
        if not selector_matches(pod_monitor["spec"]["selector"],
                                group.template["metadata"]["labels"]):
            continue
        pod = kuberay.built_pod(cluster, group)
        ports = [(c, p) for c in pod["containers"] for p in c.get("ports", ())]
        exporter = [(c["name"], p["containerPort"]) for c, p in ports
                    if c.get("command", [""])[-1] == "services.trainer.metrics_exporter"]
        assert [port for _, port in exporter] == [METRICS_PORTS["trainer"]], (build, group.name)
        for name in names:
            matching = [(c["name"], p["containerPort"]) for c, p in ports if p["name"] == name]
            assert matching == exporter, (
                f"{build} {group.name}: the PodMonitor's port {name!r} is {matching} in the pod "
                f"KubeRay builds; it must be the metrics exporter's {exporter} alone")
        scraped = [p["name"] for _, p in ports
                   if _plain_config_keeps(group.template["metadata"], p["name"])]
        assert set(scraped) == names and len(scraped) == 1, (build, group.name, scraped)
    (service_monitor,) = of_kind(objects, "ServiceMonitor")
    deployments = by_name(objects, "Deployment")
    for service in of_kind(objects, "Service"):
        if not selector_matches(service_monitor["spec"]["selector"], service["metadata"]["labels"]):
            continue
        template = next(d["spec"]["template"] for d in deployments.values()
                        if selector_matches({"matchLabels": service["spec"]["selector"]},
                                            d["spec"]["template"]["metadata"]["labels"]))
        role = template["metadata"]["labels"]["app.kubernetes.io/component"]
        for endpoint in service_monitor["spec"]["endpoints"]:
            (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
            target = [p for c in template["spec"]["containers"] for p in c.get("ports", ())
                      if port["targetPort"] in (p["name"], p["containerPort"])]
            assert [p["containerPort"] for p in target] == [METRICS_PORTS[role]], (
                build, service["metadata"]["name"], endpoint["port"], target)
        scraped = [p["name"] for c in template["spec"]["containers"] for p in c.get("ports", ())
                   if _plain_config_keeps(template["metadata"], p["name"])]
        assert scraped == ["metrics"], (build, role, scraped)
