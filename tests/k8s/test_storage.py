"""Every PersistentVolumeClaim's access mode and storage class is one its overlay declares
(tests/k8s/data/storage.yaml), and a claim that pods on several nodes mount is ReadWriteMany on
a class that offers it. Defect: the datasets claim was ReadWriteMany with no storage class, so it
stayed Pending on the default (block disk) classes of the major clouds, and every pod that
mounts it waited."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.k8s.objects import (
    BUILDS,
    REPO_ROOT,
    by_name,
    kustomize,
    load_all,
    of_kind,
    pod_templates,
)

DECLARED = yaml.safe_load((Path(__file__).parent / "data" / "storage.yaml").read_text())
STORAGE_COMPONENTS = sorted(p.parent for p in (REPO_ROOT / "k8s/components/storage").glob(
    "*/kustomization.yaml"))


def claim_users(objects: list[dict]) -> dict[str, list[tuple[str, int]]]:
    """claim -> (pod template, how many pods may run it at once) for every template mounting it."""
    users: dict[str, list[tuple[str, int]]] = {}
    for where, template in pod_templates(objects):
        owner = next(o for o in objects if where.startswith(f"{o['kind']}/{o['metadata']['name']}"))
        if owner["kind"] == "RayCluster":
            group = where.rsplit(" ", 1)[-1]
            specs = {g["groupName"]: g for g in owner["spec"]["workerGroupSpecs"]}
            count = specs[group]["maxReplicas"] if group in specs else 1
        else:
            count = owner["spec"].get("replicas", 1)
        for volume in template["spec"].get("volumes", ()):
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim:
                users.setdefault(claim, []).append((where, count))
    return users


def check_claims(build: str, objects: list[dict], declared: dict) -> None:
    claims = by_name(objects, "PersistentVolumeClaim")
    assert set(claims) == set(declared["claims"]), (
        f"{build}: claims {sorted(claims)}; tests/k8s/data/storage.yaml declares "
        f"{sorted(declared['claims'])}")
    users = claim_users(objects)
    for name, claim in claims.items():
        allowed = declared["claims"][name]
        modes = claim["spec"]["accessModes"]
        storage_class = claim["spec"].get("storageClassName")
        assert modes in [allowed["access_modes"]], f"{build} {name}: access modes {modes}"
        assert storage_class in allowed["storage_classes"], (
            f"{build} {name}: storage class {storage_class!r}; the overlay supports "
            f"{allowed['storage_classes']}")
        many_pods = sum(count for _, count in users.get(name, ())) > 1
        if many_pods and not declared["single_node"]:
            assert modes == ["ReadWriteMany"], (
                f"{build} {name}: mounted by {users[name]} across nodes needs ReadWriteMany")
        if "ReadWriteMany" in modes:
            assert storage_class in DECLARED["rwx_classes"], (
                f"{build} {name}: ReadWriteMany on {storage_class!r}, not a class known to "
                f"offer it ({DECLARED['rwx_classes']}); the default class does not")


@pytest.mark.builds("dev", "gpu", "tpu")
def test_claims_match_what_the_overlay_declares(build, rendered):
    check_claims(build, rendered(build), DECLARED["overlays"][build])


@pytest.mark.parametrize("component", STORAGE_COMPONENTS, ids=lambda p: p.name)
def test_each_storage_component_gives_the_gpu_overlay_a_declared_rwx_class(component, tmp_path):
    """The documented way to pick the datasets' class: add a component to the overlay."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(BUILDS["gpu"], overlay)],
        "components": [os.path.relpath(component, overlay)],
    }))
    objects = load_all(kustomize(overlay))
    check_claims(f"gpu + {component.name}", objects, DECLARED["overlays"]["gpu"])
    datasets = by_name(objects, "PersistentVolumeClaim")["datasets"]
    assert datasets["spec"]["storageClassName"] != "nfs-csi" or component.name == "nfs"
    assert len(of_kind(objects, "PersistentVolumeClaim")) == 3


def test_the_rule_catches_the_old_unnamed_rwx_claim(rendered):
    import copy

    objects = copy.deepcopy(rendered("gpu"))
    datasets = by_name(objects, "PersistentVolumeClaim")["datasets"]
    del datasets["spec"]["storageClassName"]
    with pytest.raises(AssertionError, match="storage class None"):
        check_claims("gpu", objects, DECLARED["overlays"]["gpu"])


def test_every_storage_component_is_documented():
    readme = (REPO_ROOT / "k8s" / "README.md").read_text()
    for component in STORAGE_COMPONENTS:
        assert f"components/storage/{component.name}" in readme, component.name
