"""batchlab.sqlite: a connection per thread, explicit transactions, close."""

from __future__ import annotations

import threading

import pytest

from batchlab.sqlite import ClosedError, ThreadConnections


def test_each_thread_gets_its_own_connection_and_sees_committed_writes(tmp_path):
    db = ThreadConnections(tmp_path / "t.sqlite3")
    db.get().executescript("CREATE TABLE t (x INTEGER)")
    with db.write() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    seen = {}

    def other():
        seen["conn"] = db.get()
        seen["rows"] = db.get().execute("SELECT x FROM t").fetchall()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen["conn"] is not db.get()
    assert seen["rows"] == [(1,)]
    assert db.get().execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_failed_write_is_rolled_back(tmp_path):
    db = ThreadConnections(tmp_path / "t.sqlite3", foreign_keys=True)
    db.get().executescript("CREATE TABLE t (x INTEGER)")
    with pytest.raises(RuntimeError, match="boom"), db.write() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        raise RuntimeError("boom")
    assert db.get().execute("SELECT count(*) FROM t").fetchone() == (0,)
    assert db.get().execute("PRAGMA foreign_keys").fetchone() == (1,)


def test_closed_connections_are_refused(tmp_path):
    db = ThreadConnections(tmp_path / "t.sqlite3")
    conn = db.get()
    db.close()
    assert db.closed
    with pytest.raises(ClosedError, match="closed"):
        db.get()
    with pytest.raises(Exception, match="closed"):
        conn.execute("SELECT 1")
