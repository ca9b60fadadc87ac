"""How many runs at once, and how many XLA:CPU threads each: sized to the machine and the model.

A study is many short runs of one small program; on a CPU one run leaves most of the cores
idle, so the local runner runs several at once, each in its own worker process. Two numbers
decide how: P, the runs in flight, and T, each run's XLA:CPU intra-op threads.

T is part of a run's definition, not a tuning knob. XLA:CPU's results depend on the thread
count of the client that compiled and runs the program (measured here on mnist1d_resnet1d, a
Nesterov trial of the withdrawn experiments/cpu_reality_check.yaml, kept as
tests/search/data/cpu_reality_check_2025.yaml; batch 128, 240 steps; jax 0.10.2):

  ======================================================  =====================  ==========
  setting                                                 validation accuracy    params
  ======================================================  =====================  ==========
  2 CPUs (default), two separate processes                0.9292, 0.9292         identical
  1 CPU (affinity {0}, or {1})                            0.956, 0.956           identical
  1 CPU for client creation, then both CPUs for all       0.956                  = 1 CPU
  threads (the mechanism below)
  --xla_cpu_multi_thread_eigen=false, OMP_NUM_THREADS=1,  0.9292                 = 2 CPUs
  --xla_cpu_use_xnnpack=true or false (2 CPUs)
  program compiled by a 2-CPU process, loaded from the    0.9503                 neither
  persistent cache into a 1-CPU process (and the reverse) (0.9477)
  ======================================================  =====================  ==========

Three more trials of that spec, 2 CPUs against 1: Adam at batch 128 0.9749 against 0.9724,
the LARS pipeline at batch 128 0.7157 against 0.693, LAMB at batch 1024 0.3863 both but with
different parameters; so every configuration tried depends on the count.

So the count is fixed when JAX creates its CPU client (its thread pool is sized by the CPUs
the creating thread may run on: jax-ml/jax#1539), the XLA flags above do not change it, runs
with the same count are bit-identical, and the persistent compilation cache must be kept apart
by count (batchlab.train.compilation_cache does). A third-party report (jax-ml/jax#39741, jax
0.11) also finds multi-threaded XLA:CPU programs not bit-reproducible across calls, and
single-threaded ones reproducible.

The rule, so that a run's curve never depends on P or on what runs beside it:

- T per run comes from the model size and the cores only, and is the same whether runs go one
  at a time or several at once: 1 thread for a model under ``SMALL_MODEL_PARAMETERS`` (small
  ops gain less from intra-op threads than from a second run: issue 11 measured one
  mnist1d_resnet1d run at about 18,600 examples/s with 2 threads and 21,900 with 1, and two
  one-thread runs at about 28,000 together), which also makes a small model's results the same
  on machines with any number of cores; every CPU for a larger one (what the in-process runner
  always used).
- P defaults to cores // T, capped by memory (``WORKER_BASE_BYTES`` plus
  ``BYTES_PER_PARAMETER`` per parameter, against 80% of MemAvailable), at least 1. With an
  accelerator backend P is 1 (the runs would share one device).
- A results folder remembers its T (experiment.json ``execution.threads_per_run``): a resumed
  experiment reuses it, so its runs do not mix thread counts.

``--parallel`` and ``--threads-per-run`` override P and T; P never changes results, T does.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "BYTES_PER_PARAMETER",
    "SMALL_MODEL_PARAMETERS",
    "WORKER_BASE_BYTES",
    "ExecutionPlan",
    "accelerator_backend",
    "available_cpus",
    "available_memory_bytes",
    "model_parameters",
    "plan_execution",
    "run_threads",
    "start_jax_with_threads",
]

log = logging.getLogger(__name__)

SMALL_MODEL_PARAMETERS = 5_000_000
"""Models below this many parameters run with one XLA:CPU thread (ResNet-50 has 25.6 M)."""
WORKER_BASE_BYTES = 1 << 30
"""A worker's memory besides the model: Python, JAX, XLA's programs, a small dataset (a
mnist1d_resnet1d run at batch 1024 peaked at 0.5 GiB resident), with margin."""
BYTES_PER_PARAMETER = 64
"""float32 parameters, gradients, two optimizer moments and their temporaries, with margin."""
# Each bytes-per-parameter estimate leaves activations out; large models run one at a time anyway.
_MEMORY_SHARE = 0.8
# A nominal vocabulary for sizing masked-LM models (BERT's WordPiece); the real one comes from
# the corpus, which sizing must not have to build.
_NOMINAL_VOCAB = 30_522


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's core count)."""
    return len(os.sched_getaffinity(0))


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def accelerator_backend() -> str | None:
    """The accelerator JAX would use ("gpu" or "tpu"), without starting JAX; None for CPU only.

    JAX_PLATFORMS naming only cpu rules accelerators out; otherwise an installed CUDA, ROCm or
    TPU plugin counts as one.
    """
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and set(platforms) <= {"cpu"}:
        return None
    plugins = {"jax_cuda12_plugin": "gpu", "jax_cuda13_plugin": "gpu", "jax_rocm60_plugin": "gpu",
               "jax_rocm7_plugin": "gpu", "libtpu": "tpu"}
    for module, kind in plugins.items():
        if importlib.util.find_spec(module) is not None:
            return kind
    return None


def model_parameters(workload_name: str) -> int:
    """The parameter count of a workload's model at its default hyperparameters.

    Computed with ``jax.eval_shape``: nothing is allocated and no JAX backend starts (the
    runner's parent process must not start one before its workers).

    Args:
      workload_name: a registered workload.
    """
    import jax
    import jax.numpy as jnp

    from batchlab import data as bdata
    from batchlab.train.workloads import get_workload

    workload = get_workload(workload_name)
    hparams = workload.hyperparameters({})
    batch = 2 * max(1, hparams.get("virtual_batch_size") or 1)
    if workload.kind == "classification":
        model = workload.model(hparams)
        shape = bdata.dataset_info(workload.dataset).input_shape

        def init() -> Any:
            return model.init(jax.random.key(0), jnp.zeros((batch, *shape)), train=False)["params"]
    else:
        model = workload.model(hparams, vocab_size=_NOMINAL_VOCAB)

        def init() -> Any:
            d = workload.dummy_batch(batch, (), hparams)
            return model.init(jax.random.key(0), d["input_ids"], d["segment_ids"], d["input_mask"],
                              d["masked_lm_positions"], train=False)["params"]

    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(jax.eval_shape(init)))


def run_threads(parameters: int, cpus: int, accelerator: str | None) -> int:
    """T, the XLA:CPU threads of one run of a model (the rule in the module docstring).

    Args:
      parameters: the model's parameter count (:func:`model_parameters`).
      cpus: the CPUs a run may use (the local runner: its affinity; a trainer: the run's
        Resources.cpus).
      accelerator: "gpu"/"tpu", or None for CPU only.
    """
    small = parameters < SMALL_MODEL_PARAMETERS and accelerator is None
    return 1 if small else cpus


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """How the local runner executes an experiment's runs.

    Attributes:
      parallel: runs in flight at once (P).
      threads_per_run: XLA:CPU intra-op threads of each workload's runs (T).
      cpus: the CPUs this process may run on.
      reason: how P and T were chosen, for people.
    """

    parallel: int
    threads_per_run: Mapping[str, int]
    cpus: int
    reason: str

    def threads_for(self, workload: str) -> int:
        """T for a workload's runs."""
        return self.threads_per_run[workload]

    def to_dict(self) -> dict[str, Any]:
        """As stored in experiment.json."""
        return {"parallel": self.parallel, "threads_per_run": dict(self.threads_per_run),
                "cpus": self.cpus, "reason": self.reason}


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    return value


def plan_execution(
    workloads: Iterable[str],
    *,
    parallel: int | None = None,
    threads_per_run: int | None = None,
    stored_threads: Mapping[str, int] | None = None,
    cpus: int | None = None,
    memory_bytes: int | None = None,
    accelerator: str | None = None,
    parameters: Mapping[str, int] | None = None,
) -> ExecutionPlan:
    """Choose P and each workload's T (see the module docstring for the rule).

    Args:
      workloads: the workloads the experiment runs.
      parallel: P, overriding the rule.
      threads_per_run: T for every workload, overriding the rule.
      stored_threads: T a results folder already used, by workload; kept on resume.
      cpus: the CPUs to plan for (default: this process's affinity).
      memory_bytes: memory to plan for (default: MemAvailable).
      accelerator: "gpu"/"tpu", or None for CPU only (default: :func:`accelerator_backend`).
      parameters: parameter counts by workload (default: :func:`model_parameters`).

    Raises:
      ValueError: naming ``parallel`` or ``threads_per_run`` when out of range, or when
        ``threads_per_run`` contradicts the T a folder's runs already used.
    """
    workloads = sorted(set(workloads))
    cpus = available_cpus() if cpus is None else cpus
    if parallel is not None:
        _positive("parallel", parallel)
    if threads_per_run is not None:
        _positive("threads_per_run", threads_per_run)
        if threads_per_run > cpus:
            raise ValueError(f"threads_per_run: at most the {cpus} CPUs this process may run on, "
                             f"got {threads_per_run}")
    stored = dict(stored_threads or {})
    accelerator = accelerator_backend() if accelerator is None else accelerator or None
    counts = dict(parameters or {})
    threads: dict[str, int] = {}
    reasons = []
    for name in workloads:
        if name in stored:
            if threads_per_run is not None and threads_per_run != stored[name]:
                raise ValueError(
                    f"threads_per_run: this folder's {name} runs used {stored[name]} XLA:CPU "
                    f"threads and results depend on it; pass {stored[name]} or use a new folder")
            threads[name] = min(int(stored[name]), cpus)
            if threads[name] != stored[name]:
                log.warning("%s: this folder's runs used %d XLA:CPU threads; only %d CPUs here, so "
                            "the remaining runs use %d and may differ numerically", name,
                            stored[name], cpus, cpus)
            reasons.append(f"{name}: {threads[name]} thread(s), as this folder's earlier runs")
            continue
        if threads_per_run is not None:
            threads[name] = threads_per_run
            reasons.append(f"{name}: {threads_per_run} thread(s) (given)")
            continue
        if name not in counts:
            counts[name] = model_parameters(name)
        threads[name] = run_threads(counts[name], cpus, accelerator)
        reasons.append(f"{name}: {counts[name]:,} parameters -> {threads[name]} thread(s)")
    if parallel is None:
        if accelerator is not None:
            parallel = 1
            reasons.append(f"one run at a time on the {accelerator}")
        else:
            widest = max(threads.values(), default=cpus)
            parallel = max(1, cpus // widest)
            memory = available_memory_bytes() if memory_bytes is None else memory_bytes
            if memory is not None:
                biggest = max((counts.get(w) or model_parameters(w) for w in workloads), default=0)
                per_run = WORKER_BASE_BYTES + BYTES_PER_PARAMETER * biggest
                by_memory = max(1, int(_MEMORY_SHARE * memory // per_run))
                if by_memory < parallel:
                    reasons.append(f"memory allows {by_memory} runs of {per_run / 2**30:.1f} GiB")
                parallel = min(parallel, by_memory)
            reasons.append(f"{parallel} run(s) at once on {cpus} CPU(s)")
    else:
        reasons.append(f"{parallel} run(s) at once (given)")
    return ExecutionPlan(parallel=parallel, threads_per_run=threads, cpus=cpus, reason="; ".join(reasons))


def start_jax_with_threads(threads: int) -> None:
    """Start JAX's backends in this process with ``threads`` XLA:CPU intra-op threads.

    XLA sizes the CPU client's thread pool by the CPUs the creating thread may run on, and
    offers no flag for it (jax-ml/jax#1539; --xla_cpu_multi_thread_eigen and
    intra_op_parallelism_threads change nothing here). So the affinity is narrowed to
    ``threads`` CPUs while the client is created, then every thread of the process (the pool's
    included, which inherited the narrow mask) gets the full mask back: the pool keeps its
    size, and the operating system may still place its threads on any CPU. Must run before
    anything else starts JAX in this process.

    Args:
      threads: intra-op threads, at most the CPUs this process may run on.

    Raises:
      ValueError: ``threads`` out of range.
      RuntimeError: JAX had already started.
    """
    import jax
    from jax._src import xla_bridge

    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= threads <= len(allowed):
        raise ValueError(f"threads: must be in [1, {len(allowed)}], got {threads}")
    if xla_bridge.backends_are_initialized():
        raise RuntimeError("JAX already started in this process; its thread count is fixed")
    os.sched_setaffinity(0, allowed[:threads])
    try:
        jax.devices()
    finally:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), allowed)
            except ProcessLookupError:  # the thread ended meanwhile
                continue
    log.info("JAX started with %d XLA:CPU thread(s) (pid %d)", threads, os.getpid())
