"""Render the kustomize builds under k8s/ once per session, offline, for the manifest tests.

A test that takes a `build` argument runs once per build in BUILDS; `rendered(build)` returns
its objects. Needs `kubectl` (it carries kustomize); the tests skip, saying so, without it.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

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
# The builds that deploy the platform (all but the experiment submissions).
PLATFORM_BUILDS = ("root", "base", "dev", "gpu", "tpu")


def shared_dir() -> Path:
    """The shared reference folder: $BATCHLAB_SHARED_DIR, else ../shared beside the checkout."""
    configured = os.environ.get("BATCHLAB_SHARED_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared"


@functools.cache
def _render(build: str) -> tuple[str, list[dict]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize builds cannot be rendered")
    result = subprocess.run(
        [kubectl, "kustomize", str(BUILDS[build])],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {BUILDS[build]} failed:\n{result.stderr}")
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return result.stdout, objects


@pytest.fixture(scope="session")
def rendered():
    """rendered(build) -> the build's objects (dicts), rendered once per session."""
    return lambda build: _render(build)[1]


@pytest.fixture(scope="session")
def rendered_text():
    """rendered_text(build) -> the build's rendered YAML."""
    return lambda build: _render(build)[0]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "build" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("builds")
        names = marker.args if marker else tuple(BUILDS)
        metafunc.parametrize("build", names)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "builds(*names): run a `build` test for these builds only")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def raycluster_crd() -> dict:
    """The KubeRay RayCluster CRD from the shared reference folder (skips when it is absent)."""
    path = shared_dir() / "reference" / "kuberay-crds" / "ray.io_rayclusters.yaml"
    if not path.is_file():
        pytest.skip(
            f"KubeRay CRD not found at {path} (set BATCHLAB_SHARED_DIR to the shared folder): "
            "RayCluster manifests are not checked against its schema"
        )
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (scripts/ensure_prometheus.sh installs it)")
    return path
