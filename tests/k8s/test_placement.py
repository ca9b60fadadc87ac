"""Every shipped spec can be placed on the Ray worker groups of the overlay it targets.

The demand is what the controller asks Ray for (services.controller.pool.resource_shape and
services.trainer.actor.actor_options: one actor per host of a run); the supply is what KubeRay
makes a worker pod advertise (num-cpus from the CPU limit, num-gpus from nvidia.com/gpu, TPU from
google.com/tpu, memory from the memory limit: tests/k8s/kuberay.py). A run is placeable when some
group's pods each hold one actor and the group (and the controller's trainer pool) can hold all
of the run's hosts. Ray never places an actor larger than every pod: it stays pending forever.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.k8s import kuberay
from tests.k8s.objects import REPO_ROOT, controller_env, raycluster

SPECS = sorted(p for p in (REPO_ROOT / "experiments").rglob("*.yaml"))
# Multi-host TPU specs (the paper's BERT runs) cannot be placed on any overlay as written, for
# two reasons outside the manifests: actor_options asks each of a run's hosts for the run's
# whole TPU count (no per-host share), and their shapes (8 TPUs per host: TPU v3 cores) exist on
# no GKE TPU slice (v4, v5e, v5p and v6e multi-host slices have 4 chips per host). Strict, so
# that the marker must go once a fix makes them placeable.
MULTI_HOST_TPU_DEFECT = (
    "multi-host TPU run: actor_options asks every host for the run's whole TPU count, and "
    "8 TPUs per host (TPU v3 cores) is no GKE TPU slice shape")


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
        if not short and hosts <= capacity and hosts <= pool:
            fits.append(group.name)
    return fits


def _spec_resources(path: Path) -> dict:
    from batchlab.search.spec import read_yaml

    return dict(read_yaml(path).get("resources") or {})


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(REPO_ROOT / "experiments")))
def test_every_shipped_spec_is_placeable_on_the_overlay_it_targets(path, rendered, request):
    resources = _spec_resources(path)
    if resources.get("tpus") and int(resources.get("num_hosts") or 1) > 1:
        request.applymarker(pytest.mark.xfail(reason=MULTI_HOST_TPU_DEFECT, strict=True))
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


@pytest.mark.builds("dev", "gpu", "tpu")
def test_warm_trainers_fit_the_pods_kept_at_min_replicas(build, rendered):
    """The controller starts BATCHLAB_NUM_TRAINERS default-shape actors at launch; they must fit
    the worker pods that exist without scaling (minReplicas), or the first install waits for
    nodes that are only wanted for idle actors."""
    objects = rendered(build)
    cluster = raycluster(objects)
    warm = int(controller_env(objects)["BATCHLAB_NUM_TRAINERS"])
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
