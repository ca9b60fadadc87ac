"""Fixtures every test folder shares: a private TMPDIR, and (for tests with trainers) one local
Ray cluster, mnist1d 'small' built once and a shared JAX compilation cache per session."""

from __future__ import annotations

import os
import re
import sys
import tempfile

import pytest

# JAX and Ray read these when first imported: set them before any test module imports either.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _key, _value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                     "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}.items():
    os.environ.setdefault(_key, _value)


# Folders whose tests start Ray, a stack of services or a benchmark run, and their xdist group.
_HEAVY_FOLDERS = {"integration": "system", "benchmarks": "benchmarks"}


def pytest_itemcollected(item: pytest.Item) -> None:
    """Group the heavy tests for xdist (``make test`` runs two workers, --dist loadgroup).

    The tests that start Ray or a stack of services run one after another on one worker, and
    the benchmark smoke runs one after another on a worker, so at most two such things run at
    once on the machine; the unit tests fill the gaps (much of a system test is waiting for
    processes to start). Marked as each item is collected, before any collection hook (xdist
    reads the marks in its own). Without xdist the marks do nothing.
    """
    folder = item.path.relative_to(item.config.rootpath / "tests").parts[0]
    group = _HEAVY_FOLDERS.get(folder)
    if group is None and "ray_cluster" in getattr(item, "fixturenames", ()):
        group = "system"
    if group is not None:
        item.add_marker(pytest.mark.xdist_group(group))


# Skips a machine may show, with why; any other skip fails the run (a skipped test is a
# hidden failure). KubeRay's CRDs come from the shared reference folder, which CI has and a
# clone elsewhere may lack; the others need hardware this machine may not have.
ALLOWED_SKIPS = (
    re.compile(r"KubeRay's RayCluster CRD is missing"),
    re.compile(r"needs 2 CPUs"),
    re.compile(r"needs a GPU|no GPU|CUDA|TPU"),
)
_unexpected_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(pattern.search(reason) for pattern in ALLOWED_SKIPS):
        _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run for a skip that is not on ALLOWED_SKIPS (on xdist, in the controller,
    which sees every worker's reports)."""
    if hasattr(session.config, "workerinput") or not _unexpected_skips:
        return
    session.config.get_terminal_writer().line(
        "skips not on tests/conftest.py's ALLOWED_SKIPS (install what they need, or allow "
        "them there with the reason):\n  " + "\n  ".join(_unexpected_skips), red=True)
    if exitstatus == 0:
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def fresh_kept_programs():
    """Forget the jitted programs a process keeps across runs (batchlab.train.loop) after each
    test: one that monkeypatches code read while tracing would leave its program to later
    tests with the same program key."""
    yield
    loop = sys.modules.get("batchlab.train.loop")
    if loop is not None:
        loop._PROGRAMS.clear()


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory):
    """Points TMPDIR (and tempfile's cached default) at a test folder.

    tfds leaves empty ``tmp*tfds`` folders and uploads spool in the temp folder; they go here.
    """
    path = tmp_path_factory.mktemp("tmpdir")
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = str(path)
    yield path
    tempfile.tempdir = saved_tempdir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's local Ray (4 logical CPUs); its GCS address."""
    import shutil

    import ray

    from batchlab.runner.local_ray import ensure_local_ray

    # A short folder outside TMPDIR: Ray puts unix sockets in it (path length limit).
    folder = tempfile.mkdtemp(prefix="blray-", dir="/tmp")
    yield ensure_local_ray(folder, num_cpus=4)
    ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
    """mnist1d 'small' built once per session."""
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
