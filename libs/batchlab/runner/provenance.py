"""Which code produced a set of results: the git commit, whether it had local changes, the version.

Results and the reports built from them record this, so a number in docs/results can be traced
to the code that made it, and a report regenerated at another commit says so.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["code_version"]

log = logging.getLogger(__name__)

COMMIT_ENV = "BATCHLAB_COMMIT"  # set in container images, which carry no .git


@functools.cache
def code_version() -> dict[str, Any]:
    """{"commit": sha or "unknown", "dirty": bool, "version": the distribution's version}.

    The commit comes from BATCHLAB_COMMIT when set, else from git in the checkout this package
    was imported from (an editable install); "dirty" means tracked files differ from the
    commit (untracked files are ignored: result folders and caches live beside the code).
    """
    try:
        version = importlib.metadata.version("batchlab")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if os.environ.get(COMMIT_ENV):
        return {"commit": os.environ[COMMIT_ENV], "dirty": False, "version": version}
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"], check=True, capture_output=True,
                                text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as error:
        log.info("no git checkout at %s (%s): commit unknown", root, error)
        return {"commit": "unknown", "dirty": False, "version": version}
    return {"commit": commit, "dirty": bool(status.strip()), "version": version}
