"""Every PersistentVolumeClaim's access mode and storage class is one its overlay declares
(tests/k8s/data/storage.yaml), and a claim that pods on several nodes mount is ReadWriteMany on
a class that offers it. Defect: the datasets claim was ReadWriteMany with no storage class, so it
stayed Pending on the default (block disk) classes of the major clouds, and every pod that
mounts it waited.

Every Deployment whose code opens a SQLite database runs one pod at a time with that database on
a ReadWriteOnce claim of its own. Defect: two sharding replicas shared one SQLite file in WAL mode
on the ReadWriteMany datasets volume; WAL needs shared memory, which hosts on a network file
system do not share, so the database could be corrupted."""

from __future__ import annotations

import ast
import copy
import os
import posixpath
from pathlib import Path

import pytest
import yaml

from tests.k8s.objects import (
    BUILDS,
    REPO_ROOT,
    SERVICE_ROLES,
    by_name,
    env_of,
    kustomize,
    load_all,
    of_kind,
    pod_templates,
)

DECLARED = yaml.safe_load((Path(__file__).parent / "data" / "storage.yaml").read_text())
STORAGE_COMPONENTS = sorted(p.parent for p in (REPO_ROOT / "k8s/components/storage").glob(
    "*/kustomization.yaml"))
# The variable each SQLite-using service reads for its database's folder (its server.py
# documents it; the code's defaults are a relative path or a folder on the shared datasets volume,
# so a manifest must set it). A service that starts using SQLite fails the test below until it is
# added here and to its manifest.
DATABASE_DIR_ENV = {"controller": "BATCHLAB_STATE_DIR", "sharding": "BATCHLAB_SHARDING_STATE_DIR"}


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
    assert len(of_kind(objects, "PersistentVolumeClaim")) == len(DECLARED["overlays"]["gpu"]["claims"])


def test_the_rule_catches_the_old_unnamed_rwx_claim(rendered):
    objects = copy.deepcopy(rendered("gpu"))
    datasets = by_name(objects, "PersistentVolumeClaim")["datasets"]
    del datasets["spec"]["storageClassName"]
    with pytest.raises(AssertionError, match="storage class None"):
        check_claims("gpu", objects, DECLARED["overlays"]["gpu"])


def sqlite_roles() -> set[str]:
    """The deployables whose own code imports sqlite3 or batchlab.sqlite (parsed, so a comment
    does not count)."""
    roles = set()
    for role in SERVICE_ROLES:
        for path in (REPO_ROOT / "services" / role).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) else [])
                if {"sqlite3", "batchlab.sqlite"} & set(names):
                    roles.add(role)
    return roles


def check_sqlite_deployments(build: str, objects: list[dict]) -> None:
    """One pod at a time (1 replica, Recreate), its database on a ReadWriteOnce claim no other
    pod template mounts."""
    deployments = by_name(objects, "Deployment")
    claims = by_name(objects, "PersistentVolumeClaim")
    users = claim_users(objects)
    for role, variable in DATABASE_DIR_ENV.items():
        deployment = deployments[role]
        replicas = deployment["spec"].get("replicas", 1)
        assert replicas == 1, f"{build} {role}: {replicas} replicas share one SQLite database"
        strategy = deployment["spec"].get("strategy", {}).get("type", "RollingUpdate")
        assert strategy == "Recreate", (
            f"{build} {role}: strategy {strategy} runs the old and the new pod together on one "
            "SQLite database; use Recreate")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == role]
        directory = env_of(container).get(variable)
        assert isinstance(directory, str) and posixpath.isabs(directory), (
            f"{build} {role}: {variable} must name the database folder on a claim; the "
            f"code's default is not one (got {directory!r})")
        mounts = [m for m in container.get("volumeMounts", ())
                  if posixpath.commonpath([m["mountPath"], directory]) == m["mountPath"]]
        assert mounts, f"{build} {role}: {variable}={directory} is on no volume"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        assert claim, f"{build} {role}: {directory} is on volume {volume['name']}, not a claim"
        modes = claims[claim]["spec"]["accessModes"]
        assert modes == ["ReadWriteOnce"], (
            f"{build} {role}: its SQLite database is on claim {claim} ({modes}); WAL mode needs "
            "a local file system, a ReadWriteOnce claim of its own")
        assert [where for where, _ in users[claim]] == [f"Deployment/{role}"], (
            f"{build} {role}: claim {claim} is also mounted by {users[claim]}")


def test_the_sqlite_services_are_the_ones_the_code_names():
    """The list above is the code's: every service importing sqlite3, and its server.py reads
    the variable."""
    assert sqlite_roles() == set(DATABASE_DIR_ENV)
    for role, variable in DATABASE_DIR_ENV.items():
        assert variable in (REPO_ROOT / "services" / role / "server.py").read_text(), role


@pytest.mark.builds("base", "dev", "gpu", "tpu")
def test_sqlite_services_run_one_pod_on_a_readwriteonce_claim(build, rendered):
    check_sqlite_deployments(build, rendered(build))


@pytest.mark.parametrize("defect, message", [
    ({"replicas": 2}, "2 replicas"),
    ({"strategy": {"type": "RollingUpdate"}}, "strategy RollingUpdate"),
    ({"env": None}, "must name the database folder"),
    ({"env": "/data/sharding"}, "on claim datasets"),
])
def test_the_sqlite_rule_catches_the_old_sharding_deployment(rendered, defect, message):
    """The old manifest had each of these: 2 replicas, a rolling update, and no state folder
    (the code's default, $BATCHLAB_DATA_DIR/sharding, is on the datasets volume)."""
    objects = copy.deepcopy(rendered("gpu"))
    spec = by_name(objects, "Deployment")["sharding"]["spec"]
    container = spec["template"]["spec"]["containers"][0]
    if "env" in defect:
        container["env"] = [e for e in container["env"]
                            if e["name"] != DATABASE_DIR_ENV["sharding"]]
        if defect["env"]:
            container["env"].append({"name": DATABASE_DIR_ENV["sharding"], "value": defect["env"]})
    else:
        spec.update(defect)
    with pytest.raises(AssertionError, match=message):
        check_sqlite_deployments("gpu", objects)


def test_every_storage_component_is_documented():
    readme = (REPO_ROOT / "k8s" / "README.md").read_text()
    for component in STORAGE_COMPONENTS:
        assert f"components/storage/{component.name}" in readme, component.name
