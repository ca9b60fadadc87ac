"""The pool of trainer actors the scheduler hands attempts to.

`TrainerPool` is what the scheduler needs: say whether a run can be placed at all
(`placement`), reserve trainers for an attempt (`acquire`), start it (`start`), collect what
finished (`poll`), ask one to stop (`stop`). `RayTrainerPool` keeps up to `size` Ray actors
(services.trainer.actor.TrainerActor): actors are made with the resources of the runs they
serve and reused by later runs with the same resources; an idle actor of other resources is
retired when its slot is needed. A multi-host attempt takes `num_hosts` fresh actors (a JAX
process joins one distributed system in its life) that are retired when it ends.

TPU runs take whole TPU slices (`TpuSliceType`). Ray gives every TPU host a custom resource
named after its slice (the pod slice's name: TPU_NAME, which GKE's Ray TPU webhook sets to
"<group>-<replica>") and worker 0 of each slice `TPU-<pod type>-head` (e.g. "TPU-v5p-256-head";
ray._private.accelerators.tpu, get_current_node_additional_resources). A multi-host run first
places its process-0 actor with the head of a slice of exactly its chips and hosts, reads that
slice's name there, then places every other host with {<slice name>: 1}: all its hosts are on
one slice, whichever slices are up. A single-host TPU run asks for a share of the head of a
single-host slice type, so it never takes a host of a multi-host slice (their heads are of
another pod type, and their other hosts have no head at all). JAX process ids are the hosts'
TPU_WORKER_ID (the slice's own numbering, which libtpu expects); without it (CPU, GPU) they
follow the lease's order.

TPU groups scale from zero, so the pool also knows the slice types the cluster can add
(`parse_tpu_slice_types`, BATCHLAB_TPU_SLICE_TYPES): Ray 2.60 does not publish a KubeRay
cluster's node types to its drivers (nothing reports the GCS ClusterConfig that
ray._private.state.get_cluster_config reads, and the autoscaler's ClusterStatus lists nodes, not
node types). A TPU run with no live slice of its shape, whose shape is such a type, waits for it
("waiting for a v5p-256 slice to scale up"), and the autoscaler is asked for bundles that only
that type's worker group holds: the slice head resource `TPU-<pod type>-head: 1`, which the
KubeRay autoscaler gives every node of a TPU group (ray.autoscaler._private.kuberay.
autoscaling_config, _get_ray_resources_from_group_spec). How many: autoscaler v1's KubeRay
provider turns each node it launches into a replica of the group (a whole slice), so one bundle
per slice; v2's divides the nodes it launches by numOfHosts (kuberay cloud_provider,
_submit_scale_request), so one bundle per host.

Placement is honoured: a run is placed only where the Ray cluster's nodes can hold it. A run
that no node (or not enough nodes) can hold is not started anywhere: `placement` says why,
the scheduler shows that reason while the run waits, and asks the Ray autoscaler (when the
cluster has one) for the missing nodes.

Failures are told apart: an attempt whose actor died (`ray.exceptions.RayActorError`: killed,
its node lost, out of memory) comes back `lost` (Failure INFRASTRUCTURE); an exception the
trainer raised comes back with its text, as the infrastructure's when it says so (a
sharding service failure) and as the run's own otherwise; attempts running when the
controller lost its Ray cluster (`connection_lost`) come back as the controller's (Failure
CONTROLLER, not counted toward max_attempts).

The pool is used by the scheduler thread; `services.controller.ray_link.RayLink` connects
and reconnects Ray from its own thread, so every method holds the pool's lock.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import itertools
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from batchlab.search.spec import resources_per_host
from services.controller.storage import Failure

__all__ = ["Dispatch", "Finished", "Lease", "Placement", "RayTrainerPool", "TpuSliceType",
           "TrainerPool", "parse_tpu_slice_types", "process_ids", "resource_shape",
           "tpu_slice_types"]

log = logging.getLogger(__name__)

# Ray resource names of the spec's Resources (of one host: resources_per_host).
_RAY_RESOURCES = (("cpus", "CPU"), ("gpus", "GPU"), ("tpus", "TPU"), ("memory_gib", "memory"))
# The resource Ray gives worker 0 of a TPU slice (ray._private.accelerators.tpu).
_TPU_HEAD = re.compile(r"^TPU-(?P<pod_type>v\w+-\d+)-head$")
# One entry of BATCHLAB_TPU_SLICE_TYPES: "<pod type>:<hosts>x<chips per host>".
_SLICE_ENTRY = re.compile(r"^(?P<pod_type>v\w+-\d+):(?P<hosts>\d+)x(?P<per_host>\d+)$")
TPU_SLICE_TYPES_ENV = "BATCHLAB_TPU_SLICE_TYPES"
# How long `start` waits for a multi-host run's actors to answer (placed and started).
START_TIMEOUT_S = 120.0
# How long closing the pool waits for the trainers' own shutdown before killing them.
SHUTDOWN_WAIT_S = 5.0


def resource_shape(resources: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """A hashable key of what each of a run's actors needs: one host's share of its Resources
    (gpus and tpus divided by num_hosts; num_hosts left out)."""
    resources = resources_per_host(resources)
    if resources.get("cpus") == 1:
        del resources["cpus"]  # what an actor gets by default: warm trainers fit such runs
    return tuple(sorted((k, v) for k, v in resources.items() if v))


def host_demand(resources: Mapping[str, Any] | None) -> dict[str, float]:
    """What one host of a run asks Ray for, by Ray resource name (CPU, GPU, TPU, memory)."""
    resources = resources_per_host(resources)
    demand = {"CPU": float(resources.get("cpus") or 1.0)}
    for name, ray_name in _RAY_RESOURCES[1:]:
        value = float(resources.get(name) or 0)
        if value:
            demand[ray_name] = value * 2**30 if name == "memory_gib" else value
    return demand


def hosts_that_fit(demand: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> int:
    """How many hosts of `demand` the nodes (their total resources) can hold at once."""
    fit = 0
    for node in nodes:
        fit += min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in demand.items())
    return fit


@dataclasses.dataclass(frozen=True)
class TpuSliceType:
    """TPU slices of one pod type that the Ray cluster has up.

    Attributes:
      pod_type: Ray's TPU pod type, e.g. "v5p-256" (a 4x4x8 v5p slice: 128 chips, 2 cores each).
      chips: the TPU chips of one slice.
      chips_per_host: the chips of one host (Ray's "TPU" resource of the slice's worker 0).
      count: how many such slices are up (nodes advertising the head resource); 0 for a
        type the cluster can add (`parse_tpu_slice_types`).
    """

    pod_type: str
    chips: int
    chips_per_host: int
    count: int

    @property
    def head(self) -> str:
        """The resource only worker 0 of each such slice has, one unit per slice."""
        return f"TPU-{self.pod_type}-head"

    @property
    def hosts(self) -> int:
        """Hosts of one slice."""
        return max(self.chips // max(self.chips_per_host, 1), 1)

    def describe(self) -> str:
        return (f"{self.pod_type} ({self.chips} chips on {self.hosts} "
                f"host{'s' if self.hosts > 1 else ''}, {self.count} up)")


def tpu_slice_types(nodes: Sequence[Mapping[str, float]]) -> list[TpuSliceType]:
    """The TPU slice types of a Ray cluster, from its nodes' total resources (sorted by pod
    type); empty when no node advertises a slice head (no TPU, or TPU hosts without the slice
    name and worker id: GKE's Ray TPU webhook not installed)."""
    from ray._private.accelerators.tpu import get_total_chips_from_accelerator_type

    found: dict[str, TpuSliceType] = {}
    for node in nodes:
        for key, value in node.items():
            match = _TPU_HEAD.match(key)
            if match is None or value < 1:
                continue
            pod_type = match["pod_type"]
            try:
                chips = get_total_chips_from_accelerator_type(pod_type)
            except ValueError:
                log.debug("unknown TPU pod type %r on a node; ignored", pod_type)
                continue
            known = found.get(pod_type)
            found[pod_type] = TpuSliceType(pod_type, chips, int(node.get("TPU", 0)),
                                           (known.count if known else 0) + int(value))
    return [found[k] for k in sorted(found)]


def parse_tpu_slice_types(text: str, variable: str = TPU_SLICE_TYPES_ENV) -> list[TpuSliceType]:
    """The TPU slice types the cluster's worker groups can add, from a setting such as
    "v5p-256:32x4,v5p-1024:128x4,v5litepod-4:1x4" (Ray's pod type: hosts x chips per host).

    Args:
      text: the setting ("" or blanks: none).
      variable: its name, for errors.

    Returns:
      The types (count 0), sorted by pod type.

    Raises:
      ValueError: naming `variable` and the entry: not "<pod type>:<hosts>x<chips>", a pod
        type Ray does not know, hosts x chips that is not the pod type's chip count, or a type
        listed twice.
    """
    from ray._private.accelerators.tpu import get_total_chips_from_accelerator_type

    found: dict[str, TpuSliceType] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        match = _SLICE_ENTRY.match(entry)
        if match is None:
            raise ValueError(f"{variable}: {entry!r} is not <pod type>:<hosts>x<chips per host> "
                             "(e.g. v5p-256:32x4)")
        pod_type, hosts, per_host = match["pod_type"], int(match["hosts"]), int(match["per_host"])
        try:
            chips = get_total_chips_from_accelerator_type(pod_type)
        except ValueError as error:
            raise ValueError(f"{variable}: {entry!r}: unknown TPU pod type {pod_type!r} "
                             f"({error})") from None
        if hosts < 1 or per_host < 1 or hosts * per_host != chips:
            raise ValueError(f"{variable}: {entry!r}: a {pod_type} slice has {chips} chips, not "
                             f"{hosts} hosts x {per_host}")
        if pod_type in found:
            raise ValueError(f"{variable}: {pod_type} is listed twice")
        found[pod_type] = TpuSliceType(pod_type, chips, per_host, 0)
    return [found[k] for k in sorted(found)]


def slices_for(resources: Mapping[str, Any] | None, hosts: int,
               slice_types: Sequence[TpuSliceType]) -> list[TpuSliceType]:
    """The slice types a TPU run can take, best first.

    A multi-host run takes one whole slice of exactly its chips and hosts: JAX on a TPU slice
    spans all of the slice's hosts, and the hosts of two slices share no interconnect. A
    single-host run takes (a share of) a single-host slice with at least its chips, the
    smallest first.
    """
    per_host = int(resources_per_host(resources).get("tpus") or 0)
    if hosts > 1:
        return [s for s in slice_types
                if s.hosts == hosts and s.chips_per_host == per_host]
    return sorted((s for s in slice_types if s.hosts == 1 and s.chips_per_host >= per_host),
                  key=lambda s: (s.chips_per_host, s.pod_type))


def process_ids(hosts: Sequence[Mapping[str, Any]], slice_name: str | None = None) -> list[int]:
    """The JAX process id of each actor of a multi-host lease, in the lease's order.

    Args:
      hosts: what each actor's `tpu_host` answered ({"worker_id": int | None, "slice": ...}).
      slice_name: the slice the lease reserved (None: not a TPU slice lease).

    Returns:
      The actors' TPU_WORKER_IDs when they all have one (a TPU slice's JAX processes must be
      numbered as the slice numbers its hosts), else 0..n-1 in the lease's order.

    Raises:
      RuntimeError: the hosts are on several slices, only some have a worker id, or the ids
        are not 0..n-1 (each once).
    """
    if slice_name is not None:
        slices = sorted({str(h.get("slice")) for h in hosts})
        if slices != [slice_name]:
            raise RuntimeError(f"the hosts of a run reserved on TPU slice {slice_name!r} are on "
                               f"slices {slices}")
    ids = [h.get("worker_id") for h in hosts]
    known = [i for i in ids if i is not None]
    if not known:
        return list(range(len(hosts)))
    if len(known) != len(ids) or sorted(known) != list(range(len(hosts))):
        raise RuntimeError(f"the hosts' TPU_WORKER_IDs {ids} are not 0..{len(hosts) - 1}, one "
                           "each: the run's hosts are not one whole TPU slice")
    return [int(i) for i in known]


def _describe(resources: Mapping[str, float]) -> str:
    parts = []
    for key, value in sorted(resources.items()):
        if key == "memory":
            parts.append(f"memory {value / 2**30:g} GiB")
        elif key in ("CPU", "GPU", "TPU"):
            parts.append(f"{key} {value:g}")
    return ", ".join(parts) or "nothing"


@dataclasses.dataclass(frozen=True)
class Placement:
    """Why a run cannot be placed now.

    Attributes:
      reason: for people (shown as the trial's and the experiment's pending reason).
      permanent: the cluster is reachable and cannot hold the run as it is (the run fails
        as unschedulable if this lasts); False: something transient (no Ray connection).
    """

    reason: str
    permanent: bool


@dataclasses.dataclass
class Lease:
    """Trainers reserved for one attempt, not started yet.

    Attributes:
      workers: the trainers' names (one per host).
      shape: their resource shape.
      actors: the actor handles (pool-specific).
      fresh: the actors are retired after the attempt (multi-host).
      tpu_slice: the TPU slice type whose head the first actor holds (a multi-host TPU run:
        `start` places the other hosts on that slice).
    """

    workers: list[str]
    shape: tuple[tuple[str, Any], ...]
    actors: list[Any]
    fresh: bool = False
    tpu_slice: TpuSliceType | None = None

    @property
    def worker(self) -> str:
        """The name stored with the attempt (hosts joined by '+')."""
        return "+".join(self.workers)


@dataclasses.dataclass
class Dispatch:
    """An attempt running on trainers.

    Attributes:
      attempt_id: the storage id of the attempt.
      experiment_id: its experiment.
      trial: the trial resource name.
      attempt: the attempt number.
      lease: the trainers running it.
      refs: pending results (one per host).
      started: time.monotonic() at the start.
      stop_requested: whether `stop` was called.
    """

    attempt_id: int
    experiment_id: str
    trial: str
    attempt: int
    lease: Lease
    refs: list[Any]
    started: float
    stop_requested: bool = False


@dataclasses.dataclass
class Finished:
    """An attempt that ended.

    Attributes:
      dispatch: what was running.
      result: the RunResult dict, when the run returned one.
      error: why there is no result (the run raised, or its trainer was lost).
      lost: the trainer died (killed, node lost, out of memory).
      failure: why there is no result, a storage Failure value (RUN, INFRASTRUCTURE,
        CONTROLLER); "" with a result.
    """

    dispatch: Dispatch
    result: dict[str, Any] | None
    error: str = ""
    lost: bool = False
    failure: str = ""

    def __post_init__(self) -> None:
        if self.result is None and not self.failure:
            self.failure = Failure.INFRASTRUCTURE if self.lost else Failure.RUN


class TrainerPool(abc.ABC):
    """Trainers that run attempts; used by one scheduler thread."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """How many trainers may exist at once."""

    def placement(self, resources: Mapping[str, Any] | None, hosts: int = 1) -> Placement | None:
        """Why a run of these resources cannot be placed now, or None when it can be."""
        if max(int(hosts or 1), 1) > self.size:
            return Placement(f"needs {hosts} trainer processes (resources.num_hosts) but the "
                             f"controller keeps at most {self.size} (BATCHLAB_NUM_TRAINERS)",
                             permanent=True)
        return None

    def request_capacity(self, demands: Sequence[tuple[Mapping[str, Any], int]]) -> None:  # noqa: B027 - optional hook
        """Ask the cluster's autoscaler for what the runs waiting to be placed need.

        Args:
          demands: (resources, hosts) of every run that `placement` refused; empty: nothing
            is needed (a previous request is withdrawn).
        """

    @abc.abstractmethod
    def acquire(self, resources: Mapping[str, Any] | None, hosts: int = 1) -> Lease | None:
        """Reserve trainers for one attempt, or None when not enough slots are free."""

    @abc.abstractmethod
    def release(self, lease: Lease) -> None:
        """Give back an unused lease."""

    @abc.abstractmethod
    def start(self, lease: Lease, attempt_id: int, experiment_id: str,
              assignment: Any) -> Dispatch:
        """Start an attempt (a batchlab.v1.TrialAssignment) on leased trainers."""

    @abc.abstractmethod
    def poll(self, timeout: float = 0.0) -> list[Finished]:
        """Attempts that ended, waiting up to `timeout` seconds for the first."""

    @abc.abstractmethod
    def stop(self, dispatch: Dispatch) -> None:
        """Ask a running attempt to stop (it ends CANCELLED after a checkpoint)."""

    @abc.abstractmethod
    def running(self) -> list[Dispatch]:
        """Attempts in progress."""

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """Trainers by state: {"idle": n, "busy": m}."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Retire every trainer."""


@dataclasses.dataclass
class _Member:
    name: str
    actor: Any  # None until `_spawn` (the hosts of a TPU slice after its head)
    shape: tuple[tuple[str, Any], ...]
    busy: bool = False
    fresh: bool = False
    pins: dict[str, float] = dataclasses.field(default_factory=dict)  # Ray resources beyond shape


class RayTrainerPool(TrainerPool):
    """Up to `size` TrainerActors in the connected Ray cluster.

    Args:
      size: the most trainers alive at once (BATCHLAB_NUM_TRAINERS).
      settings: a batchlab.v1.TrainerSettings JSON mapping (without the name; each
        trainer gets "trainer-<n>").
      name_prefix: prefix of the trainers' names.
      connected: whether Ray is connected already (else `connected()` is awaited: nothing is
        placed until then).
      nodes_ttl_s: how long the cluster's node list is reused for placement decisions.
      warm_size: how many trainers `warm` starts (BATCHLAB_WARM_TRAINERS; None: `size`). A
        pool sized for a multi-host run (128 hosts of a TPU slice) keeps only a few warm:
        idle warm actors would hold CPU pods for nothing.
      tpu_slice_types: the TPU slice types the cluster's worker groups can add
        (BATCHLAB_TPU_SLICE_TYPES, `parse_tpu_slice_types`): a TPU run of such a shape waits
        for its slice to scale up, and the autoscaler is asked for that slice.
    """

    def __init__(self, size: int, settings: Mapping[str, Any] | None = None, *,
                 name_prefix: str = "trainer", connected: bool = True,
                 nodes_ttl_s: float = 5.0, warm_size: int | None = None,
                 tpu_slice_types: Sequence[TpuSliceType] = ()):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if warm_size is not None and not 0 <= warm_size <= size:
            raise ValueError(f"warm_size must be in [0, size={size}], got {warm_size}")
        self._size = size
        self._warm_size = size if warm_size is None else warm_size
        self._settings = dict(settings or {})
        # A token per pool, so trainers of successive controllers have distinct names.
        self._prefix = f"{name_prefix}-{uuid.uuid4().hex[:4]}"
        self._members: list[_Member] = []
        self._counter = itertools.count()
        self._dispatches: dict[Any, Dispatch] = {}  # first ref -> dispatch
        self._lock = threading.RLock()
        self._connected = connected
        self._closed = False  # close() ran: nothing is placed or started again
        self._lost_reason = "" if connected else "not connected yet"
        self._lost: list[Finished] = []
        self._nodes: tuple[float, list[dict[str, float]]] = (-math.inf, [])
        self._nodes_ttl_s = nodes_ttl_s
        self._requested: tuple[tuple[tuple[str, float], ...], ...] = ()
        self._slice_types = list(tpu_slice_types)
        self._autoscaler_v2: bool | None = None  # read from the cluster once per connection
        self._request_ref: Any = None  # the in-cluster request_resources of a Ray Client

    @property
    def size(self) -> int:
        return self._size

    # -- the Ray connection (called by RayLink's thread) ------------------------------------
    @property
    def is_connected(self) -> bool:
        """Whether trainers can be placed (Ray is connected)."""
        return self._connected

    def connected(self) -> None:
        """Ray is (again) connected: placing resumes (unless the pool was closed)."""
        with self._lock:
            if self._closed:
                return
            self._connected = True
            self._lost_reason = ""
            self._nodes = (-math.inf, [])
            self._requested = ()
            self._autoscaler_v2 = None
            self._request_ref = None

    def connection_lost(self, reason: str) -> None:
        """Ray is gone: every running attempt ends lost to the controller's infrastructure
        (returned by the next `poll`), every trainer is forgotten (its actor went with the
        Ray session), and nothing is placed until `connected()`."""
        with self._lock:
            self._connected = False
            self._lost_reason = reason
            for dispatch in self._dispatches.values():
                self._lost.append(Finished(
                    dispatch, None, f"the controller lost its Ray cluster: {reason}",
                    lost=True, failure=Failure.CONTROLLER))
            self._dispatches.clear()
            self._members.clear()
        log.warning("Ray connection lost (%s): running attempts end and are retried", reason)

    def cluster_nodes(self, *, refresh: bool = False) -> list[dict[str, float]]:
        """Total resources of each alive node of the Ray cluster (cached for nodes_ttl_s)."""
        import ray

        fetched, nodes = self._nodes
        if refresh or time.monotonic() - fetched > self._nodes_ttl_s:
            # Outside the lock: against a vanished cluster this call can block for long.
            nodes = [{k: float(v) for k, v in node.get("Resources", {}).items()}
                     for node in ray.nodes() if node.get("Alive")]
            self._nodes = (time.monotonic(), nodes)
        return nodes

    # -- placement --------------------------------------------------------------------------
    def placement(self, resources: Mapping[str, Any] | None, hosts: int = 1) -> Placement | None:
        refused = super().placement(resources, hosts)
        if refused is not None:
            return refused
        if not self._connected:
            return Placement(f"waiting for the Ray cluster ({self._lost_reason})",
                             permanent=False)
        try:
            nodes = self.cluster_nodes()
        except Exception as error:  # noqa: BLE001 - the link notices a lost cluster
            return Placement(f"cannot read the Ray cluster's nodes: {error}", permanent=False)
        demand = host_demand(resources)
        hosts = max(int(hosts or 1), 1)
        if hosts_that_fit(demand, nodes) >= hosts:
            return self._tpu_placement(resources, hosts, demand, nodes)
        coming = self._scaling_slice(resources, hosts)
        if coming is not None:
            return coming
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("TPU", 0),
                                            n.get("CPU", 0)), default={})
        return Placement(
            f"needs {hosts} host{'s' if hosts > 1 else ''} with {_describe(demand)} each; the "
            f"Ray cluster's {len(nodes)} node{'s' if len(nodes) != 1 else ''} cannot hold that "
            f"(largest: {_describe(largest)}){self._configured_note(demand)}", permanent=True)

    def _tpu_placement(self, resources: Mapping[str, Any] | None, hosts: int,
                       demand: Mapping[str, float],
                       nodes: Sequence[Mapping[str, float]]) -> Placement | None:
        """Why a TPU run that the nodes' totals can hold has no slice of its shape, or None."""
        if not demand.get("TPU"):
            return None
        types = tpu_slice_types(nodes)
        if not types and hosts == 1:
            # No slice heads at all: nothing to pin to, and no multi-host slice to take from.
            return None
        if not types:
            # Enough TPU hosts are up but none is a slice's worker 0: the slices are there
            # without their names, so waiting for another one would not help.
            return Placement(
                f"needs one TPU slice of {hosts} hosts, but no Ray node advertises a TPU slice "
                "(TPU-<type>-head and the slice's name: GKE's Ray TPU webhook sets TPU_NAME and "
                "TPU_WORKER_ID on TPU pods)", permanent=True)
        if slices_for(resources, hosts, types):
            return None
        coming = self._scaling_slice(resources, hosts)
        if coming is not None:
            return coming
        want = (f"one TPU slice of {hosts} hosts with {demand['TPU']:g} chips each" if hosts > 1
                else f"a single-host TPU slice with at least {demand['TPU']:g} chips")
        return Placement(f"needs {want}; the Ray cluster's TPU slices: "
                         f"{', '.join(t.describe() for t in types)}"
                         f"{self._configured_note(demand)}", permanent=True)

    def _scaling_slice(self, resources: Mapping[str, Any] | None,
                       hosts: int) -> Placement | None:
        """The wait of a TPU run whose slice type the cluster can add (none of it is up)."""
        types = slices_for(resources, hosts, self._slice_types)
        if not types:
            return None
        coming = types[0]
        # Permanent: the autoscaler is asked for the slice (request_capacity), and a slice
        # that never comes fails the run after the unschedulable timeout, as other waits do.
        return Placement(f"waiting for a {coming.pod_type} slice to scale up ({coming.chips} "
                         f"chips on {coming.hosts} host{'s' if coming.hosts > 1 else ''}; the "
                         "Ray autoscaler is asked for it)", permanent=True)

    def _configured_note(self, demand: Mapping[str, float]) -> str:
        """What a TPU run's refusal adds about the slice types the cluster can add."""
        if not demand.get("TPU"):
            return ""
        if not self._slice_types:
            return f"; no TPU slice type can be added ({TPU_SLICE_TYPES_ENV} is not set)"
        listed = ", ".join(f"{t.pod_type} ({t.hosts}x{t.chips_per_host})"
                           for t in self._slice_types)
        return f"; nor can one be added ({TPU_SLICE_TYPES_ENV}: {listed})"

    def request_capacity(self, demands: Sequence[tuple[Mapping[str, Any], int]]) -> None:
        with self._lock:
            if not self._connected:
                return
        self._check_request()
        bundles = [b for resources, hosts in demands
                   for b in self._capacity_bundles(resources, max(int(hosts or 1), 1))]
        key = tuple(tuple(sorted(b.items())) for b in bundles)
        with self._lock:
            if key == self._requested or not self._connected:
                return
            self._requested = key
        try:
            self._request_resources(bundles)
            if bundles:
                log.info("asked the Ray autoscaler for %d host(s): %s", len(bundles), bundles)
        except Exception as error:  # noqa: BLE001 - best effort: the run waits either way
            log.warning("asking the Ray autoscaler for %d host(s) failed: %s", len(bundles),
                        error)

    def _capacity_bundles(self, resources: Mapping[str, Any] | None,
                          hosts: int) -> list[dict[str, float]]:
        """What the autoscaler is asked for so that a run can be placed.

        A TPU run whose slice type the cluster can add asks for that type's slice head (see
        the module's docstring): every host's share of `TPU-<pod type>-head` under
        autoscaler v2, one whole head per slice under v1; plain {"CPU", "TPU"} bundles
        could be met by another TPU group's nodes, or not start a multi-host group at all.
        """
        demand = {k: v for k, v in host_demand(resources).items() if k != "memory"}
        types = slices_for(resources, hosts, self._slice_types) if demand.get("TPU") else []
        if not types:
            return [demand] * hosts
        slice_type = types[0]
        if hosts == 1:
            return [{**demand, slice_type.head: demand["TPU"] / slice_type.chips_per_host}]
        return [{**demand, slice_type.head: 1.0}] * (hosts if self._is_autoscaler_v2() else 1)

    def _is_autoscaler_v2(self) -> bool:
        """Whether the cluster runs Ray's autoscaler v2 (the flag its GCS keeps; the call
        goes through Ray Client too)."""
        if self._autoscaler_v2 is None:
            import ray._raylet
            from ray.experimental.internal_kv import _internal_kv_get

            try:
                # ray/_raylet.pyi declares only the ID types, not the compiled module's
                # constants: hence the two ignores.
                self._autoscaler_v2 = _internal_kv_get(
                    ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY,  # type: ignore[attr-defined]
                    namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE  # type: ignore[attr-defined]
                ) == b"1"
            except Exception as error:  # noqa: BLE001 - asked again after a reconnect
                # v2's request (a bundle per host) also starts the slice under v1, where it
                # may start more slices than needed (up to the group's maxReplicas); v1's
                # (one bundle) starts nothing under v2.
                log.warning("cannot tell the Ray autoscaler's version (%s); asking as for v2",
                            error)
                self._autoscaler_v2 = True
                return True
            log.info("the Ray cluster's autoscaler is %s", "v2" if self._autoscaler_v2 else "v1")
        return self._autoscaler_v2

    def _request_resources(self, bundles: list[dict[str, float]]) -> None:
        """ray.autoscaler.sdk.request_resources, run in the cluster under Ray Client: there
        it needs a GCS client, which a Ray Client driver does not have (it raises)."""
        import ray
        from ray.autoscaler.sdk import request_resources
        from ray.util.client import ray as client_ray

        # Without an autoscaler this only records the request; with one (KubeRay), it starts
        # the nodes a waiting run needs (GPU and TPU groups that scaled to zero).
        if client_ray.is_connected():
            self._request_ref = ray.remote(num_cpus=0)(request_resources).remote(bundles=bundles)
        else:
            request_resources(bundles=bundles)

    def _check_request(self) -> None:
        """Log how the last in-cluster request_resources ended (it is not waited for)."""
        import ray

        ref = self._request_ref
        if ref is None:
            return
        try:
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                self._request_ref = None
                ray.get(ref)
        except Exception as error:  # noqa: BLE001 - best effort: the run waits either way
            self._request_ref = None
            log.warning("asking the Ray autoscaler for capacity failed: %s", error)

    # -- trainers ---------------------------------------------------------------------------
    def _create(self, shape: tuple[tuple[str, Any], ...], *, fresh: bool,
                pins: Mapping[str, float] | None = None, spawn: bool = True) -> _Member:
        """A new member; its actor is started now unless `spawn` is False (`_spawn` later)."""
        member = _Member(f"{self._prefix}-{next(self._counter)}", None, shape, fresh=fresh,
                         pins=dict(pins or {}))
        self._members.append(member)
        if spawn:
            self._spawn(member)
        return member

    def _spawn(self, member: _Member) -> None:
        from services.trainer.actor import TrainerActor, actor_options

        options = actor_options(dict(member.shape))
        if member.pins:
            options["resources"] = {**options.get("resources", {}), **member.pins}
        settings = {**self._settings, "name": member.name}
        member.actor = TrainerActor.options(**options).remote(settings)
        log.info("created %s with %s", member.name,
                 {**dict(member.shape), **member.pins} or "default resources")

    def _tpu_pins(self, resources: Mapping[str, Any] | None, hosts: int,
                  slice_types: Sequence[TpuSliceType] | None
                  ) -> tuple[TpuSliceType | None, dict[str, float]] | None:
        """The slice type a TPU run takes and what its first actor asks for beyond its shape:
        (None, {}) when there is nothing to pin (no TPU, or no slice heads in the cluster);
        None when every slice of its type is held by this pool's runs (it waits), or the
        cluster's slices are unknown (`slice_types` None)."""
        per_host = float(resources_per_host(resources).get("tpus") or 0)
        if not per_host:
            return None, {}
        if slice_types is None:
            return None
        types = slices_for(resources, hosts, slice_types)
        if not types:
            return (None, {}) if hosts == 1 else None
        if hosts == 1:
            # A share of a single-host slice's head: never a host of a multi-host slice.
            best = types[0]
            return None, {best.head: per_host / best.chips_per_host}
        for slice_type in types:
            held = sum(m.pins.get(slice_type.head, 0.0) for m in self._members)
            if held + 1 <= slice_type.count:
                return slice_type, {slice_type.head: 1.0}
        return None

    def warm(self, resources: Mapping[str, Any] | None = None, *, timeout: float = 300.0) -> int:
        """Start the pool's warm trainers (`warm_size`) now, with their libraries imported,
        instead of on first use.

        A long-running controller keeps warm trainers; starting them at launch keeps a Python
        process start and the JAX/flax imports (seconds each) out of the first runs. The
        trainers are usable at once (calls queue until they are up); this waits for them.

        Args:
          resources: the shape to start them with (default: no special resources).
          timeout: seconds to wait for them to answer.

        Returns:
          How many trainers were started.
        """
        import ray

        shape = resource_shape(resources)
        with self._lock:
            if not self._connected:
                return 0
            started = [self._create(shape, fresh=False)
                       for _ in range(self._warm_size - len(self._members))]
        if started:
            ray.get([m.actor.warm_up.remote() for m in started], timeout=timeout)
        return len(started)

    def _shut_down_members(self) -> None:
        """Ask every started trainer to close its metrics endpoint and remove its scratch
        folder, waiting at most SHUTDOWN_WAIT_S for all of them (a dead one is skipped)."""
        import ray

        refs = []
        for member in self._members:
            if member.actor is not None:
                with contextlib.suppress(Exception):  # it may be dead already
                    refs.append(member.actor.shutdown.remote())
        if refs:
            with contextlib.suppress(Exception):
                ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_WAIT_S)

    def _retire(self, member: _Member) -> None:
        import ray

        self._members.remove(member)
        if member.actor is None:
            return  # never started
        try:
            ray.kill(member.actor)
        except Exception:  # noqa: BLE001 - it may be dead already
            log.debug("killing %s failed", member.name, exc_info=True)
        log.info("retired %s", member.name)

    def acquire(self, resources: Mapping[str, Any] | None, hosts: int = 1) -> Lease | None:
        shape = resource_shape(resources)
        hosts = max(int(hosts or 1), 1)
        if hosts > self._size:
            raise ValueError(f"a run needs {hosts} hosts but the pool holds {self._size}")
        slice_types: list[TpuSliceType] | None = []
        if shape and dict(shape).get("tpus"):
            try:  # outside the lock: against a vanished cluster ray.nodes() can block for long
                slice_types = tpu_slice_types(self.cluster_nodes())
            except Exception:  # noqa: BLE001 - a lost cluster: the link notices; nothing placed
                log.debug("reading the cluster's TPU slices failed", exc_info=True)
                slice_types = None
        with self._lock:
            if not self._connected:
                return None
            if hosts == 1:
                for member in self._members:
                    if not member.busy and not member.fresh and member.shape == shape:
                        member.busy = True
                        return Lease([member.name], shape, [member])
            idle_other = [m for m in self._members if not m.busy and
                          (m.shape != shape or hosts > 1)]
            free = self._size - len(self._members)
            if free + len(idle_other) < hosts:
                return None
            pinned = self._tpu_pins(resources, hosts, slice_types)
            if pinned is None:
                return None  # every slice of the run's type is busy with this pool's runs
            tpu_slice, pins = pinned
            for member in idle_other[: max(hosts - free, 0)]:
                self._retire(member)
            # A TPU slice run's other hosts are started by `start`, once the first one (on the
            # slice's worker 0) says which slice it reserved.
            members = [self._create(shape, fresh=hosts > 1, pins=pins)]
            members += [self._create(shape, fresh=True, spawn=tpu_slice is None)
                        for _ in range(hosts - 1)]
            for member in members:
                member.busy = True
            return Lease([m.name for m in members], shape, members, fresh=hosts > 1,
                         tpu_slice=tpu_slice)

    def release(self, lease: Lease) -> None:
        with self._lock:
            for member in lease.actors:
                member.busy = False
                if lease.fresh and member in self._members:
                    self._retire(member)

    def start(self, lease: Lease, attempt_id: int, experiment_id: str,
              assignment: Any) -> Dispatch:
        import ray

        data = assignment.SerializeToString()
        with self._lock:
            if len(lease.actors) == 1:
                refs = [lease.actors[0].actor.run.remote(data)]
            else:
                ids = self._gang(lease)
                coordinator = ray.get(lease.actors[0].actor.coordinator_address.remote(),
                                      timeout=START_TIMEOUT_S)
                n = len(lease.actors)
                refs = [m.actor.run_distributed.remote(data, i, n, coordinator)
                        for i, m in zip(ids, lease.actors, strict=True)]
            dispatch = Dispatch(attempt_id, experiment_id, assignment.trial,
                                int(assignment.attempt), lease, refs, time.monotonic())
            self._dispatches[refs[0]] = dispatch
        log.info("%s attempt %d started on %s", dispatch.trial, dispatch.attempt, lease.worker)
        return dispatch

    def _gang(self, lease: Lease) -> list[int]:
        """Start a multi-host lease's remaining hosts and number its processes.

        For a TPU slice lease, the first actor holds the slice's head (worker 0): its slice's
        name pins every other host to that slice. The lease's actors are then reordered by
        process id (process 0, whose trainer hosts the coordinator, first).

        Returns:
          The process ids, in the (new) order of lease.actors: 0..n-1.
        """
        import ray

        slice_name = None
        if lease.tpu_slice is not None:
            head = lease.actors[0]
            slice_name = ray.get(head.actor.tpu_host.remote(True), timeout=START_TIMEOUT_S)["slice"]
            if not slice_name:
                raise RuntimeError(f"{head.name} holds {lease.tpu_slice.head} but its host "
                                   "names no TPU slice (TPU_NAME)")
            for member in lease.actors[1:]:
                member.pins = {slice_name: 1.0}
                self._spawn(member)
            log.info("%s reserved TPU slice %s (%s)", lease.worker, slice_name,
                     lease.tpu_slice.pod_type)
        hosts = ray.get([m.actor.tpu_host.remote(slice_name is not None) for m in lease.actors],
                        timeout=START_TIMEOUT_S)
        ids = process_ids(hosts, slice_name)
        order = sorted(range(len(ids)), key=ids.__getitem__)
        lease.actors[:] = [lease.actors[i] for i in order]
        lease.workers[:] = [lease.workers[i] for i in order]
        return sorted(ids)

    def poll(self, timeout: float = 0.0) -> list[Finished]:
        import ray

        with self._lock:
            lost, self._lost = self._lost, []
            pending = [ref for d in self._dispatches.values() for ref in d.refs]
        if lost:
            return lost
        if not pending:
            if timeout > 0:
                time.sleep(timeout)
            return []
        try:
            ray.wait(pending, num_returns=1, timeout=timeout)
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
        except Exception as error:  # noqa: BLE001 - the link decides whether Ray is lost
            log.warning("polling the trainers failed: %s", error)
            return []
        ready_refs = set(ready)
        finished: list[Finished] = []
        with self._lock:
            for key, dispatch in list(self._dispatches.items()):
                done = [ref for ref in dispatch.refs if ref in ready_refs]
                if not done:
                    continue
                outcome = self._collect(dispatch, done)
                if outcome is None:
                    continue  # a multi-host attempt with processes still running
                del self._dispatches[key]
                finished.append(outcome)
        return finished

    def _collect(self, dispatch: Dispatch, done: list[Any]) -> Finished | None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        results: dict[int, dict[str, Any]] = {}
        failure: Finished | None = None
        lost_members: list[_Member] = []
        retired: list[_Member] = []
        for ref in done:
            index = dispatch.refs.index(ref)
            member = dispatch.lease.actors[index]
            try:
                results[index] = ray.get(ref)
            except RayActorError as error:
                lost_members.append(member)
                failure = failure or Finished(dispatch, None, f"trainer {member.name} lost: "
                                              f"{type(error).__name__}: {error}", lost=True)
            except Exception as error:  # noqa: BLE001 - the run raised: a FAILED attempt
                cause = error.cause if isinstance(error, RayTaskError) else error
                infrastructure = bool(getattr(cause, "infrastructure", False))
                if getattr(cause, "retire_trainer", False):
                    # E.g. its JAX runs with another XLA:CPU thread count than the run needs.
                    retired.append(member)
                failure = failure or Finished(
                    dispatch, None, f"trainer {member.name} raised "
                    f"{type(cause).__name__}: {cause}",
                    failure=Failure.INFRASTRUCTURE if infrastructure else Failure.RUN)
        if failure is None and len(done) < len(dispatch.refs):
            return None
        for member in lost_members:
            if member in self._members:
                self._members.remove(member)
                log.warning("%s died running %s attempt %d", member.name, dispatch.trial,
                            dispatch.attempt)
        for member in dispatch.lease.actors:
            member.busy = False
            # The processes of a multi-host run cannot join another one; after a failure the
            # survivors may be stuck in a collective: retire them all.
            if member in self._members and (dispatch.lease.fresh or member in retired or
                                            failure is not None and
                                            len(dispatch.lease.actors) > 1):
                self._retire(member)
        if failure is not None:
            return failure
        return Finished(dispatch, results[0])

    def stop(self, dispatch: Dispatch) -> None:
        if dispatch.stop_requested:
            return
        dispatch.stop_requested = True
        with self._lock:
            if len(dispatch.lease.actors) > 1:
                # The processes of a multi-host run cannot agree on a step to stop at: end
                # them all (the attempt comes back lost; its experiment has ended, so no retry).
                import ray

                for member in dispatch.lease.actors:
                    ray.kill(member.actor)
            else:
                dispatch.lease.actors[0].actor.stop.remote(dispatch.trial, dispatch.attempt)
        log.info("asked %s to stop %s attempt %d", dispatch.lease.worker, dispatch.trial,
                 dispatch.attempt)

    def running(self) -> list[Dispatch]:
        with self._lock:
            return list(self._dispatches.values())

    def actor_of(self, trial: str) -> Any | None:
        """The actor running a trial's attempt now (for operators and tests), or None."""
        return next(iter(self.actors_of(trial)), None)

    def actors_of(self, trial: str) -> list[Any]:
        """The actors (one per host) running a trial's attempt now."""
        with self._lock:
            for dispatch in self._dispatches.values():
                if dispatch.trial == trial:
                    return [m.actor for m in dispatch.lease.actors]
        return []

    def counts(self) -> dict[str, int]:
        with self._lock:
            busy = sum(1 for m in self._members if m.busy)
            return {"idle": len(self._members) - busy, "busy": busy}

    def close(self) -> None:
        with self._lock:
            if self._connected:
                self._shut_down_members()
                for member in list(self._members):
                    self._retire(member)
            self._members.clear()
            self._dispatches.clear()
            # The Ray link's thread may still connect or warm trainers up: none may start.
            self._closed = True
            self._connected = False
