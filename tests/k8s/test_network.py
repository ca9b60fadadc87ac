"""Network policies allow exactly the calls batchlab's code makes, and Ray's ports only to
batchlab's own pods, in every overlay.

The calls are read from the code, not listed by hand: for each deployable, its package under
services/ and the batchlab modules it imports are parsed (ast) for the gRPC stubs they build
(`<Service>Stub(...)`), which server registers each service (`Registration.for_service`), and
where each address comes from (the BATCHLAB_<PEER>_ADDR variables the code reads, or, for the
trainers, the addresses the controller reads and hands them in TrainerSettings). The controller
reads BATCHLAB_RAY_ADDRESS: it dials the Ray head's client port.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchlab.rpc.metrics import METRICS_PORTS
from tests.k8s import kuberay
from tests.k8s.objects import REPO_ROOT, of_kind, pod_templates, raycluster, selector_matches

LIBS = REPO_ROOT / "libs"
SERVICES = REPO_ROOT / "services"
# Where each deployable's own code lives: its package, or (the CLI in a pod labelled
# batchlab.io/client=true) its entry module.
ROLE_CODE = {
    "controller": [SERVICES / "controller"],
    "sharding": [SERVICES / "sharding"],
    "checkpoints": [SERVICES / "checkpoints"],
    "evaluator": [SERVICES / "evaluator"],
    "trainer": [SERVICES / "trainer"],
    "client": [LIBS / "batchlab" / "cli.py"],
}
CLIENT_LABELS = {"batchlab.io/client": "true"}
STRANGER = {"app": "something-else"}
_ADDR = re.compile(r"^BATCHLAB_([A-Z]+)_ADDR$")


def _files(paths: list[Path]) -> list[Path]:
    found = []
    for path in paths:
        found.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return found


def _module_file(module: str) -> Path | None:
    """The file of a batchlab.* module (generated protos excluded: they call nothing)."""
    if not module.startswith("batchlab") or module.startswith("batchlab.proto.v1"):
        return None
    base = LIBS / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def _imports(path: Path) -> tuple[Path, ...]:
    """The batchlab modules a file imports (anywhere in it, lazy imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            file = _module_file(name)
            if file is not None:
                found.append(file)
    return tuple(found)


def code_of(role: str) -> list[Path]:
    """The role's files and every batchlab module they import, transitively. Other services'
    packages are not followed: what the controller imports from services.trainer runs in the
    trainer pods (Ray actors)."""
    seen: set[Path] = set()
    todo = _files(ROLE_CODE[role])
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(_imports(path))
    return sorted(seen)


def _strings(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def _calls(tree: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            yield name, node


def stubs_built(role: str) -> set[str]:
    """gRPC services whose stubs the role's code builds (health checks aside)."""
    services = set()
    for path in code_of(role):
        for name, _ in _calls(ast.parse(path.read_text())):
            if name.endswith("ServiceStub"):
                services.add(name.removesuffix("Stub"))
    return services


def addresses_read(role: str) -> set[str]:
    """Peers whose BATCHLAB_<PEER>_ADDR (or BATCHLAB_RAY_ADDRESS: "ray") the role reads."""
    peers = set()
    for path in code_of(role):
        tree = ast.parse(path.read_text())
        for text in _strings(tree):
            match = _ADDR.match(text)
            if match:
                peers.add(match.group(1).lower())
            if text == "BATCHLAB_RAY_ADDRESS":
                peers.add("ray")
        for name, call in _calls(tree):
            if name == "peer_address" and call.args and isinstance(call.args[0], ast.Constant):
                peers.add(str(call.args[0].value))
    return peers


@functools.cache
def server_roles() -> dict[str, str]:
    """gRPC service name -> the role whose server registers it."""
    roles = {}
    for server in SERVICES.glob("*/server.py"):
        for name, call in _calls(ast.parse(server.read_text())):
            if name == "for_service":
                (service,) = [a.value for a in call.args if isinstance(a, ast.Constant)]
                roles[service] = server.parent.name
    return roles


def trainer_settings_peers() -> set[str]:
    """Peers whose addresses the controller hands its trainers (TrainerSettings.*_address)."""
    from batchlab.proto.v1 import controller_pb2

    return {f.name.removesuffix("_address") for f in controller_pb2.TrainerSettings.DESCRIPTOR.fields
            if f.name.endswith("_address")}


@functools.cache
def derived_calls() -> frozenset[tuple[str, str, str]]:
    """(source role, target role, target port name) for every call the code makes."""
    roles = server_roles()
    handed = trainer_settings_peers()
    calls = set()
    for role in ROLE_CODE:
        read = addresses_read(role)
        for service in stubs_built(role):
            target = roles[service]
            if target == role:
                continue  # a process calling its own server over loopback
            source_of_address = target in read or (role == "trainer" and target in handed
                                                   and target in addresses_read("controller"))
            assert source_of_address, (
                f"{role} builds a {service} stub but reads no BATCHLAB_{target.upper()}_ADDR "
                "and is handed none: where does its address come from?")
            calls.add((role, target, "grpc"))
        if "ray" in read:
            calls.add((role, "ray-head", "client"))
    return frozenset(calls)


def test_the_calls_are_read_from_the_code():
    """What the derivation finds today (a check that it finds something, not the source of
    the allowed list): trainers report to the controller and use sharding and checkpoints, the
    evaluator restores checkpoints, the CLI calls the controller, the controller is a Ray
    Client."""
    calls = derived_calls()
    assert ("trainer", "controller", "grpc") in calls
    assert ("evaluator", "checkpoints", "grpc") in calls
    assert ("client", "controller", "grpc") in calls
    assert ("controller", "ray-head", "client") in calls
    assert {t for _, t, _ in calls} <= {*ROLE_CODE, "ray-head"}


# ----------------------------------------------------------------------------- policies


def _port_matches(rule_port: object, port: tuple[str, int]) -> bool:
    return rule_port == port[0] or rule_port == port[1]


def ingress_allowed(policies, source: dict, target: dict, port: tuple[str, int], *,
                    source_namespace: str = "batchlab") -> bool:
    """Whether NetworkPolicy lets a pod with `source` labels reach a pod with `target` labels
    on `port` (name, number); namespaces are matched by their name label."""
    selecting = [p for p in policies
                 if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selector_matches(p["spec"]["podSelector"], target)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or ():
            ports = rule.get("ports")
            if ports and not any(_port_matches(p.get("port"), port) for p in ports):
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
                        ns_selector, {"kubernetes.io/metadata.name": source_namespace})
                if ns_ok and selector_matches(peer.get("podSelector"), source):
                    return True
    return False


def _pods(objects) -> dict[str, dict]:
    pods = {}
    for _, template in pod_templates(objects):
        labels = template["metadata"]["labels"]
        pods[labels["app.kubernetes.io/component"]] = labels
    pods["client"] = {**CLIENT_LABELS}
    return pods


def _ray_ports(objects) -> dict[str, list[tuple[str, int]]]:
    """Ports of the Ray pods: the head Service's, the dashboard agent's, a worker port, and the
    Ray container ports of the worker pods KubeRay builds (Ray's own `metrics` among them)."""
    cluster = raycluster(objects)
    internal = [("", kuberay.DEFAULT_DASHBOARD_AGENT_PORT), ("", 40000)]
    workers = {(p.get("name", ""), p["containerPort"])
               for group in kuberay.groups(cluster) if group.node_type == "worker"
               for p in kuberay.built_pod(cluster, group)["containers"][0].get("ports", ())}
    return {"ray-head": [*kuberay.head_service_ports(cluster), *internal],
            "trainer": [("", 6379), *internal, *sorted(workers)]}


@pytest.mark.builds("root", "base", "dev", "gpu", "tpu")
def test_ray_ports_are_reachable_only_from_batchlabs_pods(build, rendered):
    """Defect: the Ray Client port (remote code execution on the GPU nodes) was guarded only by
    the optional network-policies component."""
    objects = rendered(build)
    policies = of_kind(objects, "NetworkPolicy")
    pods = _pods(objects)
    for target, ports in _ray_ports(objects).items():
        for port in ports:
            for source in ("ray-head", "trainer"):
                assert ingress_allowed(policies, pods[source], pods[target], port), (
                    build, source, target, port)
            for stranger, namespace in ((STRANGER, "batchlab"), (STRANGER, "default"),
                                        (pods["controller"], "batchlab"),
                                        ({"app.kubernetes.io/name": "prometheus"}, "monitoring")):
                allowed = ingress_allowed(policies, stranger, pods[target], port,
                                          source_namespace=namespace)
                expected = (stranger is pods["controller"] and target == "ray-head"
                            and port[0] == "client")
                assert allowed == expected, (build, stranger, namespace, target, port)
    assert ingress_allowed(policies, pods["controller"], pods["ray-head"], ("client", 10001))


@pytest.mark.builds("gpu", "tpu")
def test_network_policies_allow_exactly_the_calls_batchlab_makes(build, rendered):
    objects = rendered(build)
    policies = of_kind(objects, "NetworkPolicy")
    pods = _pods(objects)
    calls = derived_calls()
    services = ("controller", "sharding", "checkpoints", "evaluator")
    for source in (*ROLE_CODE, "ray-head"):
        for target in services:
            if source == target:
                continue  # within a pod: loopback, which policies do not filter
            allowed = ingress_allowed(policies, pods[source], pods[target], ("grpc", 0))
            assert allowed == ((source, target, "grpc") in calls), (
                f"{build}: {source} -> {target} grpc is {'allowed' if allowed else 'denied'}; "
                f"the code {'makes' if (source, target, 'grpc') in calls else 'does not make'} "
                "that call")
    for target in services:
        assert not ingress_allowed(policies, STRANGER, pods[target], ("grpc", 0)), target
    # Prometheus (namespace monitoring) scrapes every batchlab metrics port: the services'
    # `metrics`, the trainer pods' sidecar `trainer-metrics` (their `metrics` is Ray's own port,
    # which test_ray_ports_are_reachable_only_from_batchlabs_pods keeps closed to it).
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    scraped = {**{role: ("metrics", METRICS_PORTS[role]) for role in services},
               "trainer": ("trainer-metrics", METRICS_PORTS["trainer"])}
    for role, port in scraped.items():
        assert ingress_allowed(policies, prometheus, pods[role], port,
                               source_namespace="monitoring"), role
        assert not ingress_allowed(policies, prometheus, pods[role], ("grpc", 0),
                                   source_namespace="monitoring"), role
