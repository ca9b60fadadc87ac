"""The pool of trainer actors the scheduler hands attempts to.

`TrainerPool` is what the scheduler needs: reserve trainers for an attempt (`acquire`), start
it (`start`), collect what finished (`poll`), ask one to stop (`stop`). `RayTrainerPool` keeps
up to `size` Ray actors (services.trainer.actor.TrainerActor): actors are made with the
resources of the runs they serve and reused by later runs with the same resources; an idle
actor of other resources is retired when its slot is needed. A multi-host attempt takes
`num_hosts` fresh actors (a JAX process joins one distributed system in its life) that are
retired when it ends.

Failures are told apart: an attempt whose actor died (`ray.exceptions.RayActorError`: killed,
its node lost, out of memory) comes back `lost`; an exception raised by the run itself comes
back with its text. Both are infrastructure failures for the protocol (outcome FAILED).
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = ["Dispatch", "Finished", "Lease", "RayTrainerPool", "TrainerPool", "resource_shape"]

log = logging.getLogger(__name__)


def resource_shape(resources: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """A hashable key of the resources a run's actor needs (num_hosts left out)."""
    resources = dict(resources or {})
    resources.pop("num_hosts", None)
    return tuple(sorted((k, v) for k, v in resources.items() if v))


@dataclasses.dataclass
class Lease:
    """Trainers reserved for one attempt, not started yet.

    Attributes:
      workers: the trainers' names (one per host).
      shape: their resource shape.
      actors: the actor handles (pool-specific).
      fresh: the actors are retired after the attempt (multi-host).
    """

    workers: list[str]
    shape: tuple[tuple[str, Any], ...]
    actors: list[Any]
    fresh: bool = False

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
    """

    dispatch: Dispatch
    result: dict[str, Any] | None
    error: str = ""
    lost: bool = False


class TrainerPool(abc.ABC):
    """Trainers that run attempts; used by one scheduler thread."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """How many trainers may exist at once."""

    @abc.abstractmethod
    def acquire(self, resources: Mapping[str, Any] | None, hosts: int = 1) -> Lease | None:
        """Reserve trainers for one attempt, or None when not enough slots are free."""

    @abc.abstractmethod
    def release(self, lease: Lease) -> None:
        """Give back an unused lease."""

    @abc.abstractmethod
    def start(self, lease: Lease, attempt_id: int, experiment_id: str,
              request: Mapping[str, Any]) -> Dispatch:
        """Start an attempt on leased trainers."""

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
    actor: Any
    shape: tuple[tuple[str, Any], ...]
    busy: bool = False
    fresh: bool = False


class RayTrainerPool(TrainerPool):
    """Up to `size` TrainerActors in the connected Ray cluster.

    Args:
      size: the most trainers alive at once (BATCHLAB_NUM_TRAINERS).
      settings: services.trainer.actor.TrainerSettings as a mapping (without the name; each
        trainer gets "trainer-<n>").
      name_prefix: prefix of the trainers' names.
    """

    def __init__(self, size: int, settings: Mapping[str, Any] | None = None, *,
                 name_prefix: str = "trainer"):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self._size = size
        self._settings = dict(settings or {})
        # A token per pool, so trainers of successive controllers have distinct names.
        self._prefix = f"{name_prefix}-{uuid.uuid4().hex[:4]}"
        self._members: list[_Member] = []
        self._counter = itertools.count()
        self._dispatches: dict[Any, Dispatch] = {}  # first ref -> dispatch

    @property
    def size(self) -> int:
        return self._size

    def _create(self, shape: tuple[tuple[str, Any], ...], *, fresh: bool) -> _Member:
        from services.trainer.actor import TrainerActor, actor_options

        name = f"{self._prefix}-{next(self._counter)}"
        settings = {**self._settings, "name": name}
        actor = TrainerActor.options(**actor_options(dict(shape))).remote(settings)
        member = _Member(name, actor, shape, fresh=fresh)
        self._members.append(member)
        log.info("created %s with %s", name, dict(shape) or "default resources")
        return member

    def warm(self, resources: Mapping[str, Any] | None = None, *, timeout: float = 300.0) -> int:
        """Start the pool's trainers now, with their libraries imported, instead of on first use.

        A long-running controller keeps warm trainers; starting them at launch keeps a Python
        process start and the JAX/flax imports (seconds each) out of the first runs.

        Args:
          resources: the shape to start them with (default: no special resources).
          timeout: seconds to wait for them to answer.

        Returns:
          How many trainers were started.
        """
        import ray

        shape = resource_shape(resources)
        started = [self._create(shape, fresh=False) for _ in range(self._size - len(self._members))]
        if started:
            ray.get([m.actor.warm_up.remote() for m in started], timeout=timeout)
        return len(started)

    def _retire(self, member: _Member) -> None:
        import ray

        self._members.remove(member)
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
        for member in idle_other[: max(hosts - free, 0)]:
            self._retire(member)
        members = [self._create(shape, fresh=hosts > 1) for _ in range(hosts)]
        for member in members:
            member.busy = True
        return Lease([m.name for m in members], shape, members, fresh=hosts > 1)

    def release(self, lease: Lease) -> None:
        for member in lease.actors:
            member.busy = False
            if lease.fresh and member in self._members:
                self._retire(member)

    def start(self, lease: Lease, attempt_id: int, experiment_id: str,
              request: Mapping[str, Any]) -> Dispatch:
        import ray

        request = dict(request)
        if len(lease.actors) == 1:
            refs = [lease.actors[0].actor.run.remote(request)]
        else:
            coordinator = ray.get(lease.actors[0].actor.coordinator_address.remote(),
                                  timeout=120)
            n = len(lease.actors)
            refs = [m.actor.run_distributed.remote(request, i, n, coordinator)
                    for i, m in enumerate(lease.actors)]
        dispatch = Dispatch(attempt_id, experiment_id, request["trial"], int(request["attempt"]),
                            lease, refs, time.monotonic())
        self._dispatches[refs[0]] = dispatch
        log.info("%s attempt %d started on %s", dispatch.trial, dispatch.attempt, lease.worker)
        return dispatch

    def poll(self, timeout: float = 0.0) -> list[Finished]:
        import ray

        if not self._dispatches:
            if timeout > 0:
                time.sleep(timeout)
            return []
        pending = [ref for d in self._dispatches.values() for ref in d.refs]
        ray.wait(pending, num_returns=1, timeout=timeout)
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
        ready = set(ready)
        finished: list[Finished] = []
        for key, dispatch in list(self._dispatches.items()):
            done = [ref for ref in dispatch.refs if ref in ready]
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
        from ray.exceptions import RayActorError

        results: dict[int, dict[str, Any]] = {}
        failure: Finished | None = None
        lost_members: list[_Member] = []
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
                failure = failure or Finished(dispatch, None, f"trainer {member.name} raised "
                                              f"{type(error).__name__}: {error}")
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
            if member in self._members and (dispatch.lease.fresh or failure is not None and
                                            len(dispatch.lease.actors) > 1):
                self._retire(member)
        if failure is not None:
            return failure
        return Finished(dispatch, results[0])

    def stop(self, dispatch: Dispatch) -> None:
        if dispatch.stop_requested:
            return
        dispatch.stop_requested = True
        if len(dispatch.lease.actors) > 1:
            # The processes of a multi-host run cannot agree on a step to stop at: end them
            # all (the attempt comes back lost; its experiment has ended, so no retry).
            import ray

            for member in dispatch.lease.actors:
                ray.kill(member.actor)
        else:
            dispatch.lease.actors[0].actor.stop.remote(dispatch.trial, dispatch.attempt)
        log.info("asked %s to stop %s attempt %d", dispatch.lease.worker, dispatch.trial,
                 dispatch.attempt)

    def running(self) -> list[Dispatch]:
        return list(self._dispatches.values())

    def actor_of(self, trial: str) -> Any | None:
        """The actor running a trial's attempt now (for operators and tests), or None."""
        for dispatch in self._dispatches.values():
            if dispatch.trial == trial:
                return dispatch.lease.actors[0].actor
        return None

    def counts(self) -> dict[str, int]:
        busy = sum(1 for m in self._members if m.busy)
        return {"idle": len(self._members) - busy, "busy": busy}

    def close(self) -> None:
        for member in list(self._members):
            self._retire(member)
        self._dispatches.clear()
