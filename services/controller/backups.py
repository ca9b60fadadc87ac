"""The controller database's integrity check at start and its scheduled online backups.

A truncated or damaged SQLite file used to end the controller with a raw traceback, or worse,
be used without warning. :func:`check_database` runs SQLite's ``PRAGMA integrity_check``
before the controller opens its storage and raises :class:`DatabaseDamaged`, whose one-line
message names the file, what is wrong and the way out (restore the newest backup, or move
the file away to start empty). :class:`BackupScheduler` copies the live database with
SQLite's online backup API (consistent while the controller keeps writing) into
``<state dir>/backups/`` at start and then every interval, keeping the newest few.

Example:
  >>> check_database("state/controller.sqlite3")  # doctest: +SKIP
  >>> backups = BackupScheduler("state/controller.sqlite3", interval_s=3600)  # doctest: +SKIP
  >>> backups.start()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BackupScheduler", "DatabaseDamaged", "backup_database", "check_database",
           "latest_backup"]

log = logging.getLogger(__name__)

BACKUP_DIR = "backups"
_PREFIX = "controller-"
_SUFFIX = ".sqlite3"


class DatabaseDamaged(RuntimeError):
    """The controller's database failed its integrity check; the message says what to do."""


def backup_dir(database: str | os.PathLike[str]) -> Path:
    """Where the backups of ``database`` go: a ``backups`` folder next to it."""
    return Path(database).parent / BACKUP_DIR


def latest_backup(database: str | os.PathLike[str]) -> Path | None:
    """The newest backup of ``database``, or None."""
    folder = backup_dir(database)
    found = sorted(folder.glob(f"{_PREFIX}*{_SUFFIX}")) if folder.is_dir() else []
    return found[-1] if found else None


def _way_out(path: Path) -> str:
    newest = latest_backup(path)
    if newest is None:
        return (f"no backup exists yet (they go to {backup_dir(path)}), so stop the controller "
                f"and move {path} away to start with an empty database")
    return (f"stop the controller and restore the newest backup (cp {newest} {path}, then "
            f"delete {path}-wal and {path}-shm), or move {path} away to start with an empty "
            "database")


# The heading SQLite puts before a database's problems; not a problem itself.
_HEADING = "*** in database "


def _problem_lines(rows: list[tuple[Any, ...]]) -> list[str]:
    """integrity_check's problems, one per line: one row may hold many, newline-separated."""
    lines = (line.strip() for row in rows if row and row[0] != "ok"
             for line in str(row[0]).splitlines())
    return [line for line in lines if line and not line.startswith(_HEADING)]


def check_database(path: str | os.PathLike[str]) -> None:
    """Runs SQLite's integrity check on an existing database file (a missing one passes).

    Args:
      path: the database file.

    Raises:
      DatabaseDamaged: naming the file, the first problem SQLite reports and the way out.
    """
    path = Path(path)
    if not path.exists():
        return
    try:
        # Read-only: a damaged file must not be "repaired" by a journal replay here.
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as error:
        reason = " ".join(str(error).split())
        raise DatabaseDamaged(f"the controller database {path} cannot be read ({reason}); "
                              f"{_way_out(path)}") from None
    if any(row and row[0] != "ok" for row in rows):
        problems = _problem_lines(rows) or ["no detail given"]
        more = (f" and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''}"
                if len(problems) > 1 else "")
        raise DatabaseDamaged(f"the controller database {path} is damaged (integrity_check: "
                              f"{problems[0]}{more}); {_way_out(path)}")


def backup_database(path: str | os.PathLike[str], *, keep: int = 5,
                    clock: Callable[[], float] = time.time) -> Path:
    """Copies a live database into its backup folder (online: writers may go on).

    The copy is written under a temporary name and renamed once complete, so a backup file
    is always whole; then only the ``keep`` newest backups are kept.

    Args:
      path: the database file.
      keep: backups to keep (>= 1).
      clock: unix seconds (names the backup).

    Returns:
      The backup file.
    """
    path = Path(path)
    folder = backup_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(clock()))
    target = folder / f"{_PREFIX}{stamp}{_SUFFIX}"
    partial = folder / f".partial-{os.getpid()}-{stamp}{_SUFFIX}"
    source = sqlite3.connect(path)
    try:
        dest = sqlite3.connect(partial)
        try:
            source.backup(dest)
        finally:
            dest.close()
    finally:
        source.close()
    os.replace(partial, target)
    for old in sorted(folder.glob(f"{_PREFIX}*{_SUFFIX}"))[:-max(keep, 1)]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return target


class BackupScheduler:
    """Backs the database up at start and then every ``interval_s`` seconds, in a thread.

    A failed backup is logged and retried at the next interval; it never stops the controller.

    Args:
      path: the database file.
      interval_s: seconds between backups (> 0).
      keep: backups to keep.
    """

    def __init__(self, path: str | os.PathLike[str], *, interval_s: float, keep: int = 5):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0; got {interval_s}")
        self.path = Path(path)
        self.interval_s = interval_s
        self.keep = keep
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def backup_now(self) -> Path | None:
        """One backup; None (logged) when it failed."""
        try:
            target = backup_database(self.path, keep=self.keep)
        except (sqlite3.Error, OSError) as error:
            log.error("backup of %s failed: %s (retried in %.0f s)", self.path, error,
                      self.interval_s)
            return None
        log.info("backed up %s to %s", self.path, target)
        return target

    def _run(self) -> None:
        while True:
            self.backup_now()
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> None:
        """Starts backing up (the first backup right away)."""
        self._thread = threading.Thread(target=self._run, name="db-backups", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread (a backup in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
