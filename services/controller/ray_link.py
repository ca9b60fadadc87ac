"""The controller's link to its Ray cluster: connect in the background, notice a loss, reconnect.

The controller serves gRPC before Ray is reachable (on a fresh cluster the GPU nodes may not
exist yet, images may still be pulling): `RayLink` connects from its own thread, retrying
with backoff, then warms the pool's trainers. While connected it probes the cluster every
`probe_interval_s` (listing its nodes, with a deadline); a probe that fails or hangs means the
link is lost (a head restart, a Ray Client disconnect longer than its grace period): the pool
ends every running attempt as lost to the controller (they are retried without counting
toward max_attempts), the session is shut down, and the link connects again and re-places
the work.

The state is visible: the gRPC health service reports `TRAINERS_HEALTH_SERVICE` SERVING only
while connected (the ExperimentService itself stays SERVING: experiments can be submitted
and read while trainers are away), and the metrics `batchlab_ray_connected`,
`batchlab_cluster_resources{resource}` and `batchlab_trainers{state}` say how much capacity
there is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["TRAINERS_HEALTH_SERVICE", "RayLink"]

log = logging.getLogger(__name__)

# The health service name that reflects the trainers' capacity (Ray connected).
TRAINERS_HEALTH_SERVICE = "batchlab.trainers"


def _with_deadline(fn: Callable[[], Any], timeout_s: float) -> Any:
    """fn() in a helper thread; TimeoutError when it does not return in time.

    Ray calls against a vanished cluster can block for a long time: the probe must not.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            box["error"] = error

    thread = threading.Thread(target=target, name="ray-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer in {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class RayLink:
    """Connects the controller to Ray and keeps it connected.

    Args:
      connect: connects (or starts) Ray; returns whether this process started a local Ray
        (then `close` shuts it down). Raises on failure.
      pool: the RayTrainerPool (told `connected()` / `connection_lost(reason)`; warmed).
      health: the server's grpc_health HealthServicer (or None).
      metrics: batchlab.rpc.metrics ControllerMetrics (or None).
      probe_interval_s: time between two probes while connected.
      probe_timeout_s: a probe that takes longer means the link is lost.
      retry_s: the first wait before connecting again (doubled up to 30 s).
      warm: warm the pool's trainers after each connection.
      on_change: called after every connection and loss (e.g. to wake the scheduler).
    """

    def __init__(self, connect: Callable[[], bool], pool: Any, *, health: Any = None,
                 metrics: Any = None, probe_interval_s: float = 5.0,
                 probe_timeout_s: float = 30.0, retry_s: float = 1.0, warm: bool = True,
                 on_change: Callable[[], None] | None = None):
        self._connect = connect
        self._pool = pool
        self._health = health
        self._metrics = metrics
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.retry_s = retry_s
        self._warm = warm
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_local = False
        self.connected = threading.Event()
        self.last_error = "not connected yet"
        self.connections = 0
        self._set_health(False)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Connect and watch from a background thread."""
        self._thread = threading.Thread(target=self._loop, name="ray-link", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Tell the link's thread to stop, without waiting for it: a connection it completes
        from then on is not handed to the pool (no trainers are warmed for a pool about to
        close). ``close`` waits for the thread."""
        self._stop.set()

    def close(self, timeout: float = 30.0) -> None:
        """Stop watching (waiting up to ``timeout`` s for the thread); shut a local Ray this
        process started down."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._started_local:
            import ray

            ray.shutdown()

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        wait = self.retry_s
        while not self._stop.is_set():
            if not self.connected.is_set():
                if self._try_connect():
                    wait = self.retry_s
                else:
                    self._stop.wait(wait)
                    wait = min(wait * 2, 30.0)
                continue
            self._stop.wait(self.probe_interval_s)
            if self._stop.is_set():
                return
            error = self.probe()
            if error is not None:
                self._lose(error)

    def _try_connect(self) -> bool:
        try:
            self._started_local = bool(self._connect()) or self._started_local
        except Exception as error:  # noqa: BLE001 - retried; the reason is shown
            self.last_error = f"{type(error).__name__}: {error}"
            log.warning("cannot connect to Ray (%s); trying again", self.last_error)
            return False
        if self._stop.is_set():
            log.info("connected to Ray while stopping: the pool is not told")
            return True
        self.connections += 1
        self.last_error = ""
        self._pool.connected()
        self.connected.set()
        self._set_health(True)
        self._update_capacity()
        log.info("connected to Ray (connection %d)", self.connections)
        self._changed()
        if self._warm:
            try:
                log.info("started %d warm trainers", self._pool.warm())
            except Exception:  # noqa: BLE001 - trainers then start on first use
                log.warning("could not start warm trainers; they start on first use",
                            exc_info=True)
            self._update_capacity()
        return True

    def probe(self) -> str | None:
        """Check the cluster answers; None when it does, else why not."""
        import ray

        try:
            if not ray.is_initialized():
                return "the Ray session ended"
            _with_deadline(lambda: self._pool.cluster_nodes(refresh=True), self.probe_timeout_s)
        except Exception as error:  # noqa: BLE001 - any failure means the link is gone
            return f"{type(error).__name__}: {error}"
        self._update_capacity()
        return None

    def _lose(self, reason: str) -> None:
        import ray

        log.error("lost the Ray cluster: %s", reason)
        self.connected.clear()
        self.last_error = reason
        self._set_health(False)
        self._pool.connection_lost(reason)
        if self._metrics is not None:
            self._metrics.trainers.labels(state="idle").set(0)
            self._metrics.trainers.labels(state="busy").set(0)
        try:
            _with_deadline(ray.shutdown, self.probe_timeout_s)
        except Exception:  # noqa: BLE001 - a fresh ray.init follows either way
            log.warning("ray.shutdown after the loss failed", exc_info=True)
        self._changed()

    # -- reporting --------------------------------------------------------------------------
    def _set_health(self, serving: bool) -> None:
        if self._metrics is not None:
            self._metrics.ray_connected.set(1 if serving else 0)
        if self._health is None:
            return
        from grpc_health.v1 import health_pb2

        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self._health.set(TRAINERS_HEALTH_SERVICE, status)
        except Exception:  # noqa: BLE001 - a server shutting down refuses new statuses
            log.debug("health not updated", exc_info=True)

    def _update_capacity(self) -> None:
        if self._metrics is None:
            return
        try:
            nodes = self._pool.cluster_nodes()
        except Exception:  # noqa: BLE001 - the next probe says whether Ray is gone
            return
        totals: dict[str, float] = {}
        for node in nodes:
            for key in ("CPU", "GPU", "TPU", "memory"):
                totals[key] = totals.get(key, 0.0) + float(node.get(key, 0.0))
        for key, value in totals.items():
            self._metrics.cluster_resources.labels(resource=key).set(value)
        for state, n in self._pool.counts().items():
            self._metrics.trainers.labels(state=state).set(n)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (or timeout); returns whether it is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop.is_set():
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
            if self.connected.wait(min(0.5, remaining) if remaining is not None else 0.5):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return self.connected.is_set()
