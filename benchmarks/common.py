"""Timing and reporting helpers shared by the benchmarks."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np

__all__ = ["Measurement", "interleaved", "machine_description", "versions"]


@dataclass
class Measurement:
    """Per-iteration times (seconds) of one contender, pooled over interleaved rounds."""

    name: str
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(np.median(self.times))

    @property
    def q25(self) -> float:
        return float(np.percentile(self.times, 25))

    @property
    def q75(self) -> float:
        return float(np.percentile(self.times, 75))


def interleaved(
    contenders: dict[str, Callable[[], object]],
    *,
    rounds: int = 5,
    iters: int = 5,
    sync: Callable[[object], object] = lambda x: x,
) -> dict[str, Measurement]:
    """Time every contender in alternating rounds, so drift on a shared machine hits all alike.

    Args:
      contenders: name -> a zero-argument function doing one iteration (already warmed up).
      rounds: how many times to cycle through the contenders.
      iters: iterations per contender per round.
      sync: called on an iteration's result to wait for it (e.g. jax.block_until_ready).

    Returns:
      name -> Measurement with rounds*iters per-iteration times.
    """
    out = {name: Measurement(name) for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            for _ in range(iters):
                start = time.perf_counter()
                sync(fn())
                out[name].times.append(time.perf_counter() - start)
    return out


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of the named distributions."""
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine_description() -> dict[str, str]:
    """The machine the numbers come from: CPU model, cores, memory, accelerator."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = ""
    try:
        mem_gib = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError):
        pass
    import jax

    devices = jax.devices()
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem_gib,
        "jax backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "python": platform.python_version(),
    }
