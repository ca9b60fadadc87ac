"""Where a machine's CPU went while a study ran: CPU seconds and run-queue waits by process role.

`CpuUse` samples /proc in a background thread while a ``with`` block runs. It measures the
children of this process and their descendants (the stack's services, Ray's processes, local
run's workers), never other processes on the machine; a process whose parent ended before it
was first seen (a daemon's double fork) is missed. For each one of
a known role, by its command line at its last sample (the training process, each service,
Ray's own processes, the study's driver), it records the CPU seconds the process used
(/proc/<pid>/stat: user + system, its ended threads included) and the seconds its threads
spent runnable but waiting for a CPU (/proc/<pid>/task/<tid>/schedstat, second field, summed
over the threads seen, each at its last sample). A thread's wait says that it lost time to
other threads, not to which: the scheduler does not record who ran instead.

Linux only; elsewhere (no /proc/self/schedstat) it records nothing. Both figures are read at
each sample, so both are lower bounds: a process or thread that ends loses what it used or
waited since its last sample, and one that lives less than the interval may not be seen.
Processes and threads are told apart by their start times as well as their ids, so a reused
process id starts from zero.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CpuUse", "role_of"]

log = logging.getLogger(__name__)

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
        # Command lines are bytes, not always UTF-8 (any program's arguments).
        return path.read_bytes().decode(errors="replace")
    except OSError:  # the process or thread ended
        return None


def _stat(path: Path) -> tuple[int, int, float] | None:
    """(parent pid, start time in ticks, CPU seconds) from a /proc stat file."""
    text = _read(path)
    if not text:
        return None
    try:
        fields = text[text.rfind(")") + 2:].split()
        return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / _TICK
    except (IndexError, ValueError):  # not a stat line this parses: skip the process
        return None


class CpuUse:
    """Context manager: CPU seconds and run-queue waits by role while its block runs.

    Args:
      interval_s: the sampling interval.
      role: how a process's command line maps to a role (default `role_of`).

    After the block, `result()` gives {role: {"processes", "cpu_s", "wait_s", "xla_cpu_s",
    "xla_wait_s"}}; the xla_ figures are those of the threads named as XLA:CPU names its
    computation threads. `own_cpu_s` is the CPU the sampling itself used (not in the result).
    """

    def __init__(self, interval_s: float = 0.5, role: Callable[[str], str | None] = role_of):
        self.interval_s = interval_s
        self._role = role
        self.available = Path("/proc/self/schedstat").exists()
        self.own_cpu_s = 0.0
        self.failed_samples = 0  # samples that raised (e.g. in a role function): skipped
        self._me = os.getpid()
        # A process is (pid, start ticks); a thread is (process, tid, start ticks).
        self._mine: set[tuple[int, int]] = set()  # this process's descendants
        self._roles: dict[tuple[int, int], str | None] = {}
        self._cpu: dict[tuple[int, int], float] = {}
        self._start_cpu: dict[tuple[int, int], float] = {}
        # thread: (name, seconds on a CPU, seconds waiting for one), at its last sample
        self._threads: dict[tuple[tuple[int, int], int, int], tuple[str, float, float]] = {}
        self._start_threads: dict[tuple[tuple[int, int], int, int], tuple[float, float]] = {}
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
            if self.failed_samples:
                log.warning("%d of the CPU samples failed and were skipped: the figures miss "
                            "what those samples would have added", self.failed_samples)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a sample lost, not the measurement
                self.failed_samples += 1
                log.debug("a CPU sample failed", exc_info=True)

    def _sample(self, baseline: bool = False) -> None:
        started = time.thread_time()
        try:
            pids = [int(entry) for entry in os.listdir(_PROC) if entry.isdigit()]
        except OSError:
            return
        stats: dict[int, tuple[int, int, float]] = {}
        for pid in pids:
            stat = _stat(_PROC / str(pid) / "stat")
            if stat is not None:
                stats[pid] = stat
        if baseline:
            for pid, (_, start, cpu) in stats.items():
                # Every process, whatever it is now: one that becomes ours or takes a role
                # later is measured from here, not from its start.
                self._start_cpu[(pid, start)] = cpu
                self._read_threads((pid, start), baseline=True)
            self.own_cpu_s += time.thread_time() - started
            return
        # Ours: this process's children, their children, and so on; to a fixed point, since
        # after the pids wrap around a child can have a lower pid than its parent.
        grown = True
        while grown:
            grown = False
            for pid, (ppid, start, _) in stats.items():
                if (pid, start) in self._mine:
                    continue
                parent = stats.get(ppid)
                if ppid == self._me or (parent is not None and (ppid, parent[1]) in self._mine):
                    self._mine.add((pid, start))
                    grown = True
        for pid, (_, start, cpu) in stats.items():
            proc = (pid, start)
            if proc not in self._mine:
                continue
            cmdline = _read(_PROC / str(pid) / "cmdline")
            if cmdline:  # empty for a process that ended (a zombie): keep what it was
                self._roles[proc] = self._role(cmdline.replace("\0", " "))
            if self._roles.get(proc) is None:
                continue
            self._cpu[proc] = cpu
            self._read_threads(proc)
        self.own_cpu_s += time.thread_time() - started

    def _read_threads(self, proc: tuple[int, int], baseline: bool = False) -> None:
        task_dir = _PROC / str(proc[0]) / "task"
        try:
            tids = os.listdir(task_dir)
        except OSError:
            return
        for tid in tids:
            task = task_dir / tid
            schedstat, stat = _read(task / "schedstat"), _stat(task / "stat")
            if not schedstat or stat is None:
                continue
            try:
                run, wait = (int(x) / 1e9 for x in schedstat.split()[:2])
            except ValueError:
                continue
            key = (proc, int(tid), stat[1])
            if baseline:
                self._start_threads[key] = (run, wait)
            else:
                # The name is read every time: a thread may name itself after it starts.
                self._threads[key] = ((_read(task / "comm") or "").strip(), run, wait)

    def result(self) -> dict[str, dict[str, float]]:
        """{role: figures} over the block (see the class docstring); empty if unavailable."""
        out: dict[str, dict[str, float]] = {}

        def figures(role: str) -> dict[str, float]:
            return out.setdefault(role, {"processes": 0, "cpu_s": 0.0, "wait_s": 0.0,
                                         "xla_cpu_s": 0.0, "xla_wait_s": 0.0})

        for proc, cpu in self._cpu.items():
            role = self._roles.get(proc)
            if role is None:
                continue
            f = figures(role)
            f["processes"] += 1
            f["cpu_s"] += cpu - self._start_cpu.get(proc, 0.0)
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
