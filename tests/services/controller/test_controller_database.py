"""Corrupt controller state is detected (issue 9, part 4): the controller runs SQLite's
integrity check at start and refuses a truncated or damaged database with one line naming the
file and the way out; scheduled online backups restore what a damaged file lost."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading

import pytest

from services.controller.backups import (
    BackupScheduler,
    DatabaseDamaged,
    backup_database,
    check_database,
    latest_backup,
)
from services.controller.storage import SQLiteStorage


def _filled(directory, count: int = 200) -> SQLiteStorage:
    storage = SQLiteStorage(directory)
    for i in range(count):
        storage.create_experiment(f"exp-{i}", f"request-{i}", {"name": "x" * 400, "i": i})
    return storage


def _truncate(path) -> None:
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) // 2)


def _scribble(path) -> None:
    data = bytearray(path.read_bytes())
    data[8192:12288] = b"\x55" * 4096  # pages 3 and 4 of the b-trees
    path.write_bytes(bytes(data))


def _break_an_index(path) -> None:
    """A file SQLite still opens whose index disagrees with its table."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE INDEX by_state ON experiments(state)")
    conn.commit()
    conn.execute("PRAGMA writable_schema=ON")
    conn.execute("UPDATE sqlite_master SET sql='CREATE INDEX by_state ON experiments(spec)' "
                 "WHERE name='by_state'")
    conn.commit()
    conn.close()


def _overlap_cells(path) -> None:
    """A file SQLite still opens whose integrity check returns one row of eight lines: the
    cell pointers of one table leaf all point at the first cell."""
    conn = sqlite3.connect(path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name='experiments'").fetchone()[0]
    conn.close()
    data = bytearray(path.read_bytes())
    interior = (root - 1) * page_size
    assert data[interior] == 5  # an interior table page: its right-most child is a leaf
    leaf = (int.from_bytes(data[interior + 8:interior + 12], "big") - 1) * page_size
    cells = int.from_bytes(data[leaf + 3:leaf + 5], "big")
    assert data[leaf] == 13 and cells > 2
    first = data[leaf + 8:leaf + 10]
    for k in range(1, cells):
        data[leaf + 8 + 2 * k:leaf + 10 + 2 * k] = first
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, says", [
    (_truncate, "cannot be read"),
    (_scribble, "cannot be read"),
    (_break_an_index, "is damaged (integrity_check: "),
    (lambda path: path.write_bytes(b"not a database" * 100), "cannot be read"),
])
def test_a_damaged_database_is_refused_with_the_way_out(tmp_path, damage, says):
    _filled(tmp_path).close()
    path = tmp_path / SQLiteStorage.FILENAME
    damage(path)
    with pytest.raises(DatabaseDamaged) as info:
        SQLiteStorage(tmp_path)
    message = str(info.value)
    assert says in message and str(path) in message
    assert "\n" not in message
    assert f"move {path} away" in message and "no backup exists yet" in message
    assert "stop the controller and no backup" not in message


def test_a_multi_line_integrity_report_becomes_one_line_with_the_count_of_the_rest(tmp_path):
    _filled(tmp_path).close()
    path = tmp_path / SQLiteStorage.FILENAME
    _overlap_cells(path)
    rows = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True).execute(
        "PRAGMA integrity_check").fetchall()
    lines = [line for row in rows for line in row[0].splitlines()]
    assert lines[0] == "*** in database main ***" and len(lines) > 3  # what SQLite says
    with pytest.raises(DatabaseDamaged) as info:
        check_database(path)
    message = str(info.value)
    assert "\n" not in message and "***" not in message
    assert f"(integrity_check: {lines[1]} and {len(lines) - 2} more problems); " in message
    assert message.endswith(f"no backup exists yet (they go to {tmp_path / 'backups'}), so "
                            f"stop the controller and move {path} away to start with an "
                            "empty database")


def test_an_intact_database_passes_and_a_new_one_is_created(tmp_path):
    _filled(tmp_path, 5).close()
    check_database(tmp_path / SQLiteStorage.FILENAME)
    assert SQLiteStorage(tmp_path).get_experiment("exp-4") is not None
    check_database(tmp_path / "absent" / SQLiteStorage.FILENAME)


def test_the_controller_process_refuses_in_one_line_and_exits_2(tmp_path):
    _filled(tmp_path / "state").close()
    path = tmp_path / "state" / SQLiteStorage.FILENAME
    backup = backup_database(path)
    _truncate(path)
    env = {**os.environ, "BATCHLAB_STATE_DIR": str(tmp_path / "state"),
           "BATCHLAB_BIND_HOST": "127.0.0.1", "BATCHLAB_CONTROLLER_PORT": "0",
           "BATCHLAB_METRICS_PORT": "0", "BATCHLAB_EVALUATION": "in-process"}
    done = subprocess.run([sys.executable, "-m", "services.controller.server"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "controller cannot start" in x]
    assert f"cp {backup} {path}" in line


def test_restoring_the_newest_backup_brings_the_data_back(tmp_path):
    storage = _filled(tmp_path, 50)
    backups = BackupScheduler(storage.path, interval_s=3600, keep=2)
    first = backups.backup_now()
    storage.create_experiment("late", "late-request", {"name": "late"})
    second = backup_database(storage.path, keep=2, clock=lambda: 4e9)
    assert latest_backup(storage.path) == second != first
    storage.close()
    _scribble(storage.path)
    with pytest.raises(DatabaseDamaged) as info:
        SQLiteStorage(tmp_path)
    assert f"cp {second} {storage.path}" in str(info.value)
    shutil.copy(second, storage.path)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"{SQLiteStorage.FILENAME}{suffix}").unlink(missing_ok=True)
    restored = SQLiteStorage(tmp_path)
    assert restored.get_experiment("exp-49") is not None
    assert restored.get_experiment("late") is not None


def test_backups_are_consistent_while_the_controller_writes_and_only_the_newest_are_kept(
        tmp_path):
    storage = _filled(tmp_path, 10)
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            storage.create_experiment(f"busy-{i}", f"busy-{i}", {"i": i})
            i += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        made = [backup_database(storage.path, keep=3, clock=lambda t=t: 1e9 + t)
                for t in range(5)]
    finally:
        stop.set()
        writer.join()
    kept = sorted((tmp_path / "backups").glob("controller-*.sqlite3"))
    assert kept == made[-3:]
    for backup in kept:
        check_database(backup)
        count = sqlite3.connect(backup).execute("SELECT COUNT(*) FROM experiments").fetchone()
        assert count[0] >= 10
    assert not list((tmp_path / "backups").glob(".partial-*"))


def test_the_scheduler_backs_up_at_start_and_stops(tmp_path):
    storage = _filled(tmp_path, 3)
    scheduler = BackupScheduler(storage.path, interval_s=0.05, keep=2)
    scheduler.start()
    for _ in range(200):
        if latest_backup(storage.path) is not None:
            break
        threading.Event().wait(0.05)
    scheduler.stop()
    assert latest_backup(storage.path) is not None
    assert len(list((tmp_path / "backups").glob("controller-*.sqlite3"))) <= 2


def test_a_taken_metrics_port_ends_the_controller_with_status_2(tmp_path):
    """Status 1 and a traceback made `batchlab up` retry it three times on the same port."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        env = {**os.environ, "BATCHLAB_STATE_DIR": str(tmp_path / "state"),
               "BATCHLAB_BIND_HOST": "127.0.0.1", "BATCHLAB_CONTROLLER_PORT": "0",
               "BATCHLAB_METRICS_PORT": str(taken), "BATCHLAB_EVALUATION": "in-process"}
        done = subprocess.run([sys.executable, "-m", "services.controller.server"], env=env,
                              capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "controller cannot start" in x]
    assert "Address already in use" in line and "BATCHLAB_METRICS_PORT" in line
