"""The documented maxima the services enforce (experiments/README.md lists them for users).

Each bound sits far above what the paper's experiments need (the largest: batch 65,536,
a few thousand steps per run, a few hundred trials per study, 50 seeds, six searched
hyperparameters) and far below what would exhaust a server or overflow its storage (SQLite
integers are signed 64-bit; a checkpoint step of 2**64 - 1 would otherwise become a trial's
"latest" and retention would delete the real one). A request past a bound gets
INVALID_ARGUMENT naming the field and the bound.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "QUOTE_CHARS",
    "shorten",
    "MAX_ATTEMPTS",
    "MAX_BATCH_SIZE",
    "MAX_CHECKPOINT_BYTES",
    "MAX_CPUS_PER_HOST",
    "MAX_DESCRIPTION_CHARS",
    "MAX_DISCRETE_VALUES",
    "MAX_MEMORY_GIB_PER_HOST",
    "MAX_METRIC_NAME_CHARS",
    "MAX_OPTIMIZERS",
    "MAX_POINTS_PER_REPORT",
    "MAX_POINTS_PER_WORKLOAD",
    "MAX_REQUEST_ID_CHARS",
    "MAX_SEARCH_DIMENSIONS",
    "MAX_SEARCH_REPLICATES",
    "MAX_SEEDS_PER_BEST",
    "MAX_STEPS",
    "MAX_STUDIES",
    "MAX_TRIALS_PER_STUDY",
    "MAX_WORKLOADS",
]

#: Examples per training step (a study's ``batch_size``); the paper's largest is 65,536.
MAX_BATCH_SIZE = 1 << 20
#: Training steps of one run (``step_budget``), and so the step of any metric point or
#: checkpoint a trainer stores.
MAX_STEPS = 10_000_000
#: Tuning trials per study, diverged ones included (``max_total_trials``, and so
#: ``trials_per_study``).
MAX_TRIALS_PER_STUDY = 10_000
#: Reruns of a study's best trial (``seeds_per_best``); the paper uses 50.
MAX_SEEDS_PER_BEST = 1_000
#: Independent repetitions of a study's whole protocol (``search_replicates``).
MAX_SEARCH_REPLICATES = 100
#: Parameters of one optimizer's search space (each tuned one is a Halton dimension).
MAX_SEARCH_DIMENSIONS = 32
#: Values of one discrete search parameter.
MAX_DISCRETE_VALUES = 1_000
#: Attempts per run (``max_attempts``).
MAX_ATTEMPTS = 100
#: Workloads, optimizers and batch points of one spec, and the studies they make.
MAX_WORKLOADS = 32
MAX_OPTIMIZERS = 32
MAX_POINTS_PER_WORKLOAD = 64
MAX_STUDIES = 1_024
#: What one host of a run asks for (``resources.cpus`` and ``resources.memory_gib`` count per
#: host): past the largest single machines sold (a few hundred cores, 24 TiB), so a typo such
#: as 1e300 is refused at submit rather than left pending forever.
MAX_CPUS_PER_HOST = 4_096
MAX_MEMORY_GIB_PER_HOST = 65_536
#: Characters of a spec's or an optimizer's ``description``.
MAX_DESCRIPTION_CHARS = 4_096
#: Characters of a submission's idempotency key (``request_id``).
MAX_REQUEST_ID_CHARS = 128
#: Metric points in one ReportProgress call, and characters of one metric name.
MAX_POINTS_PER_REPORT = 10_000
MAX_METRIC_NAME_CHARS = 128
#: Bytes of one checkpoint (the checkpoint service's default; BATCHLAB_CHECKPOINT_MAX_BYTES
#: changes it). BERT-Large with Adam's two moments is about 4 GiB.
MAX_CHECKPOINT_BYTES = 64 << 30

#: How much of a client's bad value messages and logs quote.
QUOTE_CHARS = 64


def shorten(value: Any, limit: int = QUOTE_CHARS, *, quote: bool = True) -> str:
    """A client's value as messages and logs may quote it: a short, escaped prefix.

    Control characters are escaped (a newline cannot forge a log line) and a long value is cut
    to its first ``limit`` characters followed by its length, so a 1 MB bad name costs a log
    line of the usual size.

    Args:
      value: the value (a string; anything else is converted with ``str``).
      limit: characters of the value kept.
      quote: quote it as ``repr`` does; False escapes without the quotes (field paths).

    Returns:
      E.g. ``'abc'`` or ``'aaaaaaaa'... (1048576 characters)``.

    Example:
      >>> shorten("x" * 100, 4)
      "'xxxx'... (100 characters)"
    """
    text = value if isinstance(value, str) else str(value)
    head = text[:limit]
    shown = repr(head) if quote else repr(head)[1:-1]
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"
