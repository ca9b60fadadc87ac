"""Where a machine's CPU went while a study ran: CPU seconds and run-queue waits by process role.

`CpuUse` samples /proc in a background thread while a ``with`` block runs. For every process
of a known role, by its command line at the last sample (the training process, each service, Ray's own processes, the study's driver)
it records the CPU seconds the process used (/proc/<pid>/stat: user + system, threads that
ended included) and the seconds its threads spent runnable but waiting for a CPU
(/proc/<pid>/task/<tid>/schedstat, second field: summed over the threads seen, each at its
last sample). A thread's wait is what the scheduler made it lose to other threads: on a
machine with fewer cores than runnable threads, the training process's waits are the training
time the rest of the system costs it.

Linux only; elsewhere (no /proc/self/schedstat) it records nothing. A thread that lives less
than the sampling interval may be missed, and one that ends loses its wait since its last
sample: the waits are lower bounds; CPU seconds are exact for processes seen at the end.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CpuUse", "role_of"]

_PROC = Path("/proc")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# (role, substrings of the command line that mark it), first match wins.
_ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("training process", ("ray::TrainerWorker", "multiprocessing.spawn")),
    ("evaluator", ("services.evaluator",)),
    ("controller", ("services.controller",)),
    ("sharding, checkpoints", ("services.sharding", "services.checkpoints")),
    ("Ray's own processes", ("raylet", "gcs_server", "ray::", "ray/dashboard",
                             "ray/_private", "ray/autoscaler")),
    ("local run's driver", ("run_experiment",)),
)
XLA_THREAD = "tf_XLAEigen"  # the name XLA:CPU gives its compute threads


def role_of(cmdline: str) -> str | None:
    """The role of a process by its command line (None: not one this measures)."""
    for role, marks in _ROLES:
        if any(mark in cmdline for mark in marks):
            return role
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # the process or thread ended
        return None


def _cpu_s(pid: int) -> float | None:
    stat = _read(_PROC / str(pid) / "stat")
    if stat is None:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


class CpuUse:
    """Context manager: CPU seconds and run-queue waits by role while its block runs.

    Args:
      interval_s: the sampling interval.
      role: how a process's command line maps to a role (default `role_of`).

    After the block, `result()` gives {role: {"processes", "cpu_s", "wait_s", "xla_cpu_s",
    "xla_wait_s"}}; the xla_ figures are the threads XLA:CPU runs its computations on.
    """

    def __init__(self, interval_s: float = 0.5, role: Callable[[str], str | None] = role_of):
        self.interval_s = interval_s
        self._role = role
        self.available = Path("/proc/self/schedstat").exists()
        self._roles: dict[int, str | None] = {}
        self._start_cpu: dict[int, float] = {}
        self._cpu: dict[int, float] = {}
        # (pid, tid): (name, seconds on a CPU, seconds waiting for one), at the last sample
        self._threads: dict[tuple[int, int], tuple[str, float, float]] = {}
        self._start_threads: dict[tuple[int, int], tuple[float, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CpuUse:
        if self.available:
            self._sample(baseline=True)
            self._thread = threading.Thread(target=self._loop, name="cpu-use", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self, baseline: bool = False) -> None:
        for entry in os.listdir(_PROC):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid == os.getpid():
                continue
            # Read every time: a Ray worker starts as ray::IDLE and becomes a trainer.
            cmdline = _read(_PROC / entry / "cmdline")
            if cmdline:  # empty for a process that ended (a zombie): keep what it was
                self._roles[pid] = self._role(cmdline.replace("\0", " "))
            if self._roles.get(pid) is None:
                continue
            cpu = _cpu_s(pid)
            if cpu is None:
                continue
            if baseline:
                self._start_cpu[pid] = cpu
            self._cpu[pid] = cpu
            try:
                tids = os.listdir(_PROC / entry / "task")
            except OSError:
                continue
            for tid in tids:
                task = _PROC / entry / "task" / tid
                key = (pid, int(tid))
                schedstat = _read(task / "schedstat")
                if schedstat is None:
                    continue
                fields = schedstat.split()
                run, wait = int(fields[0]) / 1e9, int(fields[1]) / 1e9
                name = (self._threads[key][0] if key in self._threads
                        else (_read(task / "comm") or "").strip())
                if baseline:
                    self._start_threads[key] = (run, wait)
                self._threads[key] = (name, run, wait)

    def result(self) -> dict[str, dict[str, float]]:
        """{role: figures} over the block (see the class docstring); empty if unavailable."""
        out: dict[str, dict[str, float]] = {}

        def figures(role: str) -> dict[str, float]:
            return out.setdefault(role, {"processes": 0, "cpu_s": 0.0, "wait_s": 0.0,
                                         "xla_cpu_s": 0.0, "xla_wait_s": 0.0})

        for pid, cpu in self._cpu.items():
            role = self._roles.get(pid)
            if role is None:
                continue
            f = figures(role)
            f["processes"] += 1
            f["cpu_s"] += cpu - self._start_cpu.get(pid, 0.0)
        for key, (name, run, wait) in self._threads.items():
            role = self._roles.get(key[0])
            if role is None:
                continue
            f = figures(role)
            run0, wait0 = self._start_threads.get(key, (0.0, 0.0))
            f["wait_s"] += wait - wait0
            if name == XLA_THREAD:
                f["xla_cpu_s"] += run - run0
                f["xla_wait_s"] += wait - wait0
        return {role: {k: round(v, 2) for k, v in f.items()} for role, f in out.items()}
