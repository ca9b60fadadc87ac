"""The controller's BATCHLAB_TPU_SLICE_TYPES (tpu overlay) names exactly the slices its TPU worker
groups add, and what the pool asks the autoscaler for starts one whole slice of the right group.

The groups are read as Ray's KubeRay autoscaler reads them (ray.autoscaler._private.kuberay.
autoscaling_config._node_type_from_group_spec: the node type's resources, with
`TPU-<pod type>-head` from the GKE TPU node selectors, and numOfHosts nodes per replica).
"""

from __future__ import annotations

import re

import pytest

from tests.k8s.objects import REPO_ROOT, controller_env, raycluster


def node_types(objects: list[dict]) -> dict[str, tuple[dict[str, float], int]]:
    """Each worker group's autoscaler node type: (resources, nodes per replica)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _node_type_from_group_spec

    return {spec["groupName"]: ({k: float(v) for k, v in
                                 _node_type_from_group_spec(spec, is_head=False)["resources"]
                                 .items()}, int(spec.get("numOfHosts", 1)))
            for spec in raycluster(objects)["spec"]["workerGroupSpecs"]}


def test_the_slice_types_setting_matches_the_tpu_groups(rendered):
    from services.controller.pool import parse_tpu_slice_types

    objects = rendered("tpu")
    configured = {(t.pod_type, t.hosts, t.chips_per_host) for t in
                  parse_tpu_slice_types(controller_env(objects)["BATCHLAB_TPU_SLICE_TYPES"])}
    groups = set()
    for resources, hosts in node_types(objects).values():
        for key in resources:
            match = re.fullmatch(r"TPU-(.+)-head", key)
            if match:
                groups.add((match[1], hosts, int(resources["TPU"])))
    assert groups == {("v5litepod-4", 1, 4), ("v5p-256", 32, 4), ("v5p-1024", 128, 4)}
    assert configured == groups


@pytest.mark.parametrize("v2", [False, True], ids=["autoscaler-v1", "autoscaler-v2"])
@pytest.mark.parametrize("spec, group", [("bert_b32k_phase1.yaml", "tpu-v5p-4x4x8"),
                                         ("bert_b65k_phase1.yaml", "tpu-v5p-8x8x8")])
def test_the_autoscaler_request_of_a_paper_bert_run_starts_one_slice_of_its_group(
        rendered, monkeypatch, spec, group, v2):
    import ray.autoscaler.sdk
    import ray.experimental.internal_kv

    from batchlab.search.spec import read_yaml
    from services.controller.pool import RayTrainerPool, parse_tpu_slice_types

    objects = rendered("tpu")
    types = node_types(objects)
    requests = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources",
                        lambda bundles=None: requests.append(bundles))
    monkeypatch.setattr(ray.experimental.internal_kv, "_internal_kv_get",
                        lambda key, namespace=None: b"1" if v2 else b"0")
    env = controller_env(objects)
    pool = RayTrainerPool(int(env["BATCHLAB_NUM_TRAINERS"]), connected=True,
                          tpu_slice_types=parse_tpu_slice_types(env["BATCHLAB_TPU_SLICE_TYPES"]))
    resources = dict(read_yaml(REPO_ROOT / "experiments" / "paper" / spec)["resources"])
    pool.request_capacity([(resources, int(resources["num_hosts"]))])
    (bundles,) = requests
    nodes: dict[str, int] = {}
    for bundle in bundles:
        holders = [name for name, (supply, _) in types.items()
                   if all(supply.get(k, 0.0) >= v for k, v in bundle.items())]
        assert holders == [group], bundle
        nodes[group] = nodes.get(group, 0) + 1
    # v1's KubeRay provider makes a replica of each node it launches; v2's divides the nodes
    # by numOfHosts.
    replicas = nodes[group] // types[group][1] if v2 else nodes[group]
    assert replicas == 1
