"""The cost of the system itself: one small study through the services vs. `batchlab local run`.

Both run the same spec (4 runs: 3 tuning trials and 1 seed rerun, one at a time: one trainer
actor), with the dataset already built. The services path is the real one: the sharding
service hands out every example index (GetShard), the trainer saves a checkpoint at each
evaluation point and trains on, and the evaluation service evaluates the points concurrently;
`local run` trains and evaluates in one process, one after the other.

Two figures, each comparing like with like:

- cold: everything from nothing, start-up included on both sides, empty JAX compilation
  caches. Local: from starting `python` to the end of `run_experiment` (interpreter, imports,
  compilation). Services: from `batchlab up` (every server, Ray, the trainer, the evaluator)
  to SUCCEEDED.
- warm: what a long-running system pays. Local: a second `run_experiment` of the same spec in
  the process that ran the first (imports done, compilation cache filled). Services: a second
  experiment of the same spec submitted to the stack that ran the first (trainers and
  evaluator warm), submit -> SUCCEEDED.

The stack's start-up is paid once per stack, so the cold figure depends on the study's size:
each round also runs a study four times as large (16 runs: 12 tuning trials and 4 seed
reruns) cold on both sides, each from its own empty caches and a stack of its own. These
runs are tiny (150 steps of a 1,700-parameter model, about 0.2 s of training each), so they
show the system's fixed and per-run costs at their largest share.

Each round also runs one study of the work the system exists for, cold on both sides: one
search replicate of the CPU reproduction's batch-128 studies (experiments/reproduction/
momentum.yaml: Nesterov and LARS, 16 tuning trials and 7 seed reruns each, 46 runs of the
1-D ResNet, 240 steps, about 1.8 s each), the study benchmarks/parallel_trials.py times.
After the timed rounds, that study runs once more on each side, untimed, while
benchmarks.cpu_use records where the machine's CPU went, by process (the training process,
each service, Ray's own processes): CPU seconds and the seconds their threads waited for a
CPU. The sampling runs in the benchmark's own process, on the same cores, so it weighs on no
timed figure.

Whether a ratio meets the target (<= 1.10) is decided by an interval, not by a median: each
round's two sides run back to back, so a round's ratio is a paired measurement, and the
rounds' spread on a shared machine (a few percent) is of the order of the margin. The section
shows, per study, the geometric mean of the rounds' ratios with its 95% t-interval (on the
logs): met when all of it is at or under the target, NO when all of it is over, not decided
otherwise. Each result records a fingerprint of the system code it ran (system_code: the
tracked files under services/, libs/, protos/ and requirements/ and pyproject.toml, taken
before the rounds and checked after them); `python -m benchmarks.system pool` pools the reproduction study's
stored runs of one code (benchmarks/results' system_reproduction_runs), each run counting
once: rounds of one run share that hour's machine, so runs, not rounds, are the independent
replicates. How many runs to pool is to be fixed before their results are seen.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from batchlab.rpc.client import free_ports
from benchmarks.cpu_use import XLA_THREAD, CpuUse

__all__ = ["run", "to_markdown"]

TARGET = 1.10

# The confidence of the intervals a cold ratio is decided by.
LEVEL = 0.95

REPO = Path(__file__).resolve().parents[1]

# What a run measured: the code the services path and local run execute, the package's
# definition (pyproject.toml: entry points, pins) and the lock files of its dependencies. Not
# in it: what is installed (a .venv made from other locks), the generated protobuf code (made
# from protos/ by the locked grpcio-tools), untracked files, the benchmark's own code and the
# study's spec.
SYSTEM_CODE = ("services", "libs", "protos", "requirements", "pyproject.toml")

# The CPU sampling interval of the untimed CPU round. Each sample reads three /proc files per
# thread of every process measured, and the stack has far more threads than local run (Ray's
# processes and workers): sampled every 0.5 s during timed rounds it used 8.1-9.1 s of CPU
# beside the services and 2.2-2.5 s beside local run (system benchmark, 2026-12-01 23:16 and
# 23:50 UTC), every 2 s 1.7-2.5 s and 0.6 s (2026-12-02 00:55 and 01:14 UTC), in the
# benchmark's own process, which competes for the two cores with what it runs. Hence a round
# of its own, untimed.
CPU_SAMPLE_S = 0.5

SPEC = {
    "name": "system-overhead",
    "search_seed": 0,
    "trials_per_study": 3,
    "max_total_trials": 4,
    "seeds_per_best": 1,
    "selection": "BEST_VALIDATION_METRIC",
    "workloads": [{
        "workload": "mnist1d_resnet1d_small",
        "target": {"metric": "validation/accuracy", "value": 0.3, "goal": "MAXIMIZE"},
        "points": [{"batch_size": 64, "step_budget": 150, "eval_every_steps": 50}],
    }],
    "optimizers": [{
        "name": "nesterov",
        "config": {"optimizer": "nesterov", "learning_rate": {"schedule": "cosine", "peak_value": 0.1}, "momentum": 0.9},
        "search_space": {"parameters": [{"path": "optimizer.learning_rate.peak_value", "log": {"min": 0.01, "max": 1.0}}]},
    }],
}

# The same study four times as large: 12 tuning trials and 4 seed reruns.
LARGE_SPEC = {**SPEC, "name": "system-overhead-16", "trials_per_study": 12,
              "max_total_trials": 16, "seeds_per_best": 4}


def _reproduction_spec() -> dict:
    """One search replicate of the CPU reproduction's batch-128 studies (46 runs)."""
    from benchmarks import parallel_trials

    return {**parallel_trials.spec(quick=False), "name": "system-reproduction"}


def _prepare(data_dir: Path, spec: dict) -> None:
    """Build the datasets of ``spec``'s workloads (outside every timing), as local run does."""
    from batchlab.runner.local import prepare_datasets

    prepare_datasets((w["workload"] for w in spec["workloads"]), data_dir)


# Started as a fresh `python`: the cold figure counts from the parent's clock at the start.
_LOCAL_RUN = """
import json, sys, time
from batchlab.runner import run_experiment
from batchlab.train.compilation_cache import enable_compilation_cache
spec, out, data_dir, cache = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
parallel = int(sys.argv[5]) or None
enable_compilation_cache(cache)
run_experiment(spec, out + "/cold", data_dir=data_dir, progress=False, write_report=False,
               parallel=parallel)
cold_end = time.time()
if sys.argv[6] == "cold":
    print(json.dumps({"cold_end": cold_end, "warm_s": None}))
    raise SystemExit(0)
start = time.perf_counter()
run_experiment({**spec, "name": spec["name"] + "-warm"}, out + "/warm", data_dir=data_dir,
               progress=False, write_report=False, parallel=parallel)
print(json.dumps({"cold_end": cold_end, "warm_s": time.perf_counter() - start}))
"""


def _local(root: Path, spec: dict = SPEC, *, parallel: int | None = None,
           warm: bool = True) -> tuple[float, float | None]:
    """(cold, warm) seconds of `batchlab local run` of ``spec`` (see the module docstring);
    the runs are stored under ``root/local_out/cold`` and ``root/local_out/warm``.

    Args:
      root: the benchmark's folder.
      spec: the experiment spec.
      parallel: runs at once (None: local run's default for the machine).
      warm: also time a second experiment in the same process (else warm is None).
    """
    data_dir = root / "local" / "tfds"
    _prepare(data_dir, spec)
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-c", _LOCAL_RUN, json.dumps(spec), str(root / "local_out"), str(data_dir),
         str(root / "local" / "jax_cache"), str(parallel or 0), "warm" if warm else "cold"],
        check=True, capture_output=True, text=True,
    )
    times = json.loads(out.stdout.strip().splitlines()[-1])
    return times["cold_end"] - started, times["warm_s"]


def _experiment(client, spec: dict) -> float:
    """Seconds from submitting `spec` to SUCCEEDED."""
    from batchlab.search import load_spec

    start = time.perf_counter()
    exp = client.submit(load_spec(spec, validate_optimizers=False))
    while True:
        exp = client.get(exp.name)
        if exp.state >= 3:
            break
        time.sleep(0.2)
    if exp.state != 3:
        raise RuntimeError(f"the benchmark experiment ended in state {exp.state}: {exp.error}")
    return time.perf_counter() - start


@contextlib.contextmanager
def embedded_stack(root: Path, spec: dict = SPEC, *, num_trainers: int = 1,
                   ray_cpus: int = 2) -> Iterator[tuple[Any, float]]:
    """The embedded stack under ``root/stack`` (``spec``'s datasets built first), up for the
    ``with`` block.

    Yields:
      (an ExperimentClient of its controller, the seconds `batchlab up` took).
    """
    from batchlab.client import ExperimentClient, Stack

    state = root / "stack"
    _prepare(state / "tfds", spec)
    grpc_ports = dict(zip(["controller", "sharding", "checkpoints", "evaluator"], free_ports(4), strict=True))
    metric_ports = dict(zip(["controller", "sharding", "checkpoints", "evaluator", "trainer"], free_ports(5), strict=True))
    stack = Stack(state, ports=grpc_ports, metrics_ports=metric_ports, num_trainers=num_trainers,
                  extra_env={"BATCHLAB_RAY_CPUS": str(ray_cpus)})
    t0 = time.perf_counter()
    stack.up(timeout=300)
    startup = time.perf_counter() - t0
    try:
        with ExperimentClient(stack.address("controller")) as client:
            yield client, startup
    finally:
        stack.down()


def _services(root: Path) -> tuple[float, float, float]:
    """(cold, warm, start-up) seconds of SPEC through the embedded stack."""
    with embedded_stack(root) as (client, startup):
        cold = startup + _experiment(client, SPEC)
        warm = _experiment(client, {**SPEC, "name": SPEC["name"] + "-warm"})
    return cold, warm, startup


def _services_cold(root: Path, spec: dict) -> tuple[float, dict[str, float]]:
    """Seconds from `batchlab up` of a fresh stack to SUCCEEDED of ``spec`` on it, and where
    they went (see _breakdown)."""
    from services.controller.storage import SQLiteStorage

    with embedded_stack(root, spec) as (client, startup):
        total = startup + _experiment(client, spec)
    storage = SQLiteStorage(root / "stack" / "controller")
    try:
        results = [a.result or {} for e in storage.list_experiments()
                   for a in storage.attempts(e.id)]
    finally:
        storage.close()
    return total, _breakdown(total, results)


def _breakdown(total: float, results: list[dict]) -> dict[str, float]:
    """Where a cold figure's seconds went, summed over its runs' stored timings: the first step
    (compilation and first batch), training after it, the rest of each run, and everything
    outside the runs' own timing (local: the interpreter, imports and the driver; services:
    the stack's start-up, dispatching runs to the trainer, recording results, and waiting for
    evaluations that did not overlap training). The rest of a run is not the same work on both
    paths: a local run evaluates its points itself; a services run saves a checkpoint at each
    and the evaluation service evaluates them apart, in parallel with the next run."""
    wall = sum(r.get("wall_time_s") or 0.0 for r in results)
    first = sum(r.get("startup_time_s") or 0.0 for r in results)
    train = sum(r.get("train_time_s") or 0.0 for r in results)
    return {"runs": len(results), "first_step_s": first, "train_s": train,
            "rest_of_run_s": wall - first - train, "outside_runs_s": total - wall}


def _run_results(folder: Path) -> list[dict]:
    return [json.loads(p.read_text())["result"] for p in sorted(folder.rglob("runs/*/*.json"))]


def _round_ratios(local: list, services: list) -> list[float]:
    """Each round's services / local ratio, from the unrounded seconds (3 decimals)."""
    return [round(b / a, 3) for a, b in zip(local, services, strict=True)]


def _paired(local: list, services: list) -> float:
    """The median over rounds of each round's services / local ratio (the two sides of a round
    ran back to back; a ratio of medians can pair figures of different rounds)."""
    return float(np.median([b / a for a, b in zip(local, services, strict=True)]))


def ratio_interval(ratios: list[float], level: float = LEVEL) -> tuple[float, float, float]:
    """The geometric mean of per-round services / local ratios and its two-sided t-interval.

    Each round's two sides ran back to back on the same machine, so a round's ratio is a paired
    comparison; the machine's drift between rounds moves both sides and cancels in the ratio.
    The logs of the ratios are taken as independent draws of a normal variable (a ratio is
    skewed; its log is not, at this spread), so ``exp(mean +- t * sd / sqrt(n))`` is the
    interval. Needs two rounds or more, not all equal.
    """
    from scipy import stats

    if len(ratios) < 2:
        raise ValueError(f"an interval needs at least 2 rounds, got {len(ratios)}")
    if any(not (r > 0 and math.isfinite(r)) for r in ratios):
        raise ValueError(f"ratios must be positive and finite, got {ratios}")
    logs = np.log(np.asarray(ratios, dtype=float))
    if float(np.ptp(logs)) < 1e-9:
        # Ties (the stored ratios are rounded to 3 decimals; means of the same rounds in
        # another order differ in the last bit) would give an interval of width zero, a
        # certainty that no measurement has.
        raise ValueError(f"all {len(ratios)} ratios are equal ({ratios[0]:.6g}): no spread "
                         "to estimate an interval from")
    half = float(stats.t.ppf(0.5 + level / 2, len(logs) - 1) * logs.std(ddof=1)
                 / math.sqrt(len(logs)))
    centre = float(logs.mean())
    return math.exp(centre), math.exp(centre - half), math.exp(centre + half)


def _geometric_mean(ratios: list[float]) -> float:
    """The geometric mean of positive ratios (any number of them, ties included)."""
    return math.exp(float(np.mean(np.log(np.asarray(ratios, dtype=float)))))


def verdict(low: float, high: float, target: float = TARGET) -> str:
    """'yes' when the whole interval is at or under the target, 'NO' when it is all over it,
    'not decided' (more rounds needed) when it straddles the target."""
    if high <= target:
        return "yes"
    if low > target:
        return "NO"
    return "not decided"


def code_fingerprint(commit: str | None = None, root: Path = REPO) -> str | None:
    """A digest of the system code (the files git tracks under SYSTEM_CODE): at ``commit``, or
    as the files are on disk (uncommitted edits included; untracked files left out). Both read
    a file as git stores it (git's own blob ids; on disk through `git hash-object`, which
    applies the checkout's filters, such as line endings; a symbolic link as its target's
    name), so the same code has the same fingerprint either way. Runs with equal fingerprints
    ran the same system code from the same lock files; nothing else about them need be equal
    (what was installed, the benchmark's code, the machine). None outside a git checkout, or
    where there is no system code (a commit from before it)."""
    def git(*args: str, stdin: bytes | None = None) -> str:
        return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True,
                              input=stdin).stdout.decode()

    try:
        if commit:
            listing = git("ls-tree", "-r", "-z", commit, "--", *SYSTEM_CODE)
            blobs = sorted((line.split("\t", 1)[1], line.split()[2])
                           for line in listing.split("\0") if line)
        else:
            paths = sorted(x for x in git("ls-files", "-z", "--", *SYSTEM_CODE).split("\0") if x)
            links = {p: os.readlink(root / p).encode() for p in paths if (root / p).is_symlink()}
            files = [p for p in paths if p not in links and (root / p).is_file()]  # not deleted
            ids = git("hash-object", "--stdin-paths",
                      stdin="".join(f"{p}\n" for p in files).encode()).split() if files else []
            blobs = sorted([*zip(files, ids, strict=True),
                            *((p, hashlib.sha1(b"blob %d\0" % len(t) + t).hexdigest())
                              for p, t in links.items())])
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None
    if not blobs:
        return None
    digest = hashlib.sha256("".join(f"{p} {b}\n" for p, b in blobs).encode())
    return digest.hexdigest()[:16]


# The largest services / local ratio a stored round may have (a larger one is a broken file).
MAX_RATIO = 1e6


def _plausible(ratio: object) -> bool:
    """A stored round's ratio: a number (not a bool) in (0, MAX_RATIO)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        return False
    try:
        return 0 < float(ratio) < MAX_RATIO
    except OverflowError:  # an integer too large for a float
        return False


def pooled(entries: list[dict], fingerprint: str | None) -> dict | None:
    """The reproduction study's stored runs of the system code ``fingerprint`` (entries of the
    results' ``system_reproduction_runs``, each with ``system_code`` and ``rounds``), pooled.

    The unit is the run, not the round: rounds of one run share the machine's state of that
    hour, so the rounds of several runs are not independent draws. Each run counts once, as
    the geometric mean of its rounds' ratios, and the interval is over those (two runs or
    more, see :func:`ratio_interval`). The number of runs to pool is to be fixed before
    their results are seen: adding runs until the interval decides would make its 95%
    optimistic.

    Returns:
      runs, rounds, rounds over the target, each run's mean, their geometric mean, interval
      and verdict ("not decided" without an interval); None when no stored run has that code.
    """
    same = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"system_reproduction_runs[{i}]: an object expected, got "
                             f"{type(entry).__name__}")
        if not fingerprint or entry.get("system_code") != fingerprint:
            continue
        rounds = entry.get("rounds")
        if not isinstance(rounds, list) or not rounds or not all(map(_plausible, rounds)):
            raise ValueError(f"system_reproduction_runs[{i}].rounds: a non-empty list of "
                             f"ratios in (0, {MAX_RATIO:g}) expected, got "
                             f"{json.dumps(rounds, default=str)[:60]}")
        same.append(entry)
    if not same:
        return None
    means = [_geometric_mean(e["rounds"]) for e in same]
    rounds = [r for e in same for r in e["rounds"]]
    try:
        mean, low, high = ratio_interval(means)
        decided = verdict(low, high)
    except ValueError:  # one run, or runs of equal means: no interval
        mean, low, high, decided = _geometric_mean(means), None, None, "not decided"
    return {"runs": len(same), "rounds": len(rounds), "run_means": means,
            "geometric_mean": mean, "low": low, "high": high, "verdict": decided,
            "over_target_rounds": sum(r > TARGET for r in rounds),
            "measured_at": [e.get("measured_at") for e in same]}


def run(*, rounds: int = 2, cpu_round: bool = True) -> dict:
    """Run each study on both paths ``rounds`` times (which goes first alternates by round);
    report medians and, as each ratio, the median of the rounds' services / local ratios.

    Args:
      rounds: timed rounds.
      cpu_round: then run the reproduction study once more on each side, untimed, under
        benchmarks.cpu_use (where the machine's CPU went).
    """
    # The code the rounds ran: fingerprinted before them and checked after them (None when it
    # changed on disk meanwhile; a service started after the change would run other code).
    code_before = code_fingerprint()
    local_cold, local_warm, services_cold, services_warm, startups = [], [], [], [], []
    large_local, large_services = [], []
    local_parts: list[dict[str, float]] = []
    services_parts: list[dict[str, float]] = []
    repro_local, repro_services = [], []
    repro_local_parts: list[dict[str, float]] = []
    repro_services_parts: list[dict[str, float]] = []
    repro_cpu: dict[str, list[dict]] = {"local": [], "services": []}
    repro_sampler: dict[str, list[float]] = {"local": [], "services": []}
    sample_interval: float | None = None  # the interval the sampling used (None: no CPU round)
    repro_spec = _reproduction_spec()
    for i in range(rounds):
        # Which side goes first alternates by round, so drift on a shared machine hits both.
        order = ("services", "local") if i % 2 else ("local", "services")
        with tempfile.TemporaryDirectory(prefix=f"batchlab-system-{i}-") as tmp:
            root = Path(tmp)
            for side in order:  # one run at a time on both sides: the stack has one trainer
                if side == "local":
                    cold, warm = _local(root, parallel=1)
                    local_cold.append(cold)
                    local_warm.append(warm)
                else:
                    cold, warm, startup = _services(root)
                    services_cold.append(cold)
                    services_warm.append(warm)
                    startups.append(startup)
            for folder, spec, figures in (
                    ("large", LARGE_SPEC, (large_local, large_services, local_parts, services_parts)),
                    ("repro", repro_spec, (repro_local, repro_services, repro_local_parts,
                                           repro_services_parts))):
                local_totals, services_totals, local_breakdowns, services_breakdowns = figures
                for side in order:
                    if side == "local":
                        total = _local(root / folder, spec, parallel=1, warm=False)[0]
                        local_totals.append(total)
                        local_breakdowns.append(_breakdown(
                            total, _run_results(root / folder / "local_out" / "cold")))
                    else:
                        total, parts = _services_cold(root / folder, spec)
                        services_totals.append(total)
                        services_breakdowns.append(parts)
    # Where the machine's CPU went, for the study the system exists for: a round of its own.
    for side in ("local", "services") if cpu_round else ():
        with tempfile.TemporaryDirectory(prefix="batchlab-system-cpu-") as tmp, \
                CpuUse(interval_s=CPU_SAMPLE_S) as use:
            if side == "local":
                _local(Path(tmp), repro_spec, parallel=1, warm=False)
            else:
                _services_cold(Path(tmp), repro_spec)
        repro_cpu[side].append(use.result())
        repro_sampler[side].append(round(use.own_cpu_s, 2))
        sample_interval = use.interval_s
    return {
        "local_cold_s": [round(x, 1) for x in local_cold],
        "services_cold_s": [round(x, 1) for x in services_cold],
        "local_warm_s": [round(x, 1) for x in local_warm],
        "services_warm_s": [round(x, 1) for x in services_warm],
        "startup_s": [round(x, 1) for x in startups],
        "ratio_cold": _paired(local_cold, services_cold),
        "ratio_cold_rounds": _round_ratios(local_cold, services_cold),
        "ratio_warm": _paired(local_warm, services_warm),
        "ratio_warm_rounds": _round_ratios(local_warm, services_warm),
        "large_local_cold_s": [round(x, 1) for x in large_local],
        "large_services_cold_s": [round(x, 1) for x in large_services],
        "ratio_cold_large": _paired(large_local, large_services),
        "ratio_cold_large_rounds": _round_ratios(large_local, large_services),
        # Per round, in the order of large_*_cold_s.
        "large_local_breakdown": local_parts,
        "large_services_breakdown": services_parts,
        "reproduction_runs": repro_local_parts[0]["runs"] if repro_local_parts else 0,
        "reproduction_local_cold_s": [round(x, 1) for x in repro_local],
        "reproduction_services_cold_s": [round(x, 1) for x in repro_services],
        "ratio_cold_reproduction": _paired(repro_local, repro_services),
        "ratio_cold_reproduction_rounds": _round_ratios(repro_local, repro_services),
        "reproduction_local_breakdown": repro_local_parts,
        "reproduction_services_breakdown": repro_services_parts,
        # benchmarks.cpu_use's figures, from the untimed CPU round (one entry per side).
        "reproduction_local_cpu": repro_cpu["local"],
        "reproduction_services_cpu": repro_cpu["services"],
        # The CPU seconds the sampling itself used, in the benchmark's process.
        "reproduction_cpu_sampler_s": repro_sampler,
        "reproduction_cpu_sample_interval_s": sample_interval,
        "reproduction_cpu_untimed": cpu_round,
        "system_code": code_before if code_fingerprint() == code_before else None,
    }


def to_markdown(r: dict) -> str:
    """Render the result as a markdown section."""
    return "\n".join([
        "## The system's own cost: one study through the services vs. local run",
        "",
        "4 runs of mnist1d_resnet1d_small (batch 64, 150 steps, 3 evaluation points each), one at a time. "
        "Services: examples from the sharding service, a checkpoint at each evaluation point, evaluation by the "
        "evaluation service while training goes on. Cold: start-up included on both sides, empty compilation "
        "caches. Warm: a second experiment of the same spec in the same process / on the same stack. "
        "The reproduction's study: one search replicate of experiments/reproduction/momentum.yaml at batch 128 "
        "(Nesterov and LARS, 16 trials and 7 seed reruns each), cold, one run at a time on both sides.",
        "",
        "| path | wall seconds (median) | per round |",
        "|---|---:|---|",
        f"| cold: `batchlab local run` (python start to end) | {np.median(r['local_cold_s']):.1f} | {r['local_cold_s']} |",
        f"| cold: services (`batchlab up` to SUCCEEDED) | {np.median(r['services_cold_s']):.1f} | {r['services_cold_s']} |",
        f"| (of which the stack's start-up) | {np.median(r['startup_s']):.1f} | {r['startup_s']} |",
        f"| warm: `batchlab local run`, second run in the process | {np.median(r['local_warm_s']):.1f} | {r['local_warm_s']} |",
        f"| warm: services, second experiment on the stack | {np.median(r['services_warm_s']):.1f} | {r['services_warm_s']} |",
        f"| cold, 16 runs (12 trials, 4 reruns): `batchlab local run` | {np.median(r['large_local_cold_s']):.1f} | {r['large_local_cold_s']} |",
        f"| cold, 16 runs: services, a fresh stack | {np.median(r['large_services_cold_s']):.1f} | {r['large_services_cold_s']} |",
        *_reproduction_rows(r),
        "",
        *_ratio_table(r),
        *_per_round_ratios(r),
        *_fixed_and_per_run(r),
        *_breakdown_table(r, "large", "16-run"),
        *_breakdown_table(r, "reproduction", f"reproduction study's ({r.get('reproduction_runs')}-run)"),
        *_cpu_table(r),
    ])


_RATIOS = (
    # label, local seconds, services seconds, ratios from unrounded seconds, median
    ("cold (4 runs)", "local_cold_s", "services_cold_s", "ratio_cold_rounds", "ratio_cold"),
    ("cold (16 runs)", "large_local_cold_s", "large_services_cold_s", "ratio_cold_large_rounds",
     "ratio_cold_large"),
    ("warm", "local_warm_s", "services_warm_s", "ratio_warm_rounds", "ratio_warm"),
    ("cold, the reproduction's study", "reproduction_local_cold_s",
     "reproduction_services_cold_s", "ratio_cold_reproduction_rounds", "ratio_cold_reproduction"),
)


def _ratio_table(r: dict) -> list[str]:
    """Each ratio: the median of the rounds' ratios, and the geometric mean with its interval,
    which decides whether the target is met (results stored before the rounds' ratios were
    kept: ratios of the rounded seconds)."""
    rows = []
    for label, local, services, rounds_key, median_key in _RATIOS:
        if not r.get(local):
            continue
        ratios = r.get(rounds_key) or _round_ratios(r[local], r[services])
        if label.startswith("cold, the"):
            label = f"{label} ({r.get('reproduction_runs')} runs)"
        try:
            mean, low, high = ratio_interval(ratios)
            interval, met = f"{mean:.3f} [{low:.3f}, {high:.3f}]", verdict(low, high)
        except ValueError:  # one round, or rounds of equal ratios
            interval, met = "- (fewer than two rounds, or equal ones)", "not decided"
        rows.append(f"| services / local, {label} | {r[median_key]:.3f} | {interval} | "
                    f"<= {TARGET} | {met} |")
    return [
        f"| ratio | median of the rounds | geometric mean [{LEVEL:.0%} interval] | target | "
        "met (by the interval) |",
        "|---|---:|---:|---|---|",
        *rows,
        "",
        f"Met: the whole {LEVEL:.0%} interval is at or under the target; NO: all of it is over; "
        "not decided: it straddles the target (`python -m benchmarks.system pool` pools the "
        "stored runs of the same code, each run counting once). The interval is a t-interval of "
        "the logs of the rounds' ratios (each round's two sides ran back to back).",
        "",
    ]


def _per_round_ratios(r: dict) -> list[str]:
    """Each round's services / local ratio of each cold study (the ratios above are their
    medians)."""
    rows = []
    for label, local, services, key in (
            ("4 runs", "local_cold_s", "services_cold_s", "ratio_cold_rounds"),
            ("16 runs", "large_local_cold_s", "large_services_cold_s", "ratio_cold_large_rounds"),
            ("the reproduction's study", "reproduction_local_cold_s",
             "reproduction_services_cold_s", "ratio_cold_reproduction_rounds")):
        if r.get(local):
            # From the unrounded seconds, as the medians are (results before 2026-12-01 16:30
            # UTC stored rounded seconds only).
            ratios = r.get(key) or _round_ratios(r[local], r[services])
            rows.append(f"| {label} | {ratios} | {sum(x <= TARGET for x in ratios)} of {len(ratios)} |")
    return ["Cold ratios round by round (each round's services figure over its local one; the "
            "ratios above are the medians of these):", "",
            f"| study | per round | rounds <= {TARGET} |", "|---|---|---|", *rows, ""]


def _reproduction_rows(r: dict) -> list[str]:
    if not r.get("reproduction_local_cold_s"):
        return []
    n = r["reproduction_runs"]
    return [
        f"| cold, the reproduction's study ({n} runs of mnist1d_resnet1d, batch 128, 240 steps): "
        f"`batchlab local run` | {np.median(r['reproduction_local_cold_s']):.1f} | {r['reproduction_local_cold_s']} |",
        f"| cold, the reproduction's study: services, a fresh stack | "
        f"{np.median(r['reproduction_services_cold_s']):.1f} | {r['reproduction_services_cold_s']} |",
    ]


def _fixed_and_per_run(r: dict) -> list[str]:
    """Each path's cold seconds split into a fixed part and a part per run, from the two study
    sizes (4 and 16 runs; medians): the line through the two points. The fixed part is that
    line at 0 runs, an extrapolation, and noisier than either measurement."""
    rows = []
    for label, small, large in (("`batchlab local run`", "local_cold_s", "large_local_cold_s"),
                                ("services", "services_cold_s", "large_services_cold_s")):
        c4, c16 = float(np.median(r[small])), float(np.median(r[large]))
        per_run = (c16 - c4) / 12
        rows.append(f"| {label} | {c4 - 4 * per_run:.1f} | {per_run:.2f} |")
    return [
        "Cold seconds as a fixed part plus a part per run (the line through the 4-run and 16-run "
        "medians; the fixed part is that line at 0 runs, an extrapolation):",
        "",
        "| path | fixed s | s per run |",
        "|---|---:|---:|",
        *rows,
        "",
    ]


_PARTS = (
    ("first_step_s", "first step of each run (compilation, first batch)"),
    ("train_s", "training after the first step"),
    ("rest_of_run_s", "rest of each run (local: evaluation; services: checkpoints, set-up)"),
    ("outside_runs_s", "outside the runs' own timing (start-up, imports, driver; services: "
                       "also dispatch, results, evaluation not overlapped)"),
)


def _breakdown_table(r: dict, study: str, label: str) -> list[str]:
    """Where a study's cold figures' seconds went, summed over runs (median over rounds).

    Args:
      r: the result.
      study: its keys' prefix ("large": the 16-run study, "reproduction").
      label: the study, as the text names it ("16-run").
    """
    if not r.get(f"{study}_local_breakdown"):
        return []
    rows = []
    for key, part in _PARTS:
        local = float(np.median([b[key] for b in r[f"{study}_local_breakdown"]]))
        services = float(np.median([b[key] for b in r[f"{study}_services_breakdown"]]))
        rows.append(f"| {part} | {local:.1f} | {services:.1f} | {services - local:+.1f} |")
    return [
        f"Where the {label} cold seconds go, summed over the runs from their stored results "
        "(median over rounds; each part's median is taken on its own, so the parts need not add "
        "up to the medians above):",
        "",
        "| part | local s | services s | services - local |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ]


_CPU_ROLES = ("training process", "evaluator", "controller", "sharding, checkpoints",
              "Ray's own processes", "local run's driver")


def _cpu_table(r: dict) -> list[str]:
    """Where the machine's CPU went during the reproduction study (benchmarks.cpu_use): CPU
    seconds and run-queue waits by role, from the untimed CPU round (results stored before
    2026-12-02 02:00 UTC: median over the timed rounds, a role absent from a round counting
    0 there)."""
    local, services = r.get("reproduction_local_cpu"), r.get("reproduction_services_cpu")
    if not local or not services or not any(local + services):
        return []

    def median(rounds: list[dict], role: str, key: str) -> str:
        values = [x.get(role, {}).get(key, 0.0) for x in rounds]
        return f"{float(np.median(values)):.1f}" if any(role in x for x in rounds) else "-"

    def most(rounds: list[dict], role: str) -> str:
        counts = [int(x.get(role, {}).get("processes", 0)) for x in rounds]
        return str(max(counts)) if any(role in x for x in rounds) else "-"

    rows = []
    for role in _CPU_ROLES:
        rows.append(f"| {role} | {most(local, role)} | "
                    f"{median(local, role, 'cpu_s')} | {median(local, role, 'wait_s')} | "
                    f"{most(services, role)} | {median(services, role, 'cpu_s')} "
                    f"| {median(services, role, 'wait_s')} |")
        if role == "training process":
            rows.append(f"| (its threads named {XLA_THREAD}, XLA:CPU's) | | "
                        f"{median(local, role, 'xla_cpu_s')} | {median(local, role, 'xla_wait_s')} "
                        f"| | {median(services, role, 'xla_cpu_s')} | "
                        f"{median(services, role, 'xla_wait_s')} |")
    where = ("from one more run of the study on each side after the timed rounds, itself untimed "
             "(the sampling weighs on no timed figure)" if r.get("reproduction_cpu_untimed") else
             "median over the timed rounds, which the sampling ran beside, a process absent from "
             "a round counting 0 there; processes: the most in any round")
    sampler = r.get("reproduction_cpu_sampler_s")
    own = (f" The sampling itself used {np.median(sampler['local']):.1f} s (local) and "
           f"{np.median(sampler['services']):.1f} s (services) of CPU in the benchmark's process, "
           "which the table leaves out." if sampler and sampler.get("local") and sampler.get("services") else "")
    return [
        "Where the machine's CPU went during the reproduction study, by process (benchmarks/"
        "cpu_use.py: the processes the benchmark started and their descendants; CPU seconds "
        "from /proc/<pid>/stat; run-queue wait: seconds the process's threads were ready to run "
        "but waited for a CPU, from each thread's schedstat; both sampled every "
        f"{r.get('reproduction_cpu_sample_interval_s', 0.5):g} s, so lower "
        f"bounds; {where}; '-': no such process on that path).{own}",
        "",
        "| process | local: processes | CPU s | wait s | services: processes | CPU s | wait s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def pool_report(results: Path, fingerprint: str) -> str:
    """Markdown: the stored runs of the system code ``fingerprint`` pooled (see :func:`pooled`).

    Raises:
      SystemExit: with one line naming the file or the field, when ``results`` cannot be read
        or is not a results file.
    """
    try:
        stored = json.loads(results.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        raise SystemExit(f"results: cannot read {results}: {reason}") from None
    if not isinstance(stored, dict) or "system_reproduction_runs" not in stored:
        raise SystemExit(f"results: {results} has no system_reproduction_runs (not a results "
                         "file of `python -m benchmarks.run`, or from before runs were stored)")
    entries = stored["system_reproduction_runs"]
    if not isinstance(entries, list):
        raise SystemExit(f"results: {results}: system_reproduction_runs must be a list, got "
                         f"{type(entries).__name__}")
    try:
        pool = pooled(entries, fingerprint)
    except ValueError as error:
        raise SystemExit(f"results: {results}: {error}") from None
    if pool is None:
        return f"No stored run of the system code {fingerprint} in {results}."
    interval = ("- (fewer than two runs, or equal ones)" if pool["low"] is None
                else f"[{pool['low']:.3f}, {pool['high']:.3f}]")
    return "\n".join([
        f"The reproduction study's cold ratio over the stored runs of the system code "
        f"{fingerprint} ({results}); each run counts once, as the geometric mean of its "
        "rounds' ratios:",
        "",
        f"| runs | their means | rounds | rounds over {TARGET:.2f} | geometric mean | "
        f"{LEVEL:.0%} interval (over the runs) | target | met (by the interval) |",
        "|---:|---|---:|---:|---:|---|---|---|",
        f"| {pool['runs']} | {', '.join(f'{m:.3f}' for m in pool['run_means'])} | "
        f"{pool['rounds']} | {pool['over_target_rounds']} | {pool['geometric_mean']:.3f} | "
        f"{interval} | <= {TARGET:.2f} | {pool['verdict']} |",
        "",
        "Runs: " + "; ".join(str(m) for m in pool["measured_at"] if m is not None),
        "",
        "Decide at a number of runs fixed beforehand: adding runs until the interval decides "
        "makes its 95% optimistic.",
    ])


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.system pool`: the stored runs of one system code pooled."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.system", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pool = sub.add_parser("pool", help="pool the reproduction study's stored runs of one "
                                       "system code (default: the code on disk)")
    pool.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "cpu-1-x-cpu.json")
    pool.add_argument("--code", help="a system-code fingerprint (as stored in system_code)")
    pool.add_argument("--commit", help="the system code at this commit")
    args = parser.parse_args(argv)
    if args.code is not None and args.commit is not None:
        parser.error("--code and --commit: give one")
    if args.code is not None and not args.code.strip():
        parser.error("--code: empty; give a fingerprint as stored in system_code")
    if args.commit is not None and not args.commit.strip():
        parser.error("--commit: empty; give a commit of this checkout")
    fingerprint = args.code or code_fingerprint(args.commit)
    if fingerprint is None:
        parser.error(f"--commit: {args.commit!r} is not a commit of this checkout, or has no "
                     "system code" if args.commit else
                     "no git checkout with system code here to fingerprint: give --code")
    print(pool_report(args.results, fingerprint))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
