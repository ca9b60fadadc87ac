"""Where each host of each trial stood in its data at each checkpoint.

A trainer process records its shard's position (epoch and position within the epoch) when it
saves a checkpoint; a resumed or re-placed attempt asks for the positions recorded with the
checkpoint it restored, so every host continues with exactly the example it would have read
next. Rows are tiny (one per host per checkpoint) and kept until the trial's positions are
deleted, so a resume from an older checkpoint (the newest was corrupt) finds its positions too.

`PositionStore` keeps them in one SQLite file (WAL mode, one connection per thread): they must
outlive the sharding process, since trainers resume after any of the services restarts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batchlab.sqlite import ThreadConnections

__all__ = ["PositionStore"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS positions (
  trial TEXT NOT NULL,
  step INTEGER NOT NULL,
  shard_index INTEGER NOT NULL,
  host TEXT NOT NULL,
  PRIMARY KEY (trial, step, shard_index)
);
"""


class PositionStore:
    """Hosts' data positions by (trial, checkpoint step, shard index), in SQLite.

    Args:
      directory: the folder of the database (created); the file is positions.sqlite3.
    """

    FILENAME = "positions.sqlite3"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / self.FILENAME
        self._db = ThreadConnections(self.path)
        self._db.get().executescript(_SCHEMA)
        log.info("shard positions at %s", self.path)

    def record(self, trial: str, step: int, hosts: Sequence[Mapping[str, Any]]) -> int:
        """Store (replace) hosts' positions at a checkpoint step.

        Args:
          trial: the trial resource name.
          step: the checkpoint step.
          hosts: HostShard messages as JSON data (each with "shard_index").

        Returns:
          How many were stored.
        """
        with self._db.write() as conn:
            for host in hosts:
                conn.execute(
                    "INSERT INTO positions (trial, step, shard_index, host) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (trial, step, shard_index) DO UPDATE SET host = excluded.host",
                    (trial, int(step), int(host.get("shard_index", 0)),
                     json.dumps(dict(host), sort_keys=True)))
        return len(hosts)

    def at(self, trial: str, step: int) -> dict[int, dict[str, Any]]:
        """The positions recorded at a step, by shard index (empty when none were)."""
        rows = self._db.get().execute(
            "SELECT shard_index, host FROM positions WHERE trial = ? AND step = ? "
            "ORDER BY shard_index", (trial, int(step))).fetchall()
        return {int(index): json.loads(host) for index, host in rows}

    def delete(self, trial: str) -> int:
        """Forget every position of a trial; returns how many rows went."""
        with self._db.write() as conn:
            return conn.execute("DELETE FROM positions WHERE trial = ?", (trial,)).rowcount

    def close(self) -> None:
        """Close every thread's connection."""
        self._db.close()
