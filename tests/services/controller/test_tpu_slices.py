"""TPU runs take whole TPU slices: the pool against a fake Ray cluster that places actors as Ray
does (any node whose free resources hold the request, picked at random), with the resources
Ray gives TPU hosts (ray._private.accelerators.tpu: a resource named after the slice on every
host, `TPU-<pod type>-head` on its worker 0) and the environment GKE's Ray TPU webhook gives
their pods (TPU_NAME "<group>-<replica>", TPU_WORKER_ID)."""

from __future__ import annotations

import random
import types

import pytest

from services.controller.pool import (
    RayTrainerPool,
    TpuSliceType,
    process_ids,
    tpu_slice_types,
)
from services.trainer.actor import tpu_worker_id

V5P_HEAD = "TPU-v5p-256-head"  # a 4x4x8 v5p slice: 128 chips, 2 TensorCores each
V5E_HEAD = "TPU-v5litepod-4-head"  # a 2x2 v5e slice: 4 chips, 1 TensorCore each
B32K = {"tpus": 128, "num_hosts": 32}  # experiments/paper/bert_b32k_*.yaml


class Node:
    def __init__(self, resources: dict[str, float], env: dict[str, str] | None = None):
        self.total = dict(resources)
        self.free = dict(resources)
        self.env = dict(env or {})

    def fits(self, request: dict[str, float]) -> bool:
        return all(self.free.get(k, 0.0) >= v - 1e-9 for k, v in request.items())


def v5p_slice(replica: int) -> list[Node]:
    name = f"tpu-v5p-4x4x8-{replica}"
    nodes = []
    for worker in range(32):
        resources = {"CPU": 180.0, "TPU": 4.0, "accelerator_type:TPU-V5P": 1.0, name: 1.0}
        if worker == 0:
            resources[V5P_HEAD] = 1.0
        nodes.append(Node(resources, {"TPU_NAME": name, "TPU_WORKER_ID": str(worker)}))
    return nodes


def v5e_host(replica: int) -> Node:
    name = f"tpu-v5e-4-{replica}"
    return Node({"CPU": 20.0, "TPU": 4.0, "accelerator_type:TPU-V5LITEPOD": 1.0, name: 1.0,
                 V5E_HEAD: 1.0}, {"TPU_NAME": name, "TPU_WORKER_ID": "0"})


class Ref:
    def __init__(self, value):
        self.value = value


class FakeRay:
    """ray.nodes / ray.get / ray.kill and TrainerActor over a list of Nodes."""

    def __init__(self, nodes: list[Node], seed: int = 0):
        self.nodes = nodes
        self.rng = random.Random(seed)
        self.created: list[dict[str, float]] = []  # each actor's request, in creation order
        self.actors: list[FakeActor] = []

    # ray's API
    def ray_nodes(self):
        return [{"Alive": True, "Resources": dict(n.total)} for n in self.nodes]

    def get(self, refs, timeout=None):
        if isinstance(refs, list):
            return [r.value for r in refs]
        return refs.value

    def kill(self, actor):
        if actor.node is not None:
            for key, value in actor.request.items():
                actor.node.free[key] += value
            actor.node = None

    # TrainerActor.options(**options).remote(settings)
    def options(self, **options):
        request = {"CPU": float(options.get("num_cpus", 1.0))}
        if options.get("num_gpus"):
            request["GPU"] = float(options["num_gpus"])
        request.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
        return types.SimpleNamespace(remote=lambda settings: self._place(request, settings))

    def _place(self, request, settings):
        self.created.append(request)
        fitting = [n for n in self.nodes if n.fits(request)]
        node = self.rng.choice(fitting) if fitting else None  # None: pending, as Ray would
        if node is not None:
            for key, value in request.items():
                node.free[key] -= value
        actor = FakeActor(settings["name"], request, node)
        self.actors.append(actor)
        return actor


class Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return Ref(self.fn(*args))


class FakeActor:
    def __init__(self, name, request, node):
        self.name, self.request, self.node = name, request, node
        self.runs: list[tuple] = []
        self.tpu_host = Method(self._tpu_host)
        self.coordinator_address = Method(lambda: f"{self.name}:8476")
        self.run_distributed = Method(self._run_distributed)
        self.run = Method(lambda data: self.runs.append((data,)))

    def _tpu_host(self, slice_name=False):
        # What TrainerWorker.tpu_host answers on this node (TPU_NAME is what Ray's
        # get_current_pod_name reads on GKE).
        assert self.node is not None, f"{self.name} is still pending"
        return {"worker_id": tpu_worker_id(self.node.env),
                "slice": self.node.env.get("TPU_NAME") if slice_name else None}

    def _run_distributed(self, data, process_id, num_processes, coordinator):
        self.runs.append((process_id, num_processes, coordinator))


@pytest.fixture
def cluster(monkeypatch):
    import ray

    import services.trainer.actor as actor_module

    def make(nodes, seed=0):
        fake = FakeRay(nodes, seed)
        monkeypatch.setattr(ray, "nodes", fake.ray_nodes)
        monkeypatch.setattr(ray, "get", fake.get)
        monkeypatch.setattr(ray, "kill", fake.kill)
        monkeypatch.setattr(actor_module, "TrainerActor", fake)
        return fake

    return make


def assignment(trial="experiments/e/studies/s/trials/0-r0"):
    return types.SimpleNamespace(SerializeToString=lambda: b"run", trial=trial, attempt=1)


def slices_of(actors) -> set[str]:
    return {a.node.env["TPU_NAME"] for a in actors}


def test_the_cluster_slice_types_are_read_from_the_heads_the_nodes_advertise():
    nodes = [n.total for n in [*v5p_slice(0), *v5p_slice(1), v5e_host(0), v5e_host(1)]]
    nodes.append({"CPU": 8.0})
    assert tpu_slice_types(nodes) == [TpuSliceType("v5litepod-4", 4, 4, 2),
                                      TpuSliceType("v5p-256", 128, 4, 2)]
    # A 4x4x8 v5p slice is 32 hosts of 4 chips; 8x8x8 is 128 hosts (v5p-1024, 512 chips).
    assert [t.hosts for t in tpu_slice_types(nodes)] == [1, 32]
    assert tpu_slice_types([{"CPU": 180.0, "TPU": 4.0, "TPU-v5p-1024-head": 1.0}])[0].hosts == 128
    assert tpu_slice_types([{"CPU": 8.0}, {"TPU": 4.0}]) == []


@pytest.mark.parametrize("seed", range(3))
def test_a_multi_host_run_reserves_a_slice_head_then_pins_every_host_to_that_slice(
        cluster, seed):
    nodes = [*v5p_slice(0), *v5p_slice(1), v5e_host(0), Node({"CPU": 8.0})]
    random.Random(seed).shuffle(nodes)
    fake = cluster(nodes, seed)
    pool = RayTrainerPool(136, connected=True, nodes_ttl_s=0.0)
    assert pool.placement(B32K, 32) is None

    runs = []
    for n in range(2):
        lease = pool.acquire(B32K, 32)
        assert lease is not None and len(lease.workers) == 32
        # Only the slice's head is asked for at first: the other hosts wait for its name.
        assert fake.created[-1] == {"CPU": 1.0, "TPU": 4.0, V5P_HEAD: 1.0}
        created = len(fake.created)
        dispatch = pool.start(lease, n, "e", assignment(f"trial-{n}"))
        head = fake.actors[created - 1]
        (slice_name,) = slices_of([head])
        # Then each other host with the head's slice name, nothing else that could spread them.
        assert fake.created[created:] == [{"CPU": 1.0, "TPU": 4.0, slice_name: 1.0}] * 31
        actors = [m.actor for m in dispatch.lease.actors]
        assert slices_of(actors) == {slice_name}  # never two slices
        assert len({id(a.node) for a in actors}) == 32
        # JAX process ids are the hosts' TPU_WORKER_IDs; the coordinator is worker 0's trainer.
        for actor in actors:
            ((process_id, num, coordinator),) = actor.runs
            assert process_id == int(actor.node.env["TPU_WORKER_ID"]) and num == 32
            assert coordinator == f"{head.name}:8476"
        assert actors[0] is head and dispatch.lease.workers[0] == head.name
        runs.append(slice_name)
    assert sorted(runs) == ["tpu-v5p-4x4x8-0", "tpu-v5p-4x4x8-1"]  # each run its own slice
    # Both slices are taken by this pool's runs: a third waits rather than queue in Ray.
    before = len(fake.created)
    assert pool.acquire(B32K, 32) is None and len(fake.created) == before


def test_a_failed_start_frees_the_slice_for_the_next_run(cluster):
    fake = cluster([*v5p_slice(0)])
    for node in fake.nodes:
        node.env.pop("TPU_NAME")  # a head that names no slice
    pool = RayTrainerPool(40, connected=True, nodes_ttl_s=0.0)
    lease = pool.acquire(B32K, 32)
    with pytest.raises(RuntimeError, match="names no TPU slice"):
        pool.start(lease, 1, "e", assignment())
    pool.release(lease)  # what the scheduler does when start raises
    assert fake.actors[0].node is None  # killed
    assert pool.counts() == {"idle": 0, "busy": 0}
    assert pool.acquire(B32K, 32) is not None


@pytest.mark.parametrize("seed", range(3))
def test_a_single_host_tpu_run_never_takes_a_host_of_a_multi_host_slice(cluster, seed):
    nodes = [*v5p_slice(0), v5e_host(0), v5e_host(1)]
    random.Random(seed).shuffle(nodes)
    fake = cluster(nodes, seed)
    pool = RayTrainerPool(8, connected=True, nodes_ttl_s=0.0)
    assert pool.placement({"tpus": 4}, 1) is None
    leases = [pool.acquire({"tpus": 4}, 1) for _ in range(3)]
    assert all(lease is not None for lease in leases)
    assert fake.created == [{"CPU": 1.0, "TPU": 4.0, V5E_HEAD: 1.0}] * 3
    placed = [a.node for a in fake.actors if a.node is not None]
    assert len(placed) == 2  # the third waits for a v5e host instead of taking a v5p one
    assert all(V5E_HEAD in n.total for n in placed)
    # Two 1-chip runs share one v5e host (a share of its head each).
    fake2 = cluster([*v5p_slice(0), v5e_host(0)], seed)
    pool2 = RayTrainerPool(8, connected=True, nodes_ttl_s=0.0)
    for _ in range(2):
        pool2.acquire({"tpus": 1}, 1)
    assert fake2.created == [{"CPU": 1.0, "TPU": 1.0, V5E_HEAD: 0.25}] * 2
    assert all(V5E_HEAD in a.node.total for a in fake2.actors)


def test_placement_wants_a_slice_of_the_runs_shape(cluster):
    # 32 single-host v5e slices have 128 chips on 32 hosts, but are not one slice.
    cluster([v5e_host(i) for i in range(32)])
    pool = RayTrainerPool(136, connected=True, nodes_ttl_s=0.0)
    refused = pool.placement(B32K, 32)
    assert refused.permanent and "one TPU slice of 32 hosts with 4 chips each" in refused.reason
    assert "v5litepod-4 (4 chips on 1 host, 32 up)" in refused.reason
    assert pool.acquire(B32K, 32) is None
    # Only a v5p slice up: a single-host run waits for a single-host slice.
    cluster([*v5p_slice(0)])
    pool = RayTrainerPool(136, connected=True, nodes_ttl_s=0.0)
    refused = pool.placement({"tpus": 4}, 1)
    assert refused.permanent and "single-host TPU slice" in refused.reason
    assert "v5p-256 (128 chips on 32 hosts, 1 up)" in refused.reason
    # TPU hosts that advertise no slice (no webhook): a multi-host run cannot be kept on one.
    cluster([Node({"CPU": 8.0, "TPU": 4.0}) for _ in range(32)])
    pool = RayTrainerPool(136, connected=True, nodes_ttl_s=0.0)
    assert "webhook" in pool.placement(B32K, 32).reason
    assert pool.placement({"tpus": 4}, 1) is None  # nothing to pin a single host to


def test_a_multi_host_run_off_tpu_keeps_the_lease_order(cluster):
    fake = cluster([Node({"CPU": 8.0}), Node({"CPU": 8.0})])
    pool = RayTrainerPool(4, connected=True, nodes_ttl_s=0.0)
    lease = pool.acquire({"cpus": 1, "num_hosts": 2}, 2)
    assert fake.created == [{"CPU": 1.0}] * 2  # both at once: no slice to wait for
    dispatch = pool.start(lease, 1, "e", assignment())
    assert [a.runs for a in fake.actors] == [[(0, 2, f"{fake.actors[0].name}:8476")],
                                            [(1, 2, f"{fake.actors[0].name}:8476")]]
    assert [m.actor for m in dispatch.lease.actors] == fake.actors


def test_process_ids_follow_the_slices_worker_ids():
    hosts = [{"worker_id": i, "slice": "s"} for i in (2, 0, 3, 1)]
    assert process_ids(hosts, "s") == [2, 0, 3, 1]
    assert process_ids([{"worker_id": None}] * 3) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="slices"):
        process_ids([{"worker_id": 0, "slice": "s"}, {"worker_id": 1, "slice": "t"}], "s")
    with pytest.raises(RuntimeError, match="not 0..1"):
        process_ids([{"worker_id": 0}, {"worker_id": None}])
    with pytest.raises(RuntimeError, match="not 0..1"):
        process_ids([{"worker_id": 1}, {"worker_id": 1}])
    with pytest.raises(RuntimeError, match="not 0..1"):
        process_ids([{"worker_id": 1}, {"worker_id": 2}])  # part of a larger slice
