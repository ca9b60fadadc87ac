"""Every shipped spec can be placed on the Ray worker groups of the overlay it targets.

The demand is what the controller asks Ray for (services.controller.pool.resource_shape and
services.trainer.actor.actor_options: one actor per host of a run); the supply is what KubeRay
makes a worker pod advertise (num-cpus from the CPU limit, num-gpus from nvidia.com/gpu, TPU from
google.com/tpu, memory from the memory limit: tests/k8s/kuberay.py). A run is placeable when some
group's pods each hold one actor and the group (and the controller's trainer pool) can hold all
of the run's hosts. Ray never places an actor larger than every pod: it stays pending forever.

A run's gpus and tpus count the whole run and each host's actor asks for its share (tpus /
num_hosts: protos/batchlab/v1/experiment.proto, Resources). A TPU run needs one whole slice: a
group whose replica (numOfHosts pods, one slice) has exactly the run's hosts; its chips talk over
the slice's interconnect, which neither a part of a slice nor single-host slices give.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.k8s import kuberay
from tests.k8s.objects import REPO_ROOT, controller_env, raycluster

SPECS = sorted(p for p in (REPO_ROOT / "experiments").rglob("*.yaml"))


def target_builds(resources: dict) -> tuple[str, ...]:
    """The overlays a spec's runs are for: GPU runs the gpu overlay, TPU runs the tpu overlay,
    CPU runs any (dev is for them; gpu and tpu have a CPU group too)."""
    if resources.get("gpus"):
        return ("gpu",)
    if resources.get("tpus"):
        return ("tpu",)
    return ("dev", "gpu", "tpu")


def actor_demand(resources: dict) -> dict[str, float]:
    """What one actor of a run asks Ray for, as the controller's pool computes it."""
    from services.controller.pool import resource_shape
    from services.trainer.actor import actor_options

    options = actor_options(dict(resource_shape(resources)))
    demand = {"CPU": float(options.get("num_cpus", 1.0)),
              "GPU": float(options.get("num_gpus", 0)),
              "memory": float(options.get("memory", 0))}
    for name, value in (options.get("resources") or {}).items():
        demand[name] = float(value)
    return demand


def placements(objects: list[dict], resources: dict) -> list[str]:
    """The worker groups of a build that can run one run with `resources`, with the reason
    each other group cannot."""
    cluster = raycluster(objects)
    hosts = int(resources.get("num_hosts") or 1)
    demand = actor_demand(resources)
    pool = int(controller_env(objects)["BATCHLAB_NUM_TRAINERS"])
    fits = []
    for group in kuberay.groups(cluster):
        if group.node_type != "worker":
            continue
        supply = kuberay.ray_resources(cluster, group)
        short = {k: (v, supply.get(k, 0.0)) for k, v in demand.items() if v > supply.get(k, 0.0)}
        capacity = group.replicas_max * group.hosts
        if demand.get("TPU") and group.hosts != hosts:
            continue  # a TPU run takes one whole slice, of its own host count
        if not short and hosts <= capacity and hosts <= pool:
            fits.append(group.name)
    return fits


def _spec_resources(path: Path) -> dict:
    from batchlab.search.spec import read_yaml

    return dict(read_yaml(path).get("resources") or {})


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(REPO_ROOT / "experiments")))
def test_every_shipped_spec_is_placeable_on_the_overlay_it_targets(path, rendered):
    resources = _spec_resources(path)
    for build in target_builds(resources):
        fits = placements(rendered(build), resources)
        assert fits, (f"{path.name} ({resources}): no worker group of the {build} overlay can "
                      f"hold one of its actors ({actor_demand(resources)} each, "
                      f"{resources.get('num_hosts') or 1} hosts)")


def test_the_paper_gpu_runs_need_the_8gpu_group(rendered):
    """Defect: the GPU group had 1 GPU per pod while the paper's specs ask for 8 on one host."""
    resources = _spec_resources(REPO_ROOT / "experiments" / "paper" / "lars_pipeline_32k.yaml")
    assert resources["gpus"] == 8
    assert placements(rendered("gpu"), resources) == ["gpu-8"]
    assert placements(rendered("gpu"), {"gpus": 1}) == ["gpu-1", "gpu-8"]


def test_the_paper_bert_runs_need_a_whole_v5p_slice_of_their_size(rendered):
    """Defect: each host asked for the run's whole TPU count (256 or 1,024 TPUs per host), in
    the TPU v3 shape of 8 per host that no GKE slice has. Each host now asks for its 4 chips and
    only the v5p group of the run's slice size (one replica = one slice) can hold a run."""
    objects = rendered("tpu")
    b32k = _spec_resources(REPO_ROOT / "experiments" / "paper" / "bert_b32k_phase1.yaml")
    b65k = _spec_resources(REPO_ROOT / "experiments" / "paper" / "bert_b65k_phase1.yaml")
    assert (b32k["tpus"], b32k["num_hosts"]) == (128, 32)  # v5p-256: 4x4x8
    assert (b65k["tpus"], b65k["num_hosts"]) == (512, 128)  # v5p-1024: 8x8x8
    assert actor_demand(b32k)["TPU"] == actor_demand(b65k)["TPU"] == 4.0
    assert placements(objects, b32k) == ["tpu-v5p-4x4x8"]
    assert placements(objects, b65k) == ["tpu-v5p-8x8x8"]
    # 32 single-host v5e slices are not one 128-chip slice, nor is a part of the 8x8x8 one;
    # a single-host run needs a single-host slice.
    assert placements(objects, {"tpus": 4}) == ["tpu-v5e-4"]
    cluster = raycluster(objects)
    slices = {g.name: (g.hosts, g.spec["template"]["spec"]["nodeSelector"])
              for g in kuberay.groups(cluster) if g.name.startswith("tpu-v5p")}
    assert slices == {
        "tpu-v5p-4x4x8": (32, {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                               "cloud.google.com/gke-tpu-topology": "4x4x8"}),
        "tpu-v5p-8x8x8": (128, {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                "cloud.google.com/gke-tpu-topology": "8x8x8"})}


@pytest.mark.builds("dev", "gpu", "tpu")
def test_warm_trainers_fit_the_pods_kept_at_min_replicas(build, rendered):
    """The controller starts BATCHLAB_WARM_TRAINERS (default BATCHLAB_NUM_TRAINERS)
    default-shape actors at launch; they must fit
    the worker pods that exist without scaling (minReplicas), or the first install waits for
    nodes that are only wanted for idle actors."""
    objects = rendered(build)
    cluster = raycluster(objects)
    env = controller_env(objects)
    warm = int(env.get("BATCHLAB_WARM_TRAINERS") or env["BATCHLAB_NUM_TRAINERS"])
    assert warm <= int(env["BATCHLAB_NUM_TRAINERS"])
    demand = actor_demand({})
    cpus = sum(kuberay.ray_resources(cluster, g)["CPU"] * g.replicas_min * g.hosts
               for g in kuberay.groups(cluster) if g.node_type == "worker")
    assert warm * demand["CPU"] <= cpus, (
        f"{build}: {warm} warm trainers of {demand['CPU']} CPU each, {cpus} CPUs at minReplicas")
    assert warm >= 1


def test_gpu_groups_scale_to_zero_and_the_autoscaler_is_on(rendered):
    cluster = raycluster(rendered("gpu"))
    assert kuberay.autoscaling(cluster)
    for group in kuberay.groups(cluster):
        if kuberay.ray_resources(cluster, group).get("GPU"):
            assert group.replicas_min == 0, group.name
