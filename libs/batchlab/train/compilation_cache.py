"""JAX's persistent compilation cache, shared by every run of a process and across processes.

A study compiles the same evaluation and initialisation programs for every trial of a
workload, and the same train step for every seed rerun; caching them on disk turns those
recompilations (2-10 s each on a CPU) into loads.

Entries are kept apart by the XLA:CPU client's thread count (a ``xla_cpu_threads_<N>``
subfolder): a program compiled by a client with N intra-op threads computes different
floating-point results than the same program compiled for another count, and JAX's cache key
does not include the count. Measured on mnist1d_resnet1d (batch 128, 240 steps): compiled and
run with 2 threads, validation accuracy 0.9292; with 1 thread, 0.956; compiled with 2 and
loaded into a 1-thread process, 0.9503 (see batchlab.runner.resources). A shared folder would
make a run's results depend on which process compiled its programs first.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

__all__ = ["enable_compilation_cache"]

log = logging.getLogger(__name__)


def enable_compilation_cache(
    path: str | os.PathLike[str] | None = None, *, cpu_threads: int | None = None
) -> Path | None:
    """Point JAX's persistent compilation cache at ``path`` (default under BATCHLAB_DATA_DIR).

    Without ``path``, a cache folder the process already configured is kept. ``BATCHLAB_JAX_CACHE=0``
    turns it off. Entries go to ``<path>/xla_cpu_threads_<N>`` (see the module docstring).

    Args:
      path: the cache root.
      cpu_threads: the intra-op threads of this process's XLA:CPU client (default: the CPUs
        this process may run on, which is what XLA sizes the client's thread pool by). Call
        this before the first computation, with the affinity the client is created under.

    Returns:
      The folder used, or None when off.
    """
    if os.environ.get("BATCHLAB_JAX_CACHE", "1") == "0":
        return None
    # jax.config's options are dynamic attributes (pytype's _HAS_DYNAMIC_ATTRIBUTES): mypy
    # sees none of them.
    configured = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    if path is None and configured:
        return Path(configured)
    if path is None:
        root = os.environ.get("BATCHLAB_DATA_DIR", "").strip()
        path = Path(root) / "jax_cache" if root else Path.home() / ".cache" / "batchlab" / "jax_cache"
    if cpu_threads is None:
        cpu_threads = len(os.sched_getaffinity(0))
    if cpu_threads < 1:
        raise ValueError(f"cpu_threads: must be >= 1, got {cpu_threads}")
    folder = Path(path) / f"xla_cpu_threads_{cpu_threads}"
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Every program, however fast it compiles: a study's evaluation step compiles in about
    # 0.25 s on a CPU, under JAX's default threshold of 1 s, and each run would compile it again.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.info("JAX compilation cache in %s", folder)
    return folder
