"""JAX's persistent compilation cache, shared by every run of a process and across processes.

A study compiles the same evaluation and initialisation programs for every trial of a
workload, and the same train step for every seed rerun; caching them on disk turns those
recompilations (2-10 s each on a CPU) into loads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

__all__ = ["enable_compilation_cache"]

log = logging.getLogger(__name__)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at ``path`` (default under BATCHLAB_DATA_DIR).

    Without ``path``, a cache folder the process already configured is kept. ``BATCHLAB_JAX_CACHE=0``
    turns it off. Returns the folder used, or None when off.
    """
    if os.environ.get("BATCHLAB_JAX_CACHE", "1") == "0":
        return None
    if path is None and jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    if path is None:
        root = os.environ.get("BATCHLAB_DATA_DIR", "").strip()
        path = Path(root) / "jax_cache" if root else Path.home() / ".cache" / "batchlab" / "jax_cache"
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.info("JAX compilation cache in %s", folder)
    return folder
