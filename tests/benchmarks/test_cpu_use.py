"""benchmarks.cpu_use against processes whose CPU use and waits are known by construction."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from benchmarks.cpu_use import CpuUse, role_of

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/self/schedstat"),
    reason="Linux only (the benchmark records nothing elsewhere)")

# Spins until it has used argv[1] s of CPU, pinned to CPU argv[2], says so on stdout, then
# sleeps argv[3] s; argv[4] is a token that tells this test's processes from any other.
_SPIN = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[2])})
while time.process_time() < float(sys.argv[1]):
    pass
print("spun", flush=True)
time.sleep(float(sys.argv[3]))
"""


def _spinner(seconds: float, cpu: int, sleep: float, token: str) -> list[str]:
    return [sys.executable, "-c", _SPIN, str(seconds), str(cpu), str(sleep), token]


def _role(token: str):
    return lambda cmdline: "spinners" if token in cmdline else None


def test_three_processes_sharing_one_cpu_use_their_cpu_and_wait_for_each_other():
    cpu, token = min(os.sched_getaffinity(0)), uuid.uuid4().hex
    with CpuUse(interval_s=0.1, role=_role(token)) as use:
        procs = [subprocess.Popen(_spinner(0.4, cpu, 0.3, token), stdout=subprocess.DEVNULL)
                 for _ in range(3)]
        for proc in procs:
            assert proc.wait() == 0
    spinners = use.result()["spinners"]
    assert spinners["processes"] == 3
    # 1.2 s of CPU, their start included (all seen: they sleep before ending) ...
    assert 1.0 <= spinners["cpu_s"] < 2.0
    # ... on one CPU: while one spins the other two wait, about 2 x 1.2 s in all. Their
    # time on the CPU (schedstat's first field) would be about 1.2 s.
    assert spinners["wait_s"] > 1.6
    assert spinners["xla_cpu_s"] == 0.0
    assert use.own_cpu_s > 0.0


def test_what_a_process_used_before_the_block_is_not_counted():
    cpu, token = min(os.sched_getaffinity(0)), uuid.uuid4().hex
    proc = subprocess.Popen(_spinner(0.6, cpu, 3.0, token), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "spun\n"  # now it sleeps
        with CpuUse(interval_s=0.1, role=_role(token)) as use:
            time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
    # Started before the block by this process: measured from the block's start only.
    assert use.result()["spinners"]["cpu_s"] < 0.1


def test_processes_this_one_did_not_start_are_not_counted():
    cpu, token = min(os.sched_getaffinity(0)), uuid.uuid4().hex
    # An orphan: its parent (the shell) exits at once, so it belongs to no process here.
    script = " ".join(f"'{arg}'" for arg in _spinner(0.8, cpu, 0.5, token))
    subprocess.run(["sh", "-c", f"{script} >/dev/null 2>&1 &"], check=True)
    time.sleep(0.3)
    with CpuUse(interval_s=0.1, role=_role(token)) as use:
        with CpuUse(interval_s=0.1, role=_role(token)) as inner:
            mine = subprocess.Popen(_spinner(0.2, cpu, 0.2, token), stdout=subprocess.DEVNULL)
            mine.wait()
        time.sleep(1.0)
    assert inner.result()["spinners"]["processes"] == 1  # its own, not the orphan
    assert use.result()["spinners"]["processes"] == 1


# Spins 0.6 s of CPU with no role, says so, and on reading the token from stdin becomes (exec)
# a process with the token in its command line: same pid, same start time.
_BECOME = """
import os, sys, time
while time.process_time() < 0.6:
    pass
print("spun", flush=True)
token = sys.stdin.readline().strip()
os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(1)", token])
"""


def test_a_process_that_takes_a_role_during_the_block_is_measured_from_the_block():
    token = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-c", _BECOME],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "spun\n"
        with CpuUse(interval_s=0.1, role=_role(token)) as use:
            assert proc.stdin is not None
            proc.stdin.write(token + "\n")
            proc.stdin.flush()
            time.sleep(0.6)
    finally:
        proc.kill()
        proc.wait()
    # Its 0.6 s of spinning came before the block, without the role; the block saw only
    # the new interpreter's start.
    spinners = use.result()["spinners"]
    assert spinners["processes"] == 1
    assert spinners["cpu_s"] < 0.4


def _fake_proc(root, pid: int, ppid: int, cmdline: str, cpu_ticks: int) -> None:
    folder = root / str(pid)
    (folder / "task" / str(pid)).mkdir(parents=True)
    # pid (comm) state ppid ... utime(14) stime(15) ... starttime(22)
    fields = ["S", str(ppid)] + ["0"] * 9 + [str(cpu_ticks), "0"] + ["0"] * 6 + ["7"]
    stat = f"{pid} (x) " + " ".join(fields)
    (folder / "stat").write_text(stat)
    (folder / "cmdline").write_bytes(cmdline.encode() + b"\0")
    task = folder / "task" / str(pid)
    (task / "stat").write_text(stat)
    (task / "schedstat").write_text("1000000000 500000000 10")
    (task / "comm").write_text("python\n")


def test_a_child_with_a_lower_pid_than_its_parent_is_measured(tmp_path, monkeypatch):
    # After the pids wrap around (pid_max), a child's pid can be lower than its parent's:
    # the raylet here is started by the controller but listed before it.
    import benchmarks.cpu_use as cpu_use

    proc = tmp_path / "proc"
    _fake_proc(proc, 32000, os.getpid(), "python -m services.controller.server", 100)
    _fake_proc(proc, 300, 32000, "/x/ray/raylet --raylet_socket_name=y", 200)
    _fake_proc(proc, 400, 1, "/x/ray/raylet --not-ours", 300)  # another program's
    monkeypatch.setattr(cpu_use, "_PROC", proc)
    use = cpu_use.CpuUse()
    use.available = True
    use._sample()
    result = use.result()
    assert result["controller"]["processes"] == 1
    assert result["Ray's own processes"]["processes"] == 1
    assert result["Ray's own processes"]["wait_s"] == 0.5


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


def test_a_command_line_that_is_not_utf8_is_read():
    token = uuid.uuid4().hex
    # Anywhere among this process's children: a program's arguments are bytes.
    proc = subprocess.Popen([sys.executable.encode(), b"-c", b"import time; time.sleep(2)",
                             b"caf\xe9-" + token.encode()])
    try:
        with CpuUse(interval_s=0.1, role=_role(token)) as use:
            time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()
    assert use.result()["spinners"]["processes"] == 1


def test_a_sample_that_fails_is_skipped_and_said_at_the_end(caplog):
    token = uuid.uuid4().hex
    calls = {"n": 0}

    def role(cmdline: str) -> str | None:
        if token in cmdline:
            calls["n"] += 1
            if calls["n"] == 2:  # the second sample that sees the process
                raise RuntimeError("a role function's bug")
            return "spinners"
        return None

    with caplog.at_level("WARNING", logger="benchmarks.cpu_use"):
        with CpuUse(interval_s=0.1, role=role) as use:
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.6)", token])
            assert proc.wait() == 0
    assert use.failed_samples == 1
    assert use.result()["spinners"]["processes"] == 1
    assert "1 of the CPU samples failed" in caplog.text
