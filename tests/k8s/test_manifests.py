"""The kustomize builds render offline, validate against the Kubernetes and KubeRay schemas, and
keep the deployment conventions (conventions.md, "Deployment")."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from batchlab.rpc.metrics import METRICS_PORTS
from tests.k8s.kube_schema import crd_validator, schema_errors
from tests.k8s.objects import (
    AUTH_SECRET,
    EXTERNAL,
    GRPC_PORTS,
    REPO_ROOT,
    SERVICE_ROLES,
    by_name,
    controller_env,
    env_of,
    image_name_and_tag,
    kubernetes_validate,
    of_kind,
    pod_templates,
    pyproject_version,
    raycluster,
    selector_matches,
)

PLATFORM = ("root", "base", "dev", "gpu", "tpu")
# Kinds kubernetes-validate has no schema for; RayCluster and Experiment are checked against
# their CRDs (here and in test_experiments.py).
CUSTOM_KINDS = {"RayCluster", "ServiceMonitor", "PodMonitor", "PrometheusRule", "Experiment"}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition"}


def effective_security(pod_spec: dict, container: dict) -> dict:
    """The container's security settings with the pod's defaults filled in."""
    merged = {
        k: v for k, v in (pod_spec.get("securityContext") or {}).items()
        if k in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")
    }
    merged.update(container.get("securityContext") or {})
    return merged


def check_locked_down(where: str, pod: dict, container: dict) -> None:
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where}: {kind}"
    security = effective_security(pod, container)
    assert security.get("runAsNonRoot") is True, where
    assert security.get("runAsUser") == 10001, where
    assert security.get("allowPrivilegeEscalation") is False, where
    assert security.get("readOnlyRootFilesystem") is True, where
    assert security.get("capabilities", {}).get("drop") == ["ALL"], where
    assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
    # A read-only root needs a writable /tmp, from an emptyDir.
    volumes = {v["name"]: v for v in pod.get("volumes", ())}
    tmp = [m for m in container.get("volumeMounts", ()) if m["mountPath"] == "/tmp"]
    assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: /tmp emptyDir"


# ----------------------------------------------------------------------------- rendering


def test_every_build_renders(build, rendered):
    objects = rendered(build)
    assert objects, f"{build} renders no objects"
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == "batchlab", (
                f"{build}: {obj['kind']}/{obj['metadata']['name']} is not in namespace batchlab"
            )
        assert obj["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "batchlab"


def test_root_builds_the_dev_overlay(rendered_text):
    assert rendered_text("root") == rendered_text("dev")


def test_builds_validate_strictly_against_kubernetes_schemas(build, rendered_text, tmp_path):
    path = tmp_path / f"{build}.yaml"
    path.write_text(rendered_text(build))
    result = kubernetes_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    unchecked = set(re.findall(r"schema for kind (\w+)", result.stdout + result.stderr))
    assert unchecked <= CUSTOM_KINDS, f"no schema for {unchecked - CUSTOM_KINDS}"


def test_strict_validation_rejects_unknown_fields(rendered, tmp_path):
    """The check above is not vacuous: a misspelt field fails it."""
    deployment = json.loads(json.dumps(by_name(rendered("base"), "Deployment")["controller"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(deployment))
    assert kubernetes_validate(path).returncode != 0


@pytest.mark.builds(*PLATFORM)
def test_raycluster_validates_against_the_kuberay_crd(build, rendered, raycluster_crd):
    cluster = raycluster(rendered(build))
    assert cluster["apiVersion"] == "ray.io/v1"
    errors = schema_errors(crd_validator(raycluster_crd, "v1"), cluster)
    assert not errors, "\n".join(errors)


def test_crd_validation_rejects_unknown_fields(rendered, raycluster_crd):
    cluster = json.loads(json.dumps(raycluster(rendered("base"))))
    cluster["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert schema_errors(crd_validator(raycluster_crd, "v1"), cluster)


# ----------------------------------------------------------------------------- conventions


@pytest.mark.builds(*PLATFORM)
def test_services_have_deployment_service_account_and_grpc_service(build, rendered):
    objects = rendered(build)
    deployments = by_name(objects, "Deployment")
    services = by_name(objects, "Service")
    accounts = by_name(objects, "ServiceAccount")
    assert set(deployments) == set(SERVICE_ROLES)
    for role, deployment in deployments.items():
        template = deployment["spec"]["template"]
        pod = template["spec"]
        assert selector_matches(deployment["spec"]["selector"], template["metadata"]["labels"])
        account = pod.get("serviceAccountName")
        assert account == role and account in accounts, f"{role}: own ServiceAccount"
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": GRPC_PORTS[role], "metrics": METRICS_PORTS[role]}, role
        # The Service that reaches it has a port named grpc onto the container's grpc port.
        matching = [
            s for s in services.values()
            if selector_matches({"matchLabels": s["spec"]["selector"]}, template["metadata"]["labels"])
        ]
        assert [s["metadata"]["name"] for s in matching] == [role]
        service_ports = {p["name"]: p for p in matching[0]["spec"]["ports"]}
        assert service_ports["grpc"]["port"] == GRPC_PORTS[role]
        assert service_ports["grpc"]["targetPort"] in ("grpc", GRPC_PORTS[role])
        assert service_ports["metrics"]["targetPort"] in ("metrics", METRICS_PORTS[role])
        # The metrics port is announced for annotation-based scraping.
        annotations = template["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true"
        assert annotations.get("prometheus.io/port") == str(METRICS_PORTS[role])


@pytest.mark.builds(*PLATFORM)
def test_deployments_probe_grpc_health(build, rendered):
    for name, deployment in by_name(rendered(build), "Deployment").items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                assert container.get(probe, {}).get("grpc", {}).get("port") == grpc_port, (
                    f"{name}: {probe} must be a gRPC health probe on port {grpc_port}"
                )


def test_every_container_is_bounded_and_locked_down(build, rendered):
    objects = rendered(build)
    for where, template in pod_templates(objects):
        pod = template["spec"]
        assert pod.get("serviceAccountName"), f"{where}: no ServiceAccount"
        for container in pod["containers"]:
            check_locked_down(f"{where} container {container['name']}", pod, container)
        # Only a pod whose code calls the API server holds a token: the controller when its
        # Experiment reconciler is on. (The Ray head's autoscaler gets one through a projected
        # volume of its own; tests/k8s/test_kuberay.py checks that.)
        env = env_of(pod["containers"][0])
        needs_token = str(env.get("BATCHLAB_RECONCILE_EXPERIMENTS", "")).lower() == "true"
        assert pod.get("automountServiceAccountToken") is needs_token, (
            f"{where}: automountServiceAccountToken must be {needs_token}")


def test_references_resolve_within_the_build(build, rendered):
    objects = rendered(build)
    names = {kind: set(by_name(objects, kind)) for kind in
             ("ConfigMap", "Secret", "PersistentVolumeClaim", "ServiceAccount")}
    for kind, name in EXTERNAL:
        names[kind].add(name)
    for where, template in pod_templates(objects):
        pod = template["spec"]
        assert pod["serviceAccountName"] in names["ServiceAccount"], where
        for volume in pod.get("volumes", ()):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in names["ConfigMap"], (where, volume)
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in names["PersistentVolumeClaim"], (where, claim)
            for source in (volume.get("projected") or {}).get("sources", ()):
                if "configMap" in source:
                    assert source["configMap"]["name"] in names["ConfigMap"], (where, source)
        for container in pod["containers"]:
            for source in container.get("envFrom", ()):
                ref = source.get("configMapRef")
                if ref and not ref.get("optional"):
                    assert ref["name"] in names["ConfigMap"], (where, ref)
            for env in container.get("env", ()):
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    ref = env.get("valueFrom", {}).get(key)
                    if ref and not ref.get("optional"):
                        assert ref["name"] in names[kind], (where, env["name"])


@pytest.mark.builds(*PLATFORM)
def test_every_service_takes_the_auth_token_from_the_secret(build, rendered):
    """Defect: only the controller required a token; sharding, checkpoints and the evaluator
    were open. Every gRPC server (and client) reads BATCHLAB_AUTH_TOKEN, from the Secret."""
    for name, deployment in by_name(rendered(build), "Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        source = env_of(container).get("BATCHLAB_AUTH_TOKEN")
        assert isinstance(source, dict) and "secretKeyRef" in source, (
            f"{name}: BATCHLAB_AUTH_TOKEN must come from the Secret {AUTH_SECRET[0]}")
        ref = source["secretKeyRef"]
        assert (ref["name"], ref["key"]) == AUTH_SECRET, name
        assert not ref.get("optional"), f"{name}: the token must not be optional"
    readme = (REPO_ROOT / "k8s" / "README.md").read_text()
    assert f"create secret generic {AUTH_SECRET[0]}" in readme


@pytest.mark.builds(*PLATFORM)
def test_peer_addresses_name_the_services(build, rendered):
    objects = rendered(build)
    (config,) = [c for c in of_kind(objects, "ConfigMap")
                 if c["metadata"]["name"].startswith("batchlab-config")]
    services = by_name(objects, "Service")
    for role in SERVICE_ROLES:
        host, port = config["data"][f"BATCHLAB_{role.upper()}_ADDR"].split(":")
        ports = {p["port"] for p in services[host]["spec"]["ports"] if p["name"] == "grpc"}
        assert ports == {int(port)}, role
    cluster = raycluster(objects)
    # KubeRay names the head's Service <cluster>-head-svc; 10001 is the Ray Client port.
    assert config["data"]["BATCHLAB_RAY_ADDRESS"] == (
        f"ray://{cluster['metadata']['name']}-head-svc:10001"
    )
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "client", "containerPort": 10001} in head["ports"]


@pytest.mark.builds(*PLATFORM)
def test_trainer_pods_have_what_the_controller_hands_its_actors(build, rendered):
    objects = rendered(build)
    env = controller_env(objects)
    assert env["BATCHLAB_JAX_CACHE_DIR"].startswith("/tmp/")
    # Actors export metrics only when the controller gives them a metrics port.
    assert env.get("BATCHLAB_TRAINER_METRICS_PORT")
    for group in raycluster(objects)["spec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        ray, *sidecars = pod["containers"]
        mounts = {m["mountPath"]: m for m in ray["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        # Trainers read datasets from the controller's BATCHLAB_DATA_DIR, on their own pods.
        data = mounts[env["BATCHLAB_DATA_DIR"]]
        assert volumes[data["name"]]["persistentVolumeClaim"]["claimName"] == "datasets"
        # Every actor of the pod writes its metrics to a folder the pod's exporter serves on
        # the one declared port trainer-metrics (services/trainer/metrics_exporter.py); the
        # name metrics is Ray's own port on the Ray container, as KubeRay declares it.
        shared = env_of(ray)["BATCHLAB_TRAINER_METRICS_DIR"]
        (exporter,) = [c for c in sidecars
                       if c.get("command", [])[-1:] == ["services.trainer.metrics_exporter"]]
        assert env_of(exporter)["BATCHLAB_TRAINER_METRICS_DIR"] == shared
        exporter_mounts = {m["mountPath"]: m["name"] for m in exporter["volumeMounts"]}
        assert exporter_mounts[shared] == mounts[shared]["name"], group["groupName"]
        assert "emptyDir" in volumes[mounts[shared]["name"]]
        ports = {p["name"]: p["containerPort"] for p in exporter["ports"]}
        assert ports == {"trainer-metrics": METRICS_PORTS["trainer"]}
        assert int(env_of(exporter)["BATCHLAB_METRICS_PORT"]) == METRICS_PORTS["trainer"]
        assert [p for p in ray["ports"] if p["name"] == "metrics"] == [
            {"name": "metrics", "containerPort": 8080}], group["groupName"]


def test_controller_knows_the_registered_workloads(rendered):
    from batchlab.train import workloads

    names = ",".join(workloads.workload_names())
    assert controller_env(rendered("base"))["BATCHLAB_WORKLOADS"] == names, (
        f"set BATCHLAB_WORKLOADS in k8s/base/controller.yaml to {names}"
    )


def built_images() -> set[str]:
    """The image references `make images` builds (scripts/build_images.sh --list)."""
    result = subprocess.run([str(REPO_ROOT / "scripts" / "build_images.sh"), "--list"],
                            capture_output=True, text=True, timeout=60, check=True)
    return set(result.stdout.split())


def test_images_are_those_make_images_builds(rendered):
    built = built_images()
    version = pyproject_version()
    assert {f"batchlab/control:{version}", f"batchlab/trainer:{version}"} <= built
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe = re.search(r"^images:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe and "scripts/build_images.sh" in recipe.group(1), (
        "`make images` must run scripts/build_images.sh")
    for build in (*PLATFORM, "experiments"):
        for where, template in pod_templates(rendered(build)):
            for container in template["spec"]["containers"]:
                assert container["image"] in built, (
                    f"{build} {where}: {container['image']}: `make images` builds {sorted(built)}")


# ----------------------------------------------------------------------------- accelerators


def _groups(objects) -> dict[str, dict]:
    return {g["groupName"]: g for g in raycluster(objects)["spec"]["workerGroupSpecs"]}


def _limits(group):
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_gpu_build_has_cpu_1gpu_and_8gpu_groups_scaled_from_zero(rendered):
    objects = rendered("gpu")
    cluster = raycluster(objects)
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    groups = _groups(objects)
    assert {name: int(_limits(g).get("nvidia.com/gpu", 0)) for name, g in groups.items()} == {
        "cpu": 0, "gpu-1": 1, "gpu-8": 8}
    for name in ("gpu-1", "gpu-8"):
        group = groups[name]
        assert group["minReplicas"] == 0 and group["replicas"] == 0, f"{name}: scale to zero"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            group["template"]["spec"]["tolerations"])
    assert cluster["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    evaluator = by_name(objects, "Deployment")["evaluator"]["spec"]["template"]["spec"]
    assert evaluator["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    kinds = {o["kind"] for o in objects}
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy"} <= kinds


def test_dev_build_has_no_accelerators(rendered_text, rendered):
    assert "nvidia.com/gpu" not in rendered_text("dev")
    assert "google.com/tpu" not in rendered_text("dev")
    assert all(d["spec"]["replicas"] == 1 for d in of_kind(rendered("dev"), "Deployment"))
    groups = _groups(rendered("dev"))
    assert list(groups) == ["cpu"]
    assert groups["cpu"]["replicas"] == 1 and "tolerations" not in groups["cpu"]["template"]["spec"]


def test_tpu_image_runs_only_on_tpu_pods(rendered_text, rendered):
    """Defect: the TPU tag reached the evaluator and the head (CPU pods) too."""
    assert "nvidia.com/gpu" not in rendered_text("tpu")
    objects = rendered("tpu")
    groups = _groups(objects)
    # A single-host v5e group and the multi-host v5p slices of the paper's BERT runs.
    topologies = {"tpu-v5e-4": "2x2", "tpu-v5p-4x4x8": "4x4x8", "tpu-v5p-8x8x8": "8x8x8"}
    assert set(groups) == {"cpu", *topologies}
    for name, topology in topologies.items():
        tpu = groups[name]
        assert int(_limits(tpu)["google.com/tpu"]) == 4 and tpu["minReplicas"] == 0, name
        assert tpu["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == (
            topology)
        assert tpu["template"]["spec"]["tolerations"][0]["key"] == "google.com/tpu"
    for where, template in pod_templates(objects):
        on_tpu = "google.com/tpu" in json.dumps(template["spec"]["containers"][0]["resources"])
        for container in template["spec"]["containers"]:
            _, tag = image_name_and_tag(container["image"])
            assert tag.endswith("-tpu") == on_tpu, f"{where} {container['name']}: {tag}"


# ----------------------------------------------------------------------------- dashboards


def test_dashboards_config_map_is_provisioned_for_the_sidecar(rendered, repo_root):
    config_maps = by_name(rendered("gpu"), "ConfigMap")
    dashboards = config_maps["batchlab-grafana-dashboards"]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = sorted(p.name for p in (repo_root / "k8s/components/grafana/dashboards").glob("*.json"))
    assert sorted(dashboards["data"]) == files
    # kubectl apply (client side) keeps a copy in an annotation limited to 256 KiB.
    assert len(json.dumps(dashboards["data"])) < 200 * 1024
    prometheus = config_maps["prometheus-batchlab"]
    component = repo_root / "k8s/components/prometheus"
    for key in ("prometheus.yml", "batchlab.rules.yml"):
        assert prometheus["data"][key] == (component / key).read_text()
