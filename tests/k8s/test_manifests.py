"""The kustomize builds render offline, validate against the Kubernetes and KubeRay schemas, and
keep the deployment conventions (conventions.md, "Deployment")."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from batchlab.rpc.metrics import METRICS_PORTS

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.32.0"
PLATFORM = ("root", "base", "dev", "gpu", "tpu")
# Kinds kubernetes-validate has no schema for; RayCluster is checked against its CRD below.
CUSTOM_KINDS = {"RayCluster", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
SERVICE_ROLES = ("controller", "sharding", "checkpoints", "evaluator")
GRPC_PORTS = {"controller": 50051, "sharding": 50052, "checkpoints": 50053, "evaluator": 50054}


# ----------------------------------------------------------------------------- helpers


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def by_name(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in of_kind(objects, kind)}


def pod_templates(objects: list[dict]) -> list[tuple[str, dict]]:
    """(where, pod template) for every Deployment, Job and RayCluster group."""
    templates = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            templates.append((name, obj["spec"]["template"]))
        elif obj["kind"] == "RayCluster":
            templates.append((f"{name} head", obj["spec"]["headGroupSpec"]["template"]))
            for group in obj["spec"].get("workerGroupSpecs", ()):
                templates.append((f"{name} group {group['groupName']}", group["template"]))
    return templates


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """Kubernetes LabelSelector semantics; an empty selector matches everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def effective_security(pod_spec: dict, container: dict) -> dict:
    """The container's security settings with the pod's defaults filled in."""
    merged = {
        k: v for k, v in (pod_spec.get("securityContext") or {}).items()
        if k in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")
    }
    merged.update(container.get("securityContext") or {})
    return merged


def image_name_and_tag(image: str) -> tuple[str, str]:
    name, _, tag = image.rpartition(":")
    return (name, tag) if name and "/" not in tag else (image, "")


def images_built_by_make(makefile: str) -> dict[str, set[str]]:
    """Image name -> tag templates that the Makefile's `images` recipe builds (docker build -t)."""
    images: dict[str, set[str]] = {}
    text = makefile.replace("\\\n", " ")
    in_recipe = False
    for line in text.splitlines():
        if re.match(r"^images\s*:", line):
            in_recipe = True
            continue
        if not in_recipe:
            continue
        if line.startswith("\t"):
            for name, tag in re.findall(r"(?:-t|--tag)[ =]+([^\s:]+)(?::(\S+))?", line):
                images.setdefault(name, set()).add(tag)
        elif line.strip() and not line.lstrip().startswith("#"):
            break
    return images


def strict_crd_schema(schema: dict) -> dict:
    """A CRD's structural schema, closed: unknown fields are errors, as the API server's strict
    field validation makes them, except where the schema preserves unknown fields."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {k: strict_crd_schema(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            out[key] = strict_crd_schema(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [strict_crd_schema(s) for s in schema[key]]
    return out


def crd_validator(crd: dict, version: str) -> jsonschema.Validator:
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict_crd_schema(served["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).with_name("kubernetes-validate")
    if not tool.exists():
        pytest.skip(f"kubernetes-validate is not installed beside {sys.executable}")
    return subprocess.run(
        [str(tool), "--strict", "--kubernetes-version", K8S_VERSION, str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def pyproject_version() -> str:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


# ----------------------------------------------------------------------------- rendering


def test_every_build_renders(build, rendered):
    objects = rendered(build)
    assert objects, f"{build} renders no objects"
    for obj in objects:
        if obj["kind"] != "Namespace":
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
    (cluster,) = of_kind(rendered(build), "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    validator = crd_validator(raycluster_crd, "v1")
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(cluster)
    ]
    assert not errors, "\n".join(errors)


def test_crd_validation_rejects_unknown_fields(rendered, raycluster_crd):
    cluster = json.loads(json.dumps(of_kind(rendered("base"), "RayCluster")[0]))
    cluster["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert list(crd_validator(raycluster_crd, "v1").iter_errors(cluster))


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
    for where, template in pod_templates(rendered(build)):
        pod = template["spec"]
        assert pod.get("automountServiceAccountToken") is False, where
        assert pod.get("serviceAccountName"), f"{where}: no ServiceAccount"
        for container in pod["containers"]:
            label = f"{where} container {container['name']}"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{label}: {kind}"
            security = effective_security(pod, container)
            assert security.get("runAsNonRoot") is True, label
            assert security.get("runAsUser") == 10001, label
            assert security.get("allowPrivilegeEscalation") is False, label
            assert security.get("readOnlyRootFilesystem") is True, label
            assert security.get("capabilities", {}).get("drop") == ["ALL"], label
            assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", label
            # A read-only root needs a writable /tmp, from an emptyDir.
            volumes = {v["name"]: v for v in pod.get("volumes", ())}
            tmp = [m for m in container.get("volumeMounts", ()) if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{label}: /tmp emptyDir"


def test_references_resolve_within_the_build(build, rendered):
    objects = rendered(build)
    names = {kind: set(by_name(objects, kind)) for kind in
             ("ConfigMap", "Secret", "PersistentVolumeClaim", "ServiceAccount")}
    for where, template in pod_templates(objects):
        pod = template["spec"]
        assert pod["serviceAccountName"] in names["ServiceAccount"], where
        for volume in pod.get("volumes", ()):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in names["ConfigMap"], (where, volume)
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in names["PersistentVolumeClaim"], (where, claim)
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
def test_peer_addresses_name_the_services(build, rendered):
    objects = rendered(build)
    (config,) = [c for c in of_kind(objects, "ConfigMap")
                 if c["metadata"]["name"].startswith("batchlab-config")]
    services = by_name(objects, "Service")
    for role in SERVICE_ROLES:
        host, port = config["data"][f"BATCHLAB_{role.upper()}_ADDR"].split(":")
        ports = {p["port"] for p in services[host]["spec"]["ports"] if p["name"] == "grpc"}
        assert ports == {int(port)}, role
    (cluster,) = of_kind(objects, "RayCluster")
    # KubeRay names the head's Service <cluster>-head-svc; 10001 is the Ray Client port.
    assert config["data"]["BATCHLAB_RAY_ADDRESS"] == (
        f"ray://{cluster['metadata']['name']}-head-svc:10001"
    )
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "client", "containerPort": 10001} in head["ports"]


def _controller_env(objects) -> dict[str, str]:
    container = by_name(objects, "Deployment")["controller"]["spec"]["template"]["spec"]
    return {e["name"]: e.get("value") for e in container["containers"][0].get("env", ())}


@pytest.mark.builds(*PLATFORM)
def test_trainer_pods_have_what_the_controller_hands_its_actors(build, rendered):
    objects = rendered(build)
    env = _controller_env(objects)
    (group,) = _worker_groups(objects).values()
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # Trainers read datasets from the controller's BATCHLAB_DATA_DIR, on their own pods.
    data = mounts[env["BATCHLAB_DATA_DIR"]]
    assert volumes[data["name"]]["persistentVolumeClaim"]["claimName"] == "datasets"
    # They serve metrics on the port the controller gives them, which the pod declares.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(env["BATCHLAB_TRAINER_METRICS_PORT"]) == ports["metrics"] == METRICS_PORTS["trainer"]
    assert env["BATCHLAB_JAX_CACHE_DIR"].startswith("/tmp/")
    assert 1 <= int(env["BATCHLAB_NUM_TRAINERS"]) <= group["maxReplicas"] * 8


def test_controller_knows_the_registered_workloads(rendered):
    workloads = pytest.importorskip("batchlab.train.workloads")
    names = ",".join(workloads.workload_names())
    assert _controller_env(rendered("base"))["BATCHLAB_WORKLOADS"] == names, (
        f"set BATCHLAB_WORKLOADS in k8s/base/controller.yaml to {names}"
    )


def test_makefile_images_parser():
    makefile = (
        "VERSION ?= 0.1.0\n"
        "images: ## build the container images\n"
        "\tdocker build -t batchlab/control:$(VERSION) -f services/controller/Dockerfile .\n"
        "\tdocker build -t batchlab/trainer:$(VERSION) \\\n\t  -f services/trainer/Dockerfile .\n"
        "\n"
        "lint:\n\truff check\n\tdocker build -t not/this .\n"
    )
    assert images_built_by_make(makefile) == {
        "batchlab/control": {"$(VERSION)"},
        "batchlab/trainer": {"$(VERSION)"},
    }


def test_images_are_those_make_images_builds(rendered):
    built = images_built_by_make((REPO_ROOT / "Makefile").read_text())
    assert built, (
        "the Makefile has no `images` target building batchlab/control and batchlab/trainer "
        "(docker build -t batchlab/control:$(VERSION) -f services/controller/Dockerfile .)"
    )
    version = pyproject_version()
    for build in ("root", "base", "dev", "gpu", "tpu", "experiments"):
        for where, template in pod_templates(rendered(build)):
            for container in template["spec"]["containers"]:
                name, tag = image_name_and_tag(container["image"])
                assert name in built, f"{build} {where}: `make images` does not build {name}"
                tags = {re.sub(r"\$[({]VERSION[)}]", version, t) for t in built[name]}
                assert tag in tags, (
                    f"{build} {where}: {container['image']}: `make images` builds tags {tags}"
                )
    for role in ("controller", "trainer"):
        assert (REPO_ROOT / "services" / role / "Dockerfile").is_file()


# ----------------------------------------------------------------------------- accelerators


def _worker_groups(objects):
    (cluster,) = of_kind(objects, "RayCluster")
    return {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}


def _limits(group):
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_gpu_build_runs_trainers_and_evaluator_on_gpus(rendered):
    objects = rendered("gpu")
    (group,) = _worker_groups(objects).values()
    assert int(_limits(group)["nvidia.com/gpu"]) >= 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        group["template"]["spec"]["tolerations"]
    )
    evaluator = by_name(objects, "Deployment")["evaluator"]["spec"]["template"]["spec"]
    assert evaluator["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    kinds = {o["kind"] for o in objects}
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy"} <= kinds


def test_dev_build_has_no_accelerators(rendered_text, rendered):
    assert "nvidia.com/gpu" not in rendered_text("dev")
    assert "google.com/tpu" not in rendered_text("dev")
    assert all(d["spec"]["replicas"] == 1 for d in of_kind(rendered("dev"), "Deployment"))
    (group,) = _worker_groups(rendered("dev")).values()
    assert group["replicas"] == 1 and "tolerations" not in group["template"]["spec"]


def test_tpu_component_replaces_gpu_workers(rendered_text, rendered):
    assert "nvidia.com/gpu" not in rendered_text("tpu")
    groups = _worker_groups(rendered("tpu"))
    assert set(groups) == {"tpu"}
    pod = groups["tpu"]["template"]["spec"]
    assert int(_limits(groups["tpu"])["google.com/tpu"]) == 4
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x2"
    assert pod["tolerations"][0]["key"] == "google.com/tpu"
    assert pod["containers"][0]["image"].endswith("-tpu")


# ----------------------------------------------------------------------------- networking


def _pod_labels(objects):
    labels = {}
    for _, template in pod_templates(objects):
        component = template["metadata"]["labels"]["app.kubernetes.io/component"]
        labels[component] = template["metadata"]["labels"]
    return labels


def _ingress_allowed(policies, source, target, port, *, source_namespace="batchlab"):
    """Whether the policies let `source` pod labels reach `target` on the named port `port`
    (ingress only, as NetworkPolicy computes it; namespaces by their name label)."""
    selecting = [
        p for p in policies
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selector_matches(p["spec"]["podSelector"], target)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or ():
            ports = rule.get("ports")
            if ports and port not in {p.get("port") for p in ports}:
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                ns_selector = peer.get("namespaceSelector")
                if ns_selector is None:
                    ns_ok = source_namespace == "batchlab"
                else:
                    ns_ok = selector_matches(
                        ns_selector, {"kubernetes.io/metadata.name": source_namespace}
                    )
                if ns_ok and selector_matches(peer.get("podSelector"), source):
                    return True
    return False


def test_network_policies_allow_exactly_the_calls_batchlab_makes(rendered):
    objects = rendered("gpu")
    policies = of_kind(objects, "NetworkPolicy")
    pods = _pod_labels(objects)
    pods["submit"] = _pod_labels(rendered("experiments"))["submit"]
    pods["stranger"] = {"app": "something-else"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}

    allowed = [
        ("trainer", "controller", "grpc"), ("trainer", "sharding", "grpc"),
        ("trainer", "checkpoints", "grpc"), ("controller", "sharding", "grpc"),
        ("controller", "checkpoints", "grpc"), ("controller", "evaluator", "grpc"),
        ("evaluator", "checkpoints", "grpc"), ("submit", "controller", "grpc"),
        ("controller", "ray-head", "client"), ("trainer", "ray-head", "gcs-server"),
        ("ray-head", "trainer", "any-ray-port"), ("trainer", "trainer", "any-ray-port"),
    ]
    denied = [
        ("trainer", "evaluator", "grpc"), ("evaluator", "controller", "grpc"),
        ("sharding", "checkpoints", "grpc"), ("submit", "sharding", "grpc"),
        ("stranger", "controller", "grpc"), ("controller", "ray-head", "gcs-server"),
        ("controller", "trainer", "metrics"), ("stranger", "trainer", "any-ray-port"),
    ]
    for source, target, port in allowed:
        assert _ingress_allowed(policies, pods[source], pods[target], port), (source, target, port)
    for source, target, port in denied:
        assert not _ingress_allowed(policies, pods[source], pods[target], port), (
            source, target, port
        )
    for role in (*SERVICE_ROLES, "trainer"):
        assert _ingress_allowed(
            policies, prometheus, pods[role], "metrics", source_namespace="monitoring"
        ), role
        assert not _ingress_allowed(
            policies, prometheus, pods[role], "grpc", source_namespace="monitoring"
        ), role


# ----------------------------------------------------------------------------- monitoring


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
    (pod_monitor,) = of_kind(objects, "PodMonitor")
    templates = [
        t for _, t in pod_templates(objects)
        if selector_matches(pod_monitor["spec"]["selector"], t["metadata"]["labels"])
    ]
    assert [t["metadata"]["labels"]["app.kubernetes.io/component"] for t in templates] == ["trainer"]
    ports = {p["name"]: p["containerPort"] for p in templates[0]["spec"]["containers"][0]["ports"]}
    assert ports["metrics"] == METRICS_PORTS["trainer"]
    assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} == {"metrics"}


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


# ----------------------------------------------------------------------------- experiments


def spec_request_id(spec_text: str) -> str:
    """k8s-<name>-<10 hex digits of the sha256 of the spec's canonical JSON>."""
    spec = yaml.safe_load(spec_text)
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return f"k8s-{spec['name']}-{hashlib.sha256(canonical.encode()).hexdigest()[:10]}"


def test_submit_jobs_carry_content_derived_request_ids(rendered, rendered_text, repo_root):
    objects = rendered("experiments")
    config_maps = by_name(objects, "ConfigMap")
    jobs = of_kind(objects, "Job")
    assert jobs
    seen = set()
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = container["args"]
        assert args[:1] == ["submit"] and "--wait=false" in args
        assert args[args.index("--controller") + 1] == "controller:50051"
        spec_path = Path(args[1])
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(spec_path.parent))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        spec_text = config_maps[volume["configMap"]["name"]]["data"][spec_path.name]
        expected = spec_request_id(spec_text)
        request_id = args[args.index("--request-id") + 1]
        assert request_id == expected, f"{job['metadata']['name']}: use --request-id {expected}"
        job_name = expected.replace("k8s-", "submit-", 1)
        assert job["metadata"]["name"] == job_name, f"name the Job {job_name}"
        assert request_id not in seen
        seen.add(request_id)
    # Rendering is deterministic, so applying again changes nothing.
    assert subprocess.run(
        ["kubectl", "kustomize", str(repo_root / "k8s/overlays/experiments")],
        capture_output=True, text=True, check=True,
    ).stdout == rendered_text("experiments")


def test_shipped_specs_are_copies_of_experiment_specs(repo_root):
    specs = sorted((repo_root / "k8s/overlays/experiments/specs").glob("*.yaml"))
    assert specs
    for spec in specs:
        originals = list((repo_root / "experiments").rglob(spec.name))
        assert len(originals) == 1, f"{spec.name}: no single experiments/**/{spec.name} to mirror"
        assert spec.read_text() == originals[0].read_text(), (
            f"{spec} differs from {originals[0]}: copy it again (kustomize reads no file "
            "outside its folder)"
        )


def test_shipped_specs_are_valid(repo_root):
    search = pytest.importorskip("batchlab.search")
    for spec in sorted((repo_root / "k8s/overlays/experiments/specs").glob("*.yaml")):
        assert search.load_spec(str(spec)).name == spec.stem
