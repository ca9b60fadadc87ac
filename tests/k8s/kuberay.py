"""What the KubeRay operator does with a RayCluster, as rules the manifests are checked against.

Each rule is KubeRay's documented or coded behaviour at the commit of the CRDs in
../shared/reference/kuberay-crds (ray-project/kuberay feeaf72f), with the file it comes from
(paths in that repository; ../shared/reference/kuberay-notes.md has the facts). The functions
compute what KubeRay would create from a rendered RayCluster (the head Service's ports, each
pod's ports, probes, volumes and `ray start` parameters, the Ray resources a pod advertises),
so tests check what the API server and Ray will see, not what the manifest says.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

SOURCE = "ray-project/kuberay@feeaf72f"
SERVICE_GO = f"{SOURCE} ray-operator/controllers/ray/common/service.go (getServicePorts)"
POD_GO = f"{SOURCE} ray-operator/controllers/ray/common/pod.go"
CONSTANT_GO = f"{SOURCE} ray-operator/controllers/ray/utils/constant.go"
CONTROLLER_GO = (f"{SOURCE} ray-operator/controllers/ray/raycluster_controller.go "
                 "(reconcileAutoscalerServiceAccount)")

# utils/constant.go: the ports KubeRay uses when the head container declares none, by name.
DEFAULT_PORTS = {"client": 10001, "gcs-server": 6379, "dashboard": 8265, "metrics": 8080,
                 "serve": 8000}
DEFAULT_DASHBOARD_AGENT_PORT = 52365
HEALTH_PATH = "/api/healthz"
SHARED_MEMORY_PATH = "/dev/shm"
RAY_LOG_PATH = "/tmp/ray"
SERVICE_ACCOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
# pod.go supportsUnifiedHealthCheck: Ray >= 2.53 gets HTTP probes on the dashboard agent.
UNIFIED_HEALTH_CHECK_SINCE = (2, 53, 0)
# Ray's default object store: 30% of the node's memory (ray/_private/ray_constants.py).
OBJECT_STORE_FRACTION = 0.3

_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "m": 1e-3,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "48Gi", "8") as a number."""
    if isinstance(value, int | float):
        return float(value)
    match = _QUANTITY.match(str(value))
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@dataclasses.dataclass(frozen=True)
class Group:
    """The head or one worker group of a RayCluster: what KubeRay builds its pods from."""

    name: str
    node_type: str  # "head" or "worker"
    spec: Mapping[str, Any]

    @property
    def template(self) -> Mapping[str, Any]:
        return self.spec["template"]

    @property
    def pod(self) -> Mapping[str, Any]:
        return self.template["spec"]

    @property
    def ray_container(self) -> Mapping[str, Any]:
        # utils.RayContainerIndex: KubeRay treats the first container as Ray's.
        return self.pod["containers"][0]

    @property
    def limits(self) -> Mapping[str, Any]:
        return self.ray_container.get("resources", {}).get("limits", {})

    @property
    def replicas_max(self) -> int:
        return 1 if self.node_type == "head" else int(self.spec.get("maxReplicas", 0))

    @property
    def replicas_min(self) -> int:
        return 1 if self.node_type == "head" else int(self.spec.get("minReplicas", 0))

    @property
    def hosts(self) -> int:
        return int(self.spec.get("numOfHosts", 1) or 1)


def groups(cluster: Mapping[str, Any]) -> Iterator[Group]:
    yield Group("head", "head", cluster["spec"]["headGroupSpec"])
    for spec in cluster["spec"].get("workerGroupSpecs", ()):
        yield Group(spec["groupName"], "worker", spec)


def autoscaling(cluster: Mapping[str, Any]) -> bool:
    return bool(cluster["spec"].get("enableInTreeAutoscaling"))


def ray_start_params(cluster: Mapping[str, Any], group: Group) -> dict[str, str]:
    """The `ray start` parameters KubeRay generates (pod.go setMissingRayStartParams and
    generateRayStartCommand): the group's own, then defaults, then resources from the limits."""
    params = {k: str(v) for k, v in (group.spec.get("rayStartParams") or {}).items()}
    if group.node_type == "head":
        params.setdefault("dashboard-host", "0.0.0.0")
        if autoscaling(cluster):
            params["no-monitor"] = "true"
    params.setdefault("metrics-export-port", str(DEFAULT_PORTS["metrics"]))
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", str(DEFAULT_DASHBOARD_AGENT_PORT))
    limits = group.limits
    requests = group.ray_container.get("resources", {}).get("requests", {})
    if "num-cpus" not in params:
        cpu = limits.get("cpu") or requests.get("cpu")
        if cpu:
            # resource.Quantity.Value() rounds up to an integer.
            params["num-cpus"] = str(math.ceil(quantity(cpu)))
    if "memory" not in params and limits.get("memory"):
        params["memory"] = str(int(quantity(limits["memory"])))
    if "num-gpus" not in params:
        for key in sorted(limits):
            if key.endswith("/gpu") and quantity(limits[key]):
                params["num-gpus"] = str(math.ceil(quantity(limits[key])))
                break
    if "google.com/tpu" in limits and "resources" not in params:
        params["resources"] = f"'{{\"TPU\": {quantity(limits['google.com/tpu'])}}}'"
    return params


def ray_resources(cluster: Mapping[str, Any], group: Group) -> dict[str, float]:
    """The Ray resources one pod of the group advertises: CPU, GPU, TPU, memory (bytes)."""
    params = ray_start_params(cluster, group)
    resources = {"CPU": float(params.get("num-cpus", 0)), "GPU": float(params.get("num-gpus", 0)),
                 "memory": float(params.get("memory", 0))}
    custom = params.get("resources")
    if custom:
        for name, value in re.findall(r'"(\w+)":\s*([0-9.]+)', custom):
            resources[name] = float(value)
    return resources


def object_store_bytes(cluster: Mapping[str, Any], group: Group) -> float:
    """The object store Ray sizes in /dev/shm: the parameter, else 30% of the memory limit."""
    params = ray_start_params(cluster, group)
    if "object-store-memory" in params:
        return float(params["object-store-memory"])
    return OBJECT_STORE_FRACTION * float(params.get("memory", 0))


def head_service_ports(cluster: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The head Service's ports (service.go getServicePorts): the head container's ports, or
    KubeRay's defaults when it declares none; then `metrics: 8080` unless a port is named
    metrics."""
    head = next(g for g in groups(cluster) if g.node_type == "head")
    declared = [(p.get("name", ""), int(p["containerPort"]))
                for p in head.ray_container.get("ports", ())]
    ports = declared or list(DEFAULT_PORTS.items())
    if not any(name == "metrics" for name, _ in ports):
        ports.append(("metrics", DEFAULT_PORTS["metrics"]))
    return ports


def probes(cluster: Mapping[str, Any], group: Group) -> dict[str, Mapping[str, Any]]:
    """The readiness and liveness probes KubeRay injects into the Ray container when the
    template sets none (pod.go initLivenessAndReadinessProbe)."""
    params = ray_start_params(cluster, group)
    if version_tuple(cluster["spec"].get("rayVersion", "0")) >= UNIFIED_HEALTH_CHECK_SINCE:
        action = {"httpGet": {"path": HEALTH_PATH,
                              "port": int(params["dashboard-agent-listen-port"])}}
    else:
        # Older Ray: exec probes that wget api/local_raylet_healthz (and api/gcs_healthz on
        # the head) from inside the container, which then needs wget.
        action = {"exec": {"command": ["bash", "-c", "wget -T 2 -q -O- http://localhost:"
                                       f"{params['dashboard-agent-listen-port']}"
                                       "/api/local_raylet_healthz"]}}
    container = group.ray_container
    return {kind: container.get(kind) or action for kind in ("readinessProbe", "livenessProbe")}


def built_pod(cluster: Mapping[str, Any], group: Group) -> dict[str, Any]:
    """The pod spec KubeRay creates for a group: its template plus what BuildPod,
    DefaultHeadPodTemplate and DefaultWorkerPodTemplate add (the metrics port on the Ray
    container of every group, /dev/shm and /tmp/ray volumes, the autoscaler container, probes)."""
    pod = copy.deepcopy(dict(group.pod))
    ray = pod["containers"][0]
    # DefaultHeadPodTemplate and DefaultWorkerPodTemplate alike (POD_GO): when the Ray container
    # has no port named metrics (utils.FindContainerPort looks at that container only), they
    # append metrics:8080 to it, whatever the pod's other containers declare.
    if not any(p.get("name") == "metrics" for p in ray.get("ports", ())):
        ray.setdefault("ports", []).append({"name": "metrics",
                                            "containerPort": DEFAULT_PORTS["metrics"]})
    if group.node_type == "head":
        if autoscaling(cluster):
            options = cluster["spec"].get("autoscalerOptions") or {}
            autoscaler = {
                "name": "autoscaler",
                "image": options.get("image", ray.get("image")),
                "resources": options.get("resources") or {
                    "limits": {"cpu": "500m", "memory": "512Mi"},
                    "requests": {"cpu": "500m", "memory": "512Mi"}},
                "env": list(options.get("env", ())),
                "volumeMounts": list(options.get("volumeMounts", ())),
            }
            if options.get("securityContext"):
                autoscaler["securityContext"] = options["securityContext"]
            pod["containers"].append(autoscaler)
            # The head's service account (GetHeadGroupServiceAccountName).
            pod["serviceAccountName"] = pod.get("serviceAccountName") or cluster["metadata"]["name"]
            for container in (ray, autoscaler):
                _add_empty_dir(pod, container, "ray-logs", RAY_LOG_PATH)
    if "plasma-directory" not in ray_start_params(cluster, group):
        _add_empty_dir(pod, ray, "shared-mem", SHARED_MEMORY_PATH, medium="Memory")
    for kind, probe in probes(cluster, group).items():
        ray[kind] = probe
    return pod


def duplicate_port_names(pod: Mapping[str, Any]) -> dict[str, list[str]]:
    """Port names that more than one port of the pod carries -> the containers declaring them.
    A named port in a PodMonitor, a NetworkPolicy or a probe then means several ports."""
    owners: dict[str, list[str]] = {}
    for container in pod["containers"]:
        for port in container.get("ports", ()):
            if port.get("name"):
                owners.setdefault(port["name"], []).append(container["name"])
    return {name: where for name, where in owners.items() if len(where) > 1}


def _add_empty_dir(pod: dict[str, Any], container: dict[str, Any], name: str, path: str,
                   medium: str = "") -> None:
    """pod.go addEmptyDir: skipped when the container already mounts something at `path`."""
    if any(m["mountPath"] == path for m in container.get("volumeMounts", ())):
        return
    if not any(v["name"] == name for v in pod.get("volumes", ())):
        pod.setdefault("volumes", []).append({"name": name, "emptyDir": {"medium": medium}
                                              if medium else {}})
    container.setdefault("volumeMounts", []).append({"name": name, "mountPath": path})
