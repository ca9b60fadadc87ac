"""One SQLite file shared by a process's threads: a connection per thread, explicit transactions.

The controller's experiment store and the sharding service's position store keep their state in
SQLite (WAL mode) so that it outlives the process. Both are called from gRPC worker threads, and
a `sqlite3.Connection` must not be used by two threads at once, so each thread gets its own
connection. Every write is one `BEGIN IMMEDIATE` transaction: writers queue on SQLite's lock
(with a busy timeout) instead of failing with "database is locked", and readers see committed
data only.

  >>> db = ThreadConnections("/tmp/example.sqlite3")  # doctest: +SKIP
  >>> with db.write() as conn:  # doctest: +SKIP
  ...     conn.execute("INSERT INTO t VALUES (1)")
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ClosedError", "ThreadConnections"]


class ClosedError(sqlite3.ProgrammingError):
    """A connection was asked for after :meth:`ThreadConnections.close`."""


class ThreadConnections:
    """A connection per calling thread to one SQLite file, in WAL mode.

    Args:
      path: the database file (its folder must exist).
      busy_timeout_s: how long a writer waits for SQLite's lock before failing.
      foreign_keys: turn on foreign-key enforcement on every connection.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0,
                 foreign_keys: bool = False):
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._foreign_keys = foreign_keys
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use).

        Raises:
          ClosedError: after :meth:`close`.
        """
        if self._closed:
            raise ClosedError(f"{self.path}: closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE in write()).
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL survives a killed process (SIGKILL); a power cut may lose the
            # last commits.
            conn.execute("PRAGMA synchronous=NORMAL")
            if self._foreign_keys:
                conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back on any exception."""
        conn = self.get()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query inside sees the same snapshot."""
        conn = self.get()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Close every thread's connection; later calls to :meth:`get` raise ClosedError."""
        self._closed = True
        with self._lock:
            for conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
