"""The images install only hashed, locked packages, accelerator plugins included, and what
KubeRay's probes need. (`make images-smoke` runs the built images; these check the recipes.)"""

from __future__ import annotations

import re

import pytest

from tests.k8s.objects import REPO_ROOT, lock_pins

REQUIREMENTS = REPO_ROOT / "requirements"
DOCKERFILES = sorted(REPO_ROOT.glob("services/*/Dockerfile"))
# The packages each accelerator adds to trainer.lock: its JAX plugin and what the plugin pulls.
ACCELERATOR_PACKAGES = {
    "cuda12": re.compile(r"^(jax-cuda12-(plugin|pjrt)|nvidia-[a-z0-9-]+-cu12)$"),
    "tpu": re.compile(r"^libtpu$"),
}


def _run_commands(dockerfile: str) -> list[str]:
    """The shell of every RUN instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile)
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("RUN ")]


@pytest.mark.parametrize("accelerator", sorted(ACCELERATOR_PACKAGES))
def test_accelerator_locks_are_the_trainer_lock_plus_the_plugin(accelerator):
    """Defect: the trainer image installed the JAX accelerator plugin without hashes."""
    base = lock_pins(REQUIREMENTS / "trainer.lock")
    lock = lock_pins(REQUIREMENTS / f"trainer-{accelerator}.lock")
    changed = {name for name in base if lock.get(name) != base[name]}
    assert not changed, (f"trainer-{accelerator}.lock pins {sorted(changed)} differently from "
                         "trainer.lock: run scripts/lock_accelerators.sh")
    added = set(lock) - set(base)
    assert added and all(ACCELERATOR_PACKAGES[accelerator].match(n) for n in added), added
    assert all(hashes for _, hashes in lock.values()), "every pin carries its hashes"
    jax = base["jax"][0]
    plugin = "jax-cuda12-plugin" if accelerator == "cuda12" else None
    if plugin:
        assert lock[plugin][0] == jax, f"{plugin} {lock[plugin][0]} must match jax {jax}"
    spec = (REQUIREMENTS / f"trainer-{accelerator}.in").read_text()
    assert f"jax[{accelerator}]=={jax}" in spec, "run scripts/lock_accelerators.sh"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_install_only_hashed_locks(path):
    for command in _run_commands(path.read_text()):
        for install in re.findall(r"pip install[^&;]*", command):
            hashed = "--require-hashes" in install and re.search(
                r"-r (\S+\.lock|\"\$lock\")", install)
            local_wheel = re.search(r"--no-deps --no-index /tmp/wheels/\S+\.whl", install)
            assert hashed or local_wheel, f"{path.parent.name}: unpinned install: {install}"
        assert "pip install --no-deps ." not in command, "build isolation fetches setuptools"
        assert "apt-get install" not in command, "packages come from the base image or locks"


def test_trainer_image_picks_the_lock_of_its_accelerator():
    text = (REPO_ROOT / "services" / "trainer" / "Dockerfile").read_text()
    for accelerator in ACCELERATOR_PACKAGES:
        assert f"trainer-{accelerator}.lock" in text or "trainer-${JAX_ACCELERATOR}.lock" in text
    assert "requirements/trainer-${JAX_ACCELERATOR}.lock" in text
    assert "cpu) lock=requirements/trainer.lock" in text


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_check_what_kuberays_probes_need_at_build_time(path):
    """The build fails unless the dashboard agent can serve KubeRay's HTTP probes."""
    assert "import ray.dashboard.optional_deps" in path.read_text()


@pytest.mark.parametrize("lock", ["controller.lock", "trainer.lock", "trainer-cuda12.lock",
                                  "trainer-tpu.lock"])
def test_image_locks_pin_rays_default_extra(lock):
    """ray[default]'s dependencies (the dashboard agent's) are pinned in every image's lock."""
    import importlib.metadata

    needed = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", r).group()).lower()
              for r in importlib.metadata.requires("ray") or () if 'extra == "default"' in r}
    pins = lock_pins(REQUIREMENTS / lock)
    assert pins["ray"][0] == importlib.metadata.version("ray")
    assert not needed - set(pins), f"{lock} lacks {sorted(needed - set(pins))}"


def test_build_tools_come_from_the_hashed_all_lock():
    """grpcio-tools and setuptools (image build only) are taken from all.lock with hashes."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "lock_subset.py"),
         str(REQUIREMENTS / "all.lock"), "grpcio-tools", "grpcio", "protobuf", "setuptools"],
        capture_output=True, text=True, timeout=60, check=True)
    entries = re.findall(r"^([a-z-]+)==(\S+)", result.stdout, re.MULTILINE)
    assert [name for name, _ in entries] == ["grpcio-tools", "grpcio", "protobuf", "setuptools"]
    assert result.stdout.count("--hash=sha256:") >= 4
    pins = lock_pins(REQUIREMENTS / "all.lock")
    assert all(pins[name][0] == version for name, version in entries)
