"""The controller's Ray link, with a fake connection and pool: what it tells the pool."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from services.controller.ray_link import RayLink


class _Pool:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def connected(self) -> None:
        self.calls.append("connected")

    def warm(self) -> int:
        self.calls.append("warm")
        return 1

    def connection_lost(self, reason: str) -> None:
        self.calls.append("lost")


def _blocking_connect() -> tuple[threading.Event, threading.Event, Callable[[], bool]]:
    """(entered, release, connect): connect() sets entered, then waits for release (as a
    ray.init under way), and returns False (no local Ray started)."""
    entered, release = threading.Event(), threading.Event()

    def connect() -> bool:
        entered.set()
        release.wait(10)
        return False

    return entered, release, connect


def test_a_connection_made_while_stopping_is_not_handed_to_the_pool():
    # ray.init can take tens of seconds; a controller stopping meanwhile closes the pool, and
    # the link must not then tell it of the connection and start (warm) trainers for it.
    entered, release, connect = _blocking_connect()

    pool = _Pool()
    link = RayLink(connect, pool, warm=True)
    link.start()
    assert entered.wait(10)
    link.request_stop()  # returns at once, while ray.init is still under way
    release.set()
    link.close(timeout=10)
    assert link._thread is not None and not link._thread.is_alive()
    assert pool.calls == []
    assert not link.connected.is_set()


def test_asking_the_link_to_stop_does_not_wait_for_a_connection_under_way():
    # The controller asks before closing the pool; the pool's close ends a warm in progress,
    # and close() waits for the thread afterwards: the stop must not wait twice.
    entered, release, connect = _blocking_connect()

    link = RayLink(connect, _Pool(), warm=True)
    link.start()
    assert entered.wait(10)
    started = time.monotonic()
    link.request_stop()
    assert time.monotonic() - started < 1.0
    release.set()
    link.close(timeout=10)


def test_a_connection_is_handed_to_the_pool_and_its_trainers_warmed():
    pool = _Pool()
    link = RayLink(lambda: False, pool, warm=True)
    link.start()
    try:
        assert link.connected.wait(10)
    finally:
        link.close(timeout=10)
    assert pool.calls == ["connected", "warm"]


def test_the_controller_asks_its_link_to_stop_before_closing_the_pool_and_joins_it_after(
        tmp_path):
    # The order that keeps a stop quick and warms nothing for a closing pool: request_stop
    # (no wait), then the scheduler's stop closes the pool (ending a warm under way), then
    # the link's close joins its thread.
    from controller_fakes import WORKLOAD, FakePool

    from services.controller.server import Controller, ControllerConfig
    from services.controller.storage import InMemoryStorage

    calls: list[str] = []

    class Link:
        def request_stop(self) -> None:
            calls.append("link.request_stop")

        def close(self, timeout: float = 30.0) -> None:
            calls.append("link.close")

    pool = FakePool(size=1)
    close_pool = pool.close
    pool.close = lambda: (calls.append("pool.close"), close_pool())[1]
    config = ControllerConfig(port=0, metrics_port=None, state_dir=str(tmp_path / "state"),
                              workloads=(WORKLOAD,))
    controller = Controller(config, storage=InMemoryStorage(), pool=pool)
    controller.link = Link()
    controller.server.start()
    controller.stop(grace=0)
    assert calls == ["link.request_stop", "pool.close", "link.close"]
