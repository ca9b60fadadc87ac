"""The cost of the system itself: one small study through the services vs. `batchlab local run`.

Both run the same spec (4 runs: 3 tuning trials and 1 seed rerun, one at a time: one trainer
actor), each in fresh processes with an empty JAX compilation cache and the dataset already
built. The local figure is run_experiment's wall time inside a new `python` process (imports
left out); the services figure is from SubmitExperiment to SUCCEEDED; the stack's start-up
(servers, Ray, warm trainers) is reported apart.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from batchlab import data as bdata
from batchlab.rpc.client import free_ports

__all__ = ["run", "to_markdown"]

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


_LOCAL_RUN = """
import json, sys, time
from batchlab.runner import run_experiment
from batchlab.train.compilation_cache import enable_compilation_cache
spec, out, data_dir, cache = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
enable_compilation_cache(cache)
start = time.perf_counter()
run_experiment(spec, out, data_dir=data_dir, progress=False, write_report=False)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def _local(root: Path) -> float:
    """`batchlab local run` of SPEC in a fresh process (as a user runs it), timed inside it.

    Like the services' trainers it starts cold (new process, empty compilation cache); the
    interpreter start and imports are left out, as the stack's start-up is on the other side.
    """
    import json
    import subprocess
    import sys

    data_dir = root / "state" / "tfds"
    bdata.prepare("mnist1d", data_dir, config="small")
    out = subprocess.run(
        [sys.executable, "-c", _LOCAL_RUN, json.dumps(SPEC), str(root / "local_out"), str(data_dir),
         str(root / "jax_cache_local")],
        check=True, capture_output=True, text=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def _services(root: Path) -> tuple[float, float]:
    from batchlab.client import ExperimentClient, Stack
    from batchlab.search import load_spec

    state = root / "stack"
    bdata.prepare("mnist1d", state / "tfds", config="small")
    grpc_ports = dict(zip(["controller", "sharding", "checkpoints", "evaluator"], free_ports(4), strict=True))
    metric_ports = dict(zip(["controller", "sharding", "checkpoints", "evaluator", "trainer"], free_ports(5), strict=True))
    stack = Stack(state, ports=grpc_ports, metrics_ports=metric_ports, num_trainers=1,
                  extra_env={"BATCHLAB_RAY_CPUS": "2"})
    t0 = time.perf_counter()
    stack.up(timeout=180)
    startup = time.perf_counter() - t0
    try:
        with ExperimentClient(stack.address("controller")) as client:
            start = time.perf_counter()
            exp = client.submit(load_spec(SPEC, validate_optimizers=False))
            while True:
                exp = client.get(exp.name)
                if exp.state >= 3:
                    break
                time.sleep(0.2)
            elapsed = time.perf_counter() - start
        if exp.state != 3:
            raise RuntimeError(f"the benchmark experiment ended in state {exp.state}: {exp.error}")
    finally:
        stack.down()
    return elapsed, startup


def run(*, rounds: int = 2) -> dict:
    """Alternate local and services runs ``rounds`` times; report medians and the ratio."""
    local, services, startups = [], [], []
    for i in range(rounds):
        with tempfile.TemporaryDirectory(prefix=f"batchlab-system-{i}-") as tmp:
            root = Path(tmp)
            local.append(_local(root))
            s, up = _services(root)
            services.append(s)
            startups.append(up)
    return {
        "local_s": [round(x, 1) for x in local],
        "services_s": [round(x, 1) for x in services],
        "startup_s": [round(x, 1) for x in startups],
        "ratio": float(np.median(services) / np.median(local)),
    }


def to_markdown(r: dict) -> str:
    """Render the result as a markdown section."""
    met = "yes" if r["ratio"] <= 1.15 else "NO"
    return "\n".join([
        "## The system's own cost: one study through the services vs. local run",
        "",
        "4 runs of mnist1d_resnet1d_small (batch 64, 150 steps), one at a time; each path in fresh processes with a cold compilation cache.",
        "",
        "| path | wall seconds (median) | per round |",
        "|---|---:|---|",
        f"| batchlab local run | {np.median(r['local_s']):.1f} | {r['local_s']} |",
        f"| services: submit -> SUCCEEDED | {np.median(r['services_s']):.1f} | {r['services_s']} |",
        f"| (stack start-up, not counted) | {np.median(r['startup_s']):.1f} | {r['startup_s']} |",
        "",
        "| ratio | value | target | met |",
        "|---|---:|---|---|",
        f"| services / local wall time | {r['ratio']:.3f} | <= 1.15 | {met} |",
        "",
    ])
