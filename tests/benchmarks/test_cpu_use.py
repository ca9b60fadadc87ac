"""benchmarks.cpu_use against processes whose CPU use and waits are known by construction."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.cpu_use import CpuUse, role_of

# Spins until it has used `seconds` of CPU, pinned to the first CPU this process may use.
_SPIN = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[2])})
while time.process_time() < float(sys.argv[1]):
    pass
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.exists(
    "/proc/self/schedstat"), reason="Linux only (the benchmark records nothing elsewhere)")
def test_three_processes_sharing_one_cpu_use_their_cpu_and_wait_for_each_other():
    cpu = min(os.sched_getaffinity(0))
    with CpuUse(interval_s=0.1, role=lambda c: "spinners" if "sched_setaffinity" in c
                else None) as use:
        procs = [subprocess.Popen([sys.executable, "-c", _SPIN, "0.4", str(cpu)])
                 for _ in range(3)]
        for proc in procs:
            assert proc.wait() == 0
    spinners = use.result()["spinners"]
    assert spinners["processes"] == 3
    # 1.2 s of spinning (plus the interpreters' start; less what each used after its last
    # sample, up to 0.1 s: they end before the block does) ...
    assert 0.9 <= spinners["cpu_s"] < 2.5
    # ... on one CPU: while one spins the other two wait, about 2 x 1.2 s in all (a lower
    # bound: waits after a process's last sample are not seen).
    assert spinners["wait_s"] > 0.8
    assert spinners["xla_cpu_s"] == 0.0


def test_processes_are_told_apart_by_their_command_lines():
    assert role_of("ray::TrainerWorker.run") == "training process"
    assert role_of("python -B -c from multiprocessing.spawn import spawn_main; "
                   "spawn_main(tracker_fd=5)") == "training process"
    assert role_of("python -B -c from multiprocessing.resource_tracker import main") is None
    assert role_of("python -m services.evaluator.server") == "evaluator"
    assert role_of("python -m services.controller.server") == "controller"
    assert role_of("python -m services.checkpoints.server") == "sharding, checkpoints"
    assert role_of("ray::IDLE") == "Ray's own processes"
    assert role_of(".../ray/core/src/ray/raylet/raylet --raylet_socket_name=x") == (
        "Ray's own processes")
    assert role_of("python -c import json ... run_experiment(spec)") == "local run's driver"
    assert role_of("bash") is None
