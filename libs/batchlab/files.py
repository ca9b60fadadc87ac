"""Writing a file so that a reader sees the old content or the new, never a torn one.

Results, run records, checkpoint metadata and the stack's record are read by other processes
(and after a crash): each is written to a temporary file in the same folder, flushed to disk,
then renamed over the target (``os.replace`` is atomic within a file system).

  >>> atomic_write("/tmp/run.json", '{"outcome": "SUCCEEDED"}')  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *,
                 temp_prefix: str | None = None) -> None:
    """Replace ``path``'s content with ``data`` in one step (its folder is created).

    Args:
      path: the file to write.
      data: the content (text is written as UTF-8).
      temp_prefix: the temporary file's name prefix (default ``.<name>.``); a store that
        sweeps stale temporary files after a crash names its own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix or f".{path.name}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
