"""A trainer pins its XLA:CPU thread count to the run's, by local run's rule.

Results depend on the count (batchlab.runner.resources), so a trainer must use what
`batchlab local run` uses for the same run: 1 thread for a small model on CPU, else the
run's Resources.cpus; and keep its compilation cache apart by that count. The count is fixed
when JAX starts, so each check runs in a fresh process; the XLA:CPU client's intra-op pool
threads are named tf_XLAEigen (one per thread).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

PROBE = textwrap.dedent("""
    import json, os, sys
    import batchlab.runner.resources as resources
    from batchlab.proto.v1 import controller_pb2, experiment_pb2
    from services.trainer.actor import TrainerWorker

    cache, workload, cpus, large, second = sys.argv[1:6]
    if large == "1":
        resources.SMALL_MODEL_PARAMETERS = 0  # every model counts as large
    worker = TrainerWorker({"name": "t", "jax_cache_dir": cache})
    def assignment(cpus):
        return controller_pb2.TrialAssignment(
            trial="t", workload=workload, resources=experiment_pb2.Resources(cpus=float(cpus)))
    worker._start_jax_for(assignment(cpus))
    import jax, jax.numpy as jnp
    x = jnp.ones((512, 512))
    (x @ x).block_until_ready()
    names = [open(f"/proc/self/task/{t}/comm").read().strip()
             for t in os.listdir("/proc/self/task")]
    refused = None
    if second != "0":
        try:
            worker._start_jax_for(assignment(second))
        except Exception as error:
            refused = [type(error).__name__, str(error), getattr(error, "retire_trainer", False)]
    print(json.dumps({"pool": names.count("tf_XLAEigen"),
                      "cache": os.path.basename(jax.config.jax_compilation_cache_dir),
                      "refused": refused}))
""")


def _probe(tmp_path, workload, cpus, *, large=False, second=0):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "BATCHLAB_JAX_CACHE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "cache"), workload, str(cpus),
         "1" if large else "0", str(second)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_two = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")


@needs_two
def test_a_small_model_runs_with_one_thread_whatever_the_runs_cpus(tmp_path):
    # local run's rule: mnist1d_resnet1d_small is far below SMALL_MODEL_PARAMETERS -> 1.
    found = _probe(tmp_path, "mnist1d_resnet1d_small", 2)
    assert found["pool"] == 1
    assert found["cache"] == "xla_cpu_threads_1"


@needs_two
def test_a_large_model_uses_the_runs_cpus_and_a_trainer_refuses_another_count(tmp_path):
    found = _probe(tmp_path, "mnist1d_resnet1d_small", 2, large=True, second=1)
    assert found["pool"] == 2
    assert found["cache"] == "xla_cpu_threads_2"
    kind, message, retire = found["refused"]
    assert kind == "TrainerInfrastructureError" and retire is True
    assert "2 XLA:CPU thread(s)" in message and "needs 1" in message
