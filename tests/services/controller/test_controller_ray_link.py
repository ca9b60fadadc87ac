"""The controller's Ray link, with a fake connection and pool: what it tells the pool."""

from __future__ import annotations

import threading

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


def test_a_connection_made_while_stopping_is_not_handed_to_the_pool():
    # ray.init can take tens of seconds; a controller stopping meanwhile closes the pool, and
    # the link must not then tell it of the connection and start (warm) trainers for it.
    entered, release = threading.Event(), threading.Event()

    def connect() -> bool:
        entered.set()
        release.wait(10)
        return False

    pool = _Pool()
    link = RayLink(connect, pool, warm=True)
    link.start()
    assert entered.wait(10)
    stopper = threading.Thread(target=link.stop_watching, kwargs={"timeout": 10})
    stopper.start()
    release.set()
    stopper.join(15)
    assert not stopper.is_alive()
    assert pool.calls == []
    assert not link.connected.is_set()


def test_a_connection_is_handed_to_the_pool_and_its_trainers_warmed():
    pool = _Pool()
    link = RayLink(lambda: False, pool, warm=True)
    link.start()
    try:
        assert link.connected.wait(10)
    finally:
        link.stop_watching(timeout=10)
    assert pool.calls == ["connected", "warm"]
