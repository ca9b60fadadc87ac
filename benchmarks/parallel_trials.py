"""Trials in parallel: runs per hour of `batchlab local run` at P = 1, 2, 3, 4 runs at once.

The workload is the CPU reproduction's (experiments/reproduction/momentum.yaml at batch 128:
the 1-D ResNet on MNIST-1D, 240 steps, evaluation every 160 steps) with its two optimizers, so
runs of different studies share the machine as they do in the real experiment. Every P runs the
same spec into a fresh folder with a fresh (cold) compilation cache, through run_experiment
with ``parallel=P``; its wall time includes starting the workers. Each run keeps the rule's
XLA:CPU thread count whatever P is, and the benchmark checks that every P stored the same
results. Rounds alternate the order of P (1..4, then 4..1) so drift on a shared machine hits
every P alike; the load average next to each figure says how shared it was.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from batchlab import data as bdata
from batchlab.runner import run_experiment
from batchlab.runner.resources import plan_execution

__all__ = ["run", "to_markdown"]

log = logging.getLogger(__name__)

SPEC_FILE = Path(__file__).resolve().parents[1] / "experiments" / "reproduction" / "momentum.yaml"
PARALLEL = (1, 2, 3, 4)
TARGET_RATIO = 1.4


def spec(*, quick: bool) -> dict[str, Any]:
    """One search replicate of the CPU reproduction's batch-128 studies, at their size: each
    optimizer's study has the spec's tuning trials and seed reruns (16 and 7: 23 runs, 46 in
    all), the reproduction's two replicates being two such studies each. Quick: one trial and
    one seed each.

    The study's size matters to the ratio. Measured at P=2 on 2026-12-01 (run start and end
    times from the stored runs): about 5.6 s of each measurement had fewer than 2 runs in
    flight (2-2.5 s none, while the workers started; 3.3 s one), both with 8 trials and 1
    rerun per study (18 runs) and at this size. That was 18-20% of the 18-run wall time and
    10% of the 46-run one; the 18-run study measured 1.31x, this one 1.55x and 1.45x
    (two runs that day).
    """
    full = yaml.safe_load(SPEC_FILE.read_text())
    point = next(p for p in full["workloads"][0]["points"] if p["batch_size"] == 128)
    out = dict(full)
    out["name"] = "parallel-trials-bench"
    out["workloads"] = [{**full["workloads"][0], "points": [point]}]
    out["optimizers"] = full["optimizers"]
    out["search_replicates"] = 1
    if quick:
        out["trials_per_study"] = out["max_total_trials"] = out["seeds_per_best"] = 1
    else:
        out["max_total_trials"] = out["trials_per_study"]
    return out


def _describe(the_spec: dict[str, Any]) -> str:
    """The workload and point, as the spec gives them ("mnist1d_resnet1d (batch 128, ...)")."""
    workload = the_spec["workloads"][0]
    point = workload["points"][0]
    every = point.get("eval_every_examples") or workload.get("eval_every_examples")
    cadence = (f"an evaluation every {every:,} examples (every {every // point['batch_size']} steps)"
               if every else f"an evaluation every {point.get('eval_every_steps') or workload.get('eval_every_steps')} steps")
    return (f"{workload['workload']} (batch {point['batch_size']}, {point['step_budget']} steps, "
            f"{cadence})")


def _comparable(out: Path) -> str:
    keys = ("outcome", "curve", "final_metrics", "steps_to_target", "diverged_step")
    runs = {}
    for path in sorted((out / "runs").rglob("*.json")):
        result = json.loads(path.read_text())["result"]
        runs[f"{path.parent.name}/{path.name}"] = {k: result.get(k) for k in keys}
    return json.dumps(runs, sort_keys=True)


def _in_flight(out: Path, start: float, end: float) -> dict[int, float]:
    """Seconds of [start, end] (wall clock) with k runs in flight, by k: each run from its
    stored file's modification time (when it was written, at the run's end) back by its
    wall_time_s."""
    events: list[tuple[float, int]] = []
    for path in (out / "runs").rglob("*.json"):
        finished = path.stat().st_mtime
        wall = float(json.loads(path.read_text())["result"]["wall_time_s"])
        events += [(finished - wall, 1), (finished, -1)]
    seconds: dict[int, float] = {}
    running, last = 0, start
    for at, change in sorted(events):
        seconds[running] = seconds.get(running, 0.0) + max(at - last, 0.0)
        running, last = running + change, max(at, last)
    seconds[running] = seconds.get(running, 0.0) + max(end - last, 0.0)
    return seconds


def _cpu_seconds() -> float:
    """CPU time of this process and its ended children (the workers, once the pool joined them)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _measure(parallel: int, the_spec: dict[str, Any], root: Path, data_dir: str) -> dict[str, Any]:
    import jax

    out = root / f"p{parallel}"
    saved = jax.config.jax_compilation_cache_dir
    # Workers take the cache root from this process's config: a cold one per measurement.
    jax.config.update("jax_compilation_cache_dir", str(root / f"cache-p{parallel}"))
    load_before = os.getloadavg()[0]
    cpu_before = _cpu_seconds()
    wall_start = time.time()
    start = time.perf_counter()
    try:
        run_experiment(the_spec, out, data_dir=data_dir, progress=False, write_report=False,
                       parallel=parallel)
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_before
    in_flight = _in_flight(out, wall_start, wall_start + wall)
    results = [json.loads(p.read_text())["result"] for p in (out / "runs").rglob("*.json")]
    return {
        "parallel": parallel,
        "runs": len(results),
        "wall_s": wall,
        "runs_per_hour": len(results) * 3600.0 / wall,
        "cores_used": cpu / wall,
        # Seconds with fewer than P runs in flight, and with none.
        "under_p_s": sum(v for k, v in in_flight.items() if k < parallel),
        "none_in_flight_s": in_flight.get(0, 0.0),
        "examples_per_s_per_run": float(np.median([r["examples_per_second"] for r in results])),
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
        "results": _comparable(out),
    }


def run(*, rounds: int = 2, quick: bool = False) -> dict[str, Any]:
    """Measure runs per hour at each P, ``rounds`` times in alternating order."""
    the_spec = spec(quick=quick)
    data_dir = os.environ.get("BATCHLAB_BENCH_DATA_DIR") or os.path.join(tempfile.gettempdir(),
                                                                         "batchlab-bench-data")
    bdata.prepare("mnist1d", data_dir)
    plan = plan_execution([the_spec["workloads"][0]["workload"]])
    measurements: list[dict[str, Any]] = []
    for r in range(rounds):
        order = PARALLEL if r % 2 == 0 else tuple(reversed(PARALLEL))
        for p in order:
            with tempfile.TemporaryDirectory(prefix=f"batchlab-parallel-{p}-") as tmp:
                m = _measure(p, the_spec, Path(tmp), data_dir)
            log.info("P=%d: %d runs in %.1f s (load %.1f)", p, m["runs"], m["wall_s"], m["load_1min_before"])
            measurements.append({"round": r, **m})
    reference = next(m["results"] for m in measurements if m["parallel"] == 1)
    identical = all(m.pop("results") == reference for m in measurements)
    by_p = {}
    for p in PARALLEL:
        ms = [m for m in measurements if m["parallel"] == p]
        by_p[p] = {
            "runs_per_hour": float(np.median([m["runs_per_hour"] for m in ms])),
            "wall_s": [round(m["wall_s"], 1) for m in ms],
            "examples_per_s_per_run": float(np.median([m["examples_per_s_per_run"] for m in ms])),
            "load_1min": [m["load_1min_before"] for m in ms],
            "cores_used": float(np.median([m["cores_used"] for m in ms])),
            "under_p_s": [round(m["under_p_s"], 1) for m in ms],
            "none_in_flight_s": [round(m["none_in_flight_s"], 1) for m in ms],
        }
    base = by_p[1]["runs_per_hour"]
    for p in PARALLEL:
        by_p[p]["ratio"] = by_p[p]["runs_per_hour"] / base
    return {
        "setup": (f"{len(the_spec['optimizers'])} studies of {_describe(the_spec)}, "
                  f"{measurements[0]['runs']} runs per P, {rounds} round(s), cold "
                  "compilation cache per measurement"),
        "default_parallel": plan.parallel,
        "threads_per_run": dict(plan.threads_per_run),
        "plan": plan.reason,
        "by_parallel": {str(p): v for p, v in by_p.items()},
        "identical_results_across_p": identical,
        "measurements": measurements,
    }


def to_markdown(r: dict[str, Any]) -> str:
    """Render the result as a markdown section."""
    by_p = {int(p): v for p, v in r["by_parallel"].items()}
    default = r["default_parallel"]
    rows = []
    for p, v in sorted(by_p.items()):
        bar = "#" * round(10 * v["ratio"])
        mark = " (default)" if p == default else ""
        per_core = np.median([m["runs_per_hour"] / m["cores_used"] for m in r["measurements"]
                              if m["parallel"] == p])
        rows.append(f"| {p}{mark} | {v['runs_per_hour']:,.0f} | {v['ratio']:.2f}x `{bar}` | "
                    f"{v['wall_s']} | {v['examples_per_s_per_run']:,.0f} | {v['cores_used']:.2f} | "
                    f"{per_core:,.0f} | {v.get('under_p_s', '')} | {v.get('none_in_flight_s', '')} | "
                    f"{v['load_1min']} |")
    ratio = by_p[default]["ratio"] if default in by_p else max(v["ratio"] for v in by_p.values())
    met = "yes" if ratio >= TARGET_RATIO else "NO"
    return "\n".join([
        "## Trials in parallel: runs per hour against P (batchlab local run)",
        "",
        r["setup"] + f". Each run: {r['threads_per_run']} XLA:CPU thread(s) at every P ({r['plan']}).",
        "",
        "| P (runs at once) | runs/hour (median) | vs P=1 | wall s per round | examples/s per run "
        "| cores used | runs per core-hour | s with < P runs in flight | s with none | load avg (1 min) before |",
        "|---|---:|---|---|---:|---:|---:|---|---|---|",
        *rows,
        "",
        "Cores used: CPU seconds of the runner and its workers per wall second; runs per core-hour: "
        "runs per CPU-hour they used. On a shared machine Linux's autogroup scheduling gives each "
        "session an equal share of the CPUs while others are busy, so P runs at once can use no "
        "more than that share: compare cores used with the CPUs before reading the ratio. "
        "Runs in flight: each run from its stored result's end back by its wall time; the seconds of "
        "each round with fewer than P of them, and with none.",
        "",
        "| check | value | target | met |",
        "|---|---:|---|---|",
        f"| runs/hour at the default P={default} vs P=1 | {ratio:.2f}x | >= {TARGET_RATIO}x | {met} |",
        f"| every P stored identical curves, outcomes, metrics | {r['identical_results_across_p']} | True | "
        f"{'yes' if r['identical_results_across_p'] else 'NO'} |",
        "",
    ])
