"""Fixtures for the controller tests that need trainers: one local Ray cluster per session
(shared with tests/integration through services.trainer.local_ray), mnist1d 'small' built
once, and a JAX compilation cache the trainer actors share."""

from __future__ import annotations

import os

import pytest

# Ray reads these when it is first imported; set before any test module imports it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _key, _value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                     "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """The session's local Ray (4 logical CPUs); its GCS address."""
    import shutil
    import tempfile

    import ray

    from services.trainer.local_ray import ensure_local_ray

    # A short folder: Ray puts unix sockets in it.
    folder = tempfile.mkdtemp(prefix="blray-", dir="/tmp")
    yield ensure_local_ray(folder, num_cpus=4)
    ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
    """mnist1d 'small' built once per session (the folder is shared with tests/integration)."""
    from batchlab import data

    path = tmp_path_factory.getbasetemp() / "batchlab_tfds"
    data.prepare("mnist1d", path, config="small")
    return str(path)


@pytest.fixture(scope="session")
def jax_cache_dir(tmp_path_factory) -> str:
    """A persistent compilation cache the session's trainer actors share."""
    path = tmp_path_factory.getbasetemp() / "batchlab_jax_cache"
    path.mkdir(exist_ok=True)
    return str(path)
