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
    parse_tpu_slice_types,
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
        self.shut_down_on: list = []  # the node it ran on when asked to shut down
        self.shutdown = Method(lambda: self.shut_down_on.append(self.node))

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
        monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (refs, []))
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


# -- TPU groups that scale from zero ------------------------------------------------------------
# The slice types of the tpu overlay (k8s/components/tpu/controller-trainers.yaml).
SLICE_TYPES = "v5litepod-4:1x4,v5p-256:32x4,v5p-1024:128x4"
# The node types Ray's KubeRay autoscaler makes of those groups (autoscaling_config.py,
# _get_ray_resources_from_group_spec): EVERY node of a TPU group carries its slice's head
# resource there, though only worker 0 of a live slice advertises it.
NODE_TYPES = {
    "tpu-v5e-4": {"CPU": 20.0, "TPU": 4.0, V5E_HEAD: 1.0},
    "tpu-v5p-4x4x8": {"CPU": 180.0, "TPU": 4.0, V5P_HEAD: 1.0},
    "tpu-v5p-8x8x8": {"CPU": 180.0, "TPU": 4.0, "TPU-v5p-1024-head": 1.0},
    "cpu": {"CPU": 8.0},
}
HOSTS_PER_REPLICA = {"tpu-v5e-4": 1, "tpu-v5p-4x4x8": 32, "tpu-v5p-8x8x8": 128, "cpu": 1}


def groups_that_hold(bundle: dict[str, float]) -> list[str]:
    return [name for name, node in NODE_TYPES.items()
            if all(node.get(k, 0.0) >= v for k, v in bundle.items())]


def slices_started(bundles: list[dict[str, float]], v2: bool) -> dict[str, int]:
    """The replicas (slices) KubeRay is asked for when each bundle takes one node of the one
    group that can hold it: v1's provider makes a replica of each node launched
    (batching_node_provider.create_node), v2's divides them by numOfHosts (kuberay
    cloud_provider._submit_scale_request)."""
    nodes: dict[str, int] = {}
    for bundle in bundles:
        (group,) = groups_that_hold(bundle)
        nodes[group] = nodes.get(group, 0) + 1
    return {g: n // HOSTS_PER_REPLICA[g] if v2 else n for g, n in nodes.items()}


@pytest.fixture
def autoscaler(monkeypatch):
    """request_resources recorded; the cluster's autoscaler version as its GCS flag says."""
    import ray.autoscaler.sdk
    import ray.experimental.internal_kv

    requests: list[list[dict[str, float]]] = []
    version = {"v2": False}
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources",
                        lambda bundles=None: requests.append(list(bundles or [])))
    monkeypatch.setattr(ray.experimental.internal_kv, "_internal_kv_get",
                        lambda key, namespace=None: b"1" if version["v2"] else None)

    def use(v2: bool):
        version["v2"] = v2
        return requests

    return use


@pytest.mark.parametrize("v2", [False, True], ids=["autoscaler-v1", "autoscaler-v2"])
def test_a_multi_host_run_waits_for_its_slice_and_the_autoscaler_is_asked_for_that_group(
        cluster, autoscaler, v2):
    requests = autoscaler(v2)
    fake = cluster([Node({"CPU": 8.0})])  # every TPU group at zero
    pool = RayTrainerPool(136, connected=True, nodes_ttl_s=0.0,
                          tpu_slice_types=parse_tpu_slice_types(SLICE_TYPES))
    refused = pool.placement(B32K, 32)
    assert refused.reason.startswith("waiting for a v5p-256 slice to scale up (128 chips on "
                                     "32 hosts")
    assert refused.permanent  # it fails as unschedulable if the slice never comes
    assert pool.acquire(B32K, 32) is None and fake.created == []

    pool.request_capacity([(B32K, 32)])  # what the scheduler does with the refused run
    (bundles,) = requests
    assert bundles[0] == {"CPU": 1.0, "TPU": 4.0, V5P_HEAD: 1.0}
    assert len(bundles) == (32 if v2 else 1)
    assert slices_started(bundles, v2) == {"tpu-v5p-4x4x8": 1}  # one whole slice, nothing else
    # The plain host bundle the pool used to ask for: any TPU group could take it.
    assert groups_that_hold({"CPU": 1.0, "TPU": 4.0}) == ["tpu-v5e-4", "tpu-v5p-4x4x8",
                                                           "tpu-v5p-8x8x8"]
    pool.request_capacity([(B32K, 32)])
    assert len(requests) == 1  # the same request is not sent again

    # Part of the slice is up (worker 0 among them): still waiting, nothing placed.
    slice_nodes = v5p_slice(0)
    fake.nodes.extend(slice_nodes[:10])
    assert pool.placement(B32K, 32).reason.startswith("waiting for a v5p-256 slice")
    fake.nodes.extend(slice_nodes[10:])
    assert pool.placement(B32K, 32) is None
    pool.request_capacity([])  # placed: the request is withdrawn
    assert requests[-1] == []
    lease = pool.acquire(B32K, 32)
    dispatch = pool.start(lease, 1, "e", assignment())
    actors = [m.actor for m in dispatch.lease.actors]
    assert slices_of(actors) == {"tpu-v5p-4x4x8-0"} and len({id(a.node) for a in actors}) == 32


@pytest.mark.parametrize("v2", [False, True], ids=["autoscaler-v1", "autoscaler-v2"])
def test_a_single_host_run_asks_for_a_single_host_slice_not_a_v5p_host(cluster, autoscaler, v2):
    requests = autoscaler(v2)
    cluster([*v5p_slice(0)])  # a v5p slice is up, the v5e group is at zero
    pool = RayTrainerPool(8, connected=True, nodes_ttl_s=0.0,
                          tpu_slice_types=parse_tpu_slice_types(SLICE_TYPES))
    refused = pool.placement({"tpus": 4}, 1)
    assert refused.permanent and refused.reason.startswith(
        "waiting for a v5litepod-4 slice to scale up (4 chips on 1 host;")
    pool.request_capacity([({"tpus": 4}, 1), ({"tpus": 1}, 1)])
    assert requests == [[{"CPU": 1.0, "TPU": 4.0, V5E_HEAD: 1.0},
                         {"CPU": 1.0, "TPU": 1.0, V5E_HEAD: 0.25}]]
    assert slices_started(requests[0], v2) == {"tpu-v5e-4": 2}


def test_a_run_no_configured_slice_type_fits_is_refused_naming_the_types(cluster, autoscaler):
    requests = autoscaler(True)
    cluster([Node({"CPU": 8.0})])
    pool = RayTrainerPool(136, connected=True, nodes_ttl_s=0.0,
                          tpu_slice_types=parse_tpu_slice_types(SLICE_TYPES))
    refused = pool.placement({"tpus": 64, "num_hosts": 16}, 16)  # a v5p-128: no group has it
    assert refused.permanent and "cannot hold that" in refused.reason
    assert ("nor can one be added (BATCHLAB_TPU_SLICE_TYPES: v5litepod-4 (1x4), v5p-1024 "
            "(128x4), v5p-256 (32x4))") in refused.reason
    # GPU and CPU runs ask as before.
    pool.request_capacity([({"gpus": 8, "cpus": 4}, 1), ({"cpus": 2, "num_hosts": 2}, 2)])
    assert requests == [[{"CPU": 4.0, "GPU": 8.0}, {"CPU": 2.0}, {"CPU": 2.0}]]
    unset = RayTrainerPool(136, connected=True, nodes_ttl_s=0.0)
    assert "BATCHLAB_TPU_SLICE_TYPES is not set" in unset.placement(B32K, 32).reason


def test_slice_types_setting_is_parsed_and_checked_against_rays_chip_counts():
    assert parse_tpu_slice_types(" v5p-256:32x4 , v5litepod-4:1x4,") == [
        TpuSliceType("v5litepod-4", 4, 4, 0), TpuSliceType("v5p-256", 128, 4, 0)]
    assert [t.hosts for t in parse_tpu_slice_types(SLICE_TYPES)] == [1, 128, 32]
    assert parse_tpu_slice_types("") == []
    for text, why in [("v5p-256", "is not <pod type>:<hosts>x<chips per host>"),
                      ("v5p-256:32*4", "is not <pod type>"),
                      ("v9z-8:1x4", "unknown TPU pod type 'v9z-8'"),
                      ("v5p-256:16x4", "a v5p-256 slice has 128 chips, not 16 hosts x 4"),
                      ("v5p-256:32x4,v5p-256:32x4", "v5p-256 is listed twice")]:
        with pytest.raises(ValueError, match="^BATCHLAB_TPU_SLICE_TYPES: ") as error:
            parse_tpu_slice_types(text)
        assert why in str(error.value), text


def test_the_controller_reads_the_slice_types_from_its_environment():
    from services.controller.server import ControllerConfig

    env = {"BATCHLAB_EVALUATION": "in-process", "BATCHLAB_TPU_SLICE_TYPES": SLICE_TYPES}
    config = ControllerConfig.from_env(env)
    assert [t.pod_type for t in config.tpu_slice_types] == ["v5litepod-4", "v5p-1024", "v5p-256"]
    assert ControllerConfig.from_env({"BATCHLAB_EVALUATION": "in-process"}).tpu_slice_types == ()
    with pytest.raises(ValueError, match="BATCHLAB_TPU_SLICE_TYPES: 'v5p-256:32x8'"):
        ControllerConfig.from_env({**env, "BATCHLAB_TPU_SLICE_TYPES": "v5p-256:32x8"})


def test_closing_the_pool_shuts_every_trainer_down_before_killing_it(cluster):
    """TrainerWorker.shutdown closes the trainer's metrics endpoint and removes its scratch
    folder; a killed actor never runs it."""
    fake = cluster([v5e_host(0), v5e_host(1)])
    pool = RayTrainerPool(2, connected=True, nodes_ttl_s=0.0)
    for n in range(2):
        lease = pool.acquire({"tpus": 4}, 1)
        pool.start(lease, n, "e", assignment(f"trial-{n}"))
    pool.close()
    assert len(fake.actors) == 2
    for actor in fake.actors:
        assert len(actor.shut_down_on) == 1 and actor.shut_down_on[0] is not None  # alive then
        assert actor.node is None  # and killed after
    # The Ray link's thread may (re)connect and warm trainers after a stop closed the pool:
    # nothing starts any more (such trainers were never shut down, and left their folders).
    pool.connected()
    assert pool.warm() == 0 and pool.acquire({"tpus": 4}, 1) is None
    assert len(fake.actors) == 2
