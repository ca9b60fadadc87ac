"""KubeRay's defaulting rules applied to every rendered RayCluster (tests/k8s/kuberay.py): the
head Service KubeRay would create, the pods it would build (its ports, volumes, probes and
autoscaler container), and what those need from the images. Each failure names the rule's
source in KubeRay or Ray."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys

import pytest

from tests.k8s import kuberay
from tests.k8s.objects import REPO_ROOT, by_name, env_of, image_name_and_tag, lock_pins, raycluster

PLATFORM = ("root", "base", "dev", "gpu", "tpu")
NOTES = "../shared/reference/kuberay-notes.md"
# The lock each Ray image installs, by tag suffix (services/trainer/Dockerfile).
LOCK_OF_TAG = {"": "trainer-cuda12.lock", "-tpu": "trainer-tpu.lock", "-cpu": "trainer.lock"}


def _cluster(rendered, build):
    return raycluster(rendered(build))


@pytest.mark.builds(*PLATFORM)
def test_head_service_has_no_duplicate_ports(build, rendered):
    """Defect: port 8080 named ray-metrics made KubeRay add metrics:8080 too; the API server
    rejects the Service and KubeRay's reconcile stops before any pod exists."""
    ports = kuberay.head_service_ports(_cluster(rendered, build))
    numbers = [port for _, port in ports]
    names = [name for name, _ in ports]
    duplicates = sorted({p for p in numbers if numbers.count(p) > 1})
    assert not duplicates, (
        f"{build}: the head Service KubeRay builds has ports {ports}: {duplicates} twice, "
        f"which the API server rejects (rule: {kuberay.SERVICE_GO}; {NOTES})")
    assert len(set(names)) == len(names), ports


def test_the_duplicate_port_rule_catches_the_old_manifest(rendered):
    """The rule above is not vacuous: the port name the manifests used to have fails it."""
    import copy

    cluster = copy.deepcopy(_cluster(rendered, "base"))
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for port in head["ports"]:
        if port["containerPort"] == 8080:
            port["name"] = "ray-metrics"
    numbers = [p for _, p in kuberay.head_service_ports(cluster)]
    assert numbers.count(8080) == 2


@pytest.mark.builds(*PLATFORM)
def test_ray_ports_keep_kuberay_default_names(build, rendered):
    """A Ray container port on a KubeRay default number carries its default name and vice
    versa: KubeRay finds ports by name (FindContainerPort) and adds defaults by name."""
    cluster = _cluster(rendered, build)
    by_number = {v: k for k, v in kuberay.DEFAULT_PORTS.items()}
    for group in kuberay.groups(cluster):
        for port in group.ray_container.get("ports", ()):
            name, number = port.get("name", ""), port["containerPort"]
            if number in by_number:
                assert name == by_number[number], (
                    f"{build} {group.name}: port {number} must be named {by_number[number]} "
                    f"(rule: {kuberay.CONSTANT_GO}, {kuberay.SERVICE_GO})")
            if name in kuberay.DEFAULT_PORTS:
                assert number == kuberay.DEFAULT_PORTS[name], (build, group.name, port)
        pod = kuberay.built_pod(cluster, group)
        agent = int(kuberay.ray_start_params(cluster, group)["dashboard-agent-listen-port"])
        for container in pod["containers"]:
            for port in container.get("ports", ()):
                assert port["containerPort"] != agent, (
                    f"{build} {group.name}: {container['name']} uses the dashboard agent's port "
                    f"{agent}, which KubeRay's probes query (rule: {kuberay.POD_GO})")


@pytest.mark.builds(*PLATFORM)
def test_no_built_pod_has_two_ports_of_one_name(build, rendered):
    """Defect: the worker pods' Ray container declared no port named metrics while their
    metrics sidecar's port was; KubeRay's DefaultWorkerPodTemplate then added metrics:8080 to the
    Ray container, and the PodMonitor and the scrape policy's `metrics` meant both ports."""
    cluster = _cluster(rendered, build)
    for group in kuberay.groups(cluster):
        pod = kuberay.built_pod(cluster, group)
        duplicates = kuberay.duplicate_port_names(pod)
        assert not duplicates, (
            f"{build} {group.name}: KubeRay's pod has ports named {duplicates} more than once "
            f"(rule: {kuberay.POD_GO} DefaultWorkerPodTemplate/DefaultHeadPodTemplate; {NOTES})")
        ray = pod["containers"][0]
        assert {"name": "metrics", "containerPort": kuberay.DEFAULT_PORTS["metrics"]} in ray[
            "ports"], (build, group.name, ray["ports"])


def test_the_worker_metrics_port_rule_catches_the_old_manifest(rendered):
    """The rule is applied to worker groups: the old worker template (no port on the Ray
    container, the sidecar's port named metrics) gets a second `metrics` port."""
    import copy

    cluster = copy.deepcopy(_cluster(rendered, "base"))
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    del worker["containers"][0]["ports"]
    worker["containers"][1]["ports"][0]["name"] = "metrics"
    group = next(g for g in kuberay.groups(cluster) if g.node_type == "worker")
    pod = kuberay.built_pod(cluster, group)
    assert kuberay.duplicate_port_names(pod) == {"metrics": ["ray-worker", "metrics"]}


def _locked_ray_version() -> set[str]:
    return {lock_pins(path)["ray"][0] for path in (REPO_ROOT / "requirements").glob("*.lock")
            if "ray" in lock_pins(path)}


@pytest.mark.builds(*PLATFORM)
def test_ray_version_is_the_locked_one(build, rendered):
    """Ray Client needs the same Ray on both ends, and KubeRay picks probes by rayVersion."""
    assert {_cluster(rendered, build)["spec"]["rayVersion"]} == _locked_ray_version()


def _default_extra() -> set[str]:
    """The packages of Ray's `default` extra, from the installed Ray's own metadata."""
    names = set()
    for requirement in importlib.metadata.requires("ray") or ():
        if 'extra == "default"' in requirement:
            names.add(re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()
                             ).lower())
    return names


@pytest.mark.builds(*PLATFORM)
def test_probes_for_the_locked_ray_version_are_served_by_the_images(build, rendered):
    """Defect: the images installed plain `ray`; for Ray >= 2.53 KubeRay probes the dashboard
    agent over HTTP (:52365/api/healthz), which serves only with ray[default]'s dependencies,
    so pods never became Ready and were restarted about every 10 minutes."""
    cluster = _cluster(rendered, build)
    assert importlib.metadata.version("ray") in _locked_ray_version()
    needed = _default_extra()
    assert {"aiohttp", "aiohttp-cors", "opencensus", "prometheus-client"} <= needed
    for group in kuberay.groups(cluster):
        probes = kuberay.probes(cluster, group)
        http = probes["readinessProbe"].get("httpGet")
        assert http and http["path"] == kuberay.HEALTH_PATH, (
            f"{build} {group.name}: expected KubeRay's HTTP probe for Ray "
            f"{cluster['spec']['rayVersion']} (rule: {kuberay.POD_GO} supportsUnifiedHealthCheck)")
        for container in (group.ray_container,):
            _, tag = image_name_and_tag(container["image"])
            suffix = re.sub(r"^[0-9.]+", "", tag)
            lock = REPO_ROOT / "requirements" / LOCK_OF_TAG[suffix]
            missing = needed - set(lock_pins(lock))
            assert not missing, (
                f"{build} {group.name}: {container['image']} installs {lock.name}, which lacks "
                f"ray[default]'s {sorted(missing)}: the dashboard agent would not serve "
                f"{kuberay.HEALTH_PATH} ({NOTES})")


def test_this_environment_imports_what_the_probes_need():
    """The check KubeRay's notes give, in an environment made from the locks (.venv); the
    image smoke test (make images-smoke) runs it inside every image."""
    result = subprocess.run([sys.executable, "-c", "import ray.dashboard.optional_deps"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.builds(*PLATFORM)
def test_kuberay_built_pods_are_valid(build, rendered):
    """The volumes KubeRay adds (/dev/shm, /tmp/ray for the autoscaler's logs) and the
    autoscaler container leave every pod with unique volume names and mount paths."""
    cluster = _cluster(rendered, build)
    for group in kuberay.groups(cluster):
        pod = kuberay.built_pod(cluster, group)
        volumes = [v["name"] for v in pod["volumes"]]
        assert len(set(volumes)) == len(volumes), (build, group.name, volumes)
        for container in pod["containers"]:
            paths = [m["mountPath"] for m in container.get("volumeMounts", ())]
            assert len(set(paths)) == len(paths), (build, group.name, container["name"], paths)
            for mount in container.get("volumeMounts", ()):
                assert mount["name"] in volumes, (build, group.name, mount)


@pytest.mark.builds(*PLATFORM)
def test_shared_memory_holds_the_object_store(build, rendered):
    """Ray sizes its object store in /dev/shm (30% of memory unless object-store-memory is
    set); a smaller memory-backed volume makes Ray fall back to slow disk or fail."""
    cluster = _cluster(rendered, build)
    for group in kuberay.groups(cluster):
        pod = kuberay.built_pod(cluster, group)
        mount = next(m for m in pod["containers"][0]["volumeMounts"]
                     if m["mountPath"] == kuberay.SHARED_MEMORY_PATH)
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["emptyDir"].get("medium") == "Memory", (build, group.name)
        size = volume["emptyDir"].get("sizeLimit")
        store = kuberay.object_store_bytes(cluster, group)
        assert size and kuberay.quantity(size) >= store, (
            f"{build} {group.name}: /dev/shm {size} < object store {store / 2**30:.1f} GiB")
        limit = kuberay.quantity(group.limits["memory"])
        assert store < limit, (build, group.name)


@pytest.mark.builds(*PLATFORM)
def test_autoscaler_can_reach_the_api_and_nothing_else_holds_a_token(build, rendered):
    """KubeRay runs the autoscaler in the head pod with the head's service account, which the
    manifests must create when they name it (rule: raycluster_controller.go); it needs that
    account's token, which only the autoscaler container mounts."""
    objects = rendered(build)
    cluster = raycluster(objects)
    assert kuberay.autoscaling(cluster), f"{build}: enableInTreeAutoscaling must be true"
    head = next(g for g in kuberay.groups(cluster) if g.node_type == "head")
    account = head.pod.get("serviceAccountName")
    assert account in by_name(objects, "ServiceAccount"), (
        f"{build}: the head's service account {account} must exist (rule: {kuberay.CONTROLLER_GO})")
    workers = {g.pod.get("serviceAccountName") for g in kuberay.groups(cluster)
               if g.node_type == "worker"}
    assert account not in workers, "the autoscaler's permissions must not reach worker pods"
    pod = kuberay.built_pod(cluster, head)
    volumes = {v["name"]: v for v in pod["volumes"]}

    def token_mounts(container):
        return [m for m in container.get("volumeMounts", ())
                if m["mountPath"] == kuberay.SERVICE_ACCOUNT_PATH]

    (autoscaler,) = [c for c in pod["containers"] if c["name"] == "autoscaler"]
    (mount,) = token_mounts(autoscaler)
    sources = volumes[mount["name"]]["projected"]["sources"]
    assert any("serviceAccountToken" in s for s in sources)
    assert pod.get("automountServiceAccountToken") is False
    assert not token_mounts(pod["containers"][0]), "the Ray container must not hold the token"
    security = autoscaler.get("securityContext", {})
    assert security.get("readOnlyRootFilesystem") is True and security.get("runAsNonRoot")
    assert any(m["mountPath"] == "/tmp" for m in autoscaler["volumeMounts"])


@pytest.mark.builds(*PLATFORM)
def test_spec_changes_roll_the_ray_pods(build, rendered):
    """Defect: no upgradeStrategy, so a new image or size never reached running Ray pods."""
    strategy = _cluster(rendered, build)["spec"].get("upgradeStrategy", {})
    assert strategy.get("type") == "Recreate", f"{build}: upgradeStrategy.type Recreate ({NOTES})"


@pytest.mark.builds(*PLATFORM)
def test_ray_containers_get_login_shell_path_and_writable_home(build, rendered):
    """KubeRay starts Ray through `bash -lc`: the image puts its environment on the login PATH
    and sets HOME to the writable /tmp (Ray writes under /tmp/ray)."""
    for dockerfile in ("services/trainer/Dockerfile", "services/controller/Dockerfile"):
        text = (REPO_ROOT / dockerfile).read_text()
        assert "/etc/profile.d/" in text and "HOME=/tmp" in text, dockerfile
        assert re.search(r"^USER 10001:10001$", text, re.MULTILINE), dockerfile
    for group in kuberay.groups(_cluster(rendered, build)):
        env = env_of(group.ray_container)
        assert "HOME" not in env and "PATH" not in env, (build, group.name)
