"""Gradient accumulation at batch 1,024: one pass vs microbatches (workload.microbatch_size).

On this CPU a forward/backward pass of mnist1d_resnet1d over more than 512 examples costs about
1.8x more per example than one over 512 (measured here while writing this, one run alone, at
batch 640-2,048, with or without virtual batches; most likely the activations no longer fit
the cache, not tested). ``microbatch_size`` runs the batch as equal microbatches
and makes one optimizer step of their mean gradient, the same function up to float rounding
(tests/train/test_microbatches.py). Each contender trains the reproduction's workload at batch
1,024 for the same steps with batchlab's loop, as the reproduction runs trials: two runs at once,
each a fresh process with one XLA thread (batchlab.runner.resources.start_jax_with_threads).
Rounds alternate the contenders' order. The figure is the loop's steady-state throughput
(compile and first batch excluded), summed over the two runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

__all__ = ["run", "to_markdown"]

WORKLOAD = "mnist1d_resnet1d"
BATCH = 1024
STEPS = 40
CONTENDERS = (0, 512, 256)  # microbatch_size; 0: the whole batch in one pass
OPTIMIZER = {"optimizer": "nesterov", "momentum": 0.9, "weight_decay": 1e-4,
             "learning_rate": {"schedule": "piecewise_polynomial", "peak_value": 0.3,
                               "end_value": 1e-4, "warmup_steps": 8, "decay_power": 2.0}}


def _worker(data_dir: str, microbatch: int) -> dict:
    from batchlab.runner.resources import start_jax_with_threads

    start_jax_with_threads(1)
    from batchlab.train import RunConfig, train_and_evaluate

    config = RunConfig(workload=WORKLOAD, optimizer=OPTIMIZER, batch_size=BATCH, total_steps=STEPS,
                       eval_every_steps=STEPS, hyperparameters={"microbatch_size": microbatch},
                       data_dir=data_dir)
    result = train_and_evaluate(config)
    return {"examples_per_second": result.examples_per_second, "outcome": result.outcome.name,
            "validation_accuracy": result.curve[-1]["validation/accuracy"]}


def _pair(data_dir: str, microbatch: int) -> list[dict]:
    """Two runs at once, each in its own process; their results."""
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.microbatches", data_dir, str(microbatch)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
             for _ in range(2)]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"microbatch benchmark worker failed:\n{stderr[-3000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def run(*, rounds: int = 2) -> dict:
    """Throughput of every contender in ``rounds`` interleaved rounds of two runs at once."""
    from batchlab import data as bdata

    with tempfile.TemporaryDirectory(prefix="batchlab-bench-microbatch-") as data_dir:
        bdata.prepare("mnist1d", data_dir)
        measured: dict[int, list[float]] = {m: [] for m in CONTENDERS}
        accuracy: dict[int, list[float]] = {m: [] for m in CONTENDERS}
        for r in range(rounds):
            for m in CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]:
                pair = _pair(data_dir, m)
                measured[m].append(sum(p["examples_per_second"] for p in pair))
                accuracy[m].extend(p["validation_accuracy"] for p in pair)
    median = {m: float(np.median(v)) for m, v in measured.items()}
    return {
        "setup": (f"{WORKLOAD}, batch {BATCH}, {STEPS} steps of Nesterov, batchlab's loop, two runs at "
                  f"once (one XLA thread each), {rounds} interleaved rounds"),
        "examples_per_second": {str(m): [round(x) for x in v] for m, v in measured.items()},
        "median_examples_per_second": {str(m): round(v) for m, v in median.items()},
        "speedup_vs_one_pass": {str(m): median[m] / median[0] for m in CONTENDERS},
        "validation_accuracy": {str(m): sorted(round(a, 4) for a in v) for m, v in accuracy.items()},
    }


def to_markdown(result: dict) -> str:
    """Render the result as a markdown section."""
    rows = [
        f"| {'one pass' if m == '0' else m} | {result['median_examples_per_second'][m]:,} | "
        f"{result['speedup_vs_one_pass'][m]:.2f}x | {result['examples_per_second'][m]} | "
        f"{result['validation_accuracy'][m]} |"
        for m in result["median_examples_per_second"]
    ]
    return "\n".join([
        "## Gradient accumulation at batch 1,024 (workload.microbatch_size)",
        "",
        result["setup"] + ".",
        "",
        "| microbatch_size | examples/s, two runs summed (median) | vs one pass | every round | "
        "validation accuracy of every run |",
        "|---|---:|---:|---|---|",
        *rows,
        "",
        "Same seed and data in every run. The accuracies of different contenders differ because "
        "float rounding differs and training amplifies it over the steps; one step agrees to "
        "rounding (tests/train/test_microbatches.py).",
        "",
    ])


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1], int(sys.argv[2]))))
