"""The training loop's throughput against a minimal hand-written flax + optax loop.

Both train the same model (the mnist1d_resnet1d workload: a 1-D ResNet with virtual-batch BN)
with the same optimizer, batch size and data, in the same process, alternating. The
hand-written loop holds the data in memory and does nothing but ``state = step(state, batch)``;
batchlab's loop adds its input pipeline, divergence checks and bookkeeping. Compile time and
the first batch are excluded from both. Also reported: the share of batchlab's training time
spent waiting on input.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from batchlab import data as bdata
from batchlab.train import RunConfig, train_and_evaluate
from batchlab.train.workloads import classification_loss, get_workload

__all__ = ["run", "to_markdown"]

WORKLOAD = "mnist1d_resnet1d"
OPTIMIZER = {"optimizer": "nesterov", "learning_rate": 0.05, "momentum": 0.9}


def _handwritten(batch_size: int, steps: int, data_dir: str) -> float:
    """Examples/s of a bare flax + optax loop on the same model and data."""
    workload = get_workload(WORKLOAD)
    hp = workload.hyperparameters({})
    model = workload.model(hp)
    arrays = bdata.ArraySource.from_source(bdata.get_dataset("mnist1d", "train", data_dir)).arrays
    x_all, y_all = arrays["x"].astype(np.float32), arrays["label"].astype(np.int32)
    tx = optax.sgd(0.05, momentum=0.9, nesterov=True)
    variables = model.init(jax.random.key(0), jnp.zeros((2 * hp["virtual_batch_size"], 40)), train=False)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            per_example, _, _ = classification_loss(logits, y, num_classes=10, label_smoothing=0.0)
            return per_example.mean(), upd["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x_all))
    def batch(i):
        idx = perm[(i * batch_size) % (len(perm) - batch_size):][:batch_size]
        return x_all[idx], y_all[idx]

    params, stats, opt_state, loss = step(params, stats, opt_state, *batch(0))
    jax.block_until_ready(params)
    start = time.perf_counter()
    for i in range(1, steps):
        params, stats, opt_state, loss = step(params, stats, opt_state, *batch(i))
    jax.block_until_ready(params)
    return (steps - 1) * batch_size / (time.perf_counter() - start)


def _batchlab(batch_size: int, steps: int, data_dir: str) -> tuple[float, float]:
    """(examples/s, input-wait share) of batchlab's loop, steady state."""
    config = RunConfig(
        workload=WORKLOAD, optimizer=OPTIMIZER, batch_size=batch_size, total_steps=steps,
        eval_every_steps=steps, data_dir=data_dir,
    )
    result = train_and_evaluate(config)
    if result.outcome.name != "SUCCEEDED":
        raise RuntimeError(f"benchmark run ended {result.outcome.name}: {result.error}")
    return result.examples_per_second, result.input_wait_s / max(result.train_time_s, 1e-9)


def run(*, rounds: int = 3, batch_size: int = 512, steps: int = 120) -> dict:
    """Alternate both loops ``rounds`` times; report medians and the ratio."""
    data_dir = os.environ.get("BATCHLAB_BENCH_DATA_DIR") or os.path.join(tempfile.gettempdir(), "batchlab-bench-data")
    bdata.prepare("mnist1d", data_dir)
    ours, theirs, waits = [], [], []
    for _ in range(rounds):
        eps, wait = _batchlab(batch_size, steps, data_dir)
        ours.append(eps)
        waits.append(wait)
        theirs.append(_handwritten(batch_size, steps, data_dir))
    ratio = float(np.median(ours) / np.median(theirs))
    return {
        "setup": f"{WORKLOAD}, batch {batch_size}, {steps} steps per round, {rounds} alternating rounds",
        "batchlab_examples_per_s": [round(x, 1) for x in ours],
        "handwritten_examples_per_s": [round(x, 1) for x in theirs],
        "ratio": ratio,
        "input_wait_share": float(np.median(waits)),
    }


def to_markdown(result: dict) -> str:
    """Render the result as a markdown section."""
    med_ours = float(np.median(result["batchlab_examples_per_s"]))
    med_theirs = float(np.median(result["handwritten_examples_per_s"]))
    ok_ratio = "yes" if result["ratio"] >= 0.95 else "NO"
    ok_wait = "yes" if result["input_wait_share"] < 0.05 else "NO"
    return "\n".join([
        "## Training loop vs. a hand-written flax + optax loop",
        "",
        result["setup"] + "; compile and the first batch excluded from both.",
        "",
        "| loop | examples/s (median) | per round |",
        "|---|---:|---|",
        f"| batchlab train_and_evaluate | {med_ours:,.0f} | {result['batchlab_examples_per_s']} |",
        f"| hand-written jit loop | {med_theirs:,.0f} | {result['handwritten_examples_per_s']} |",
        "",
        "| ratio | value | target | met |",
        "|---|---:|---|---|",
        f"| batchlab / hand-written examples/s | {result['ratio']:.3f} | >= 0.95 | {ok_ratio} |",
        f"| share of step time waiting on input | {result['input_wait_share']:.3%} | < 5% | {ok_wait} |",
        "",
    ])
