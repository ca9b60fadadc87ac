"""A tuning sweep's compile cost: hyperparameters as constants vs as arguments of the train step.

A study's tuning trials differ only in real-valued hyperparameters. Baked into the program as
constants (what a plain ``jax.jit(train_step)`` closing over ``optax.sgd(lr, momentum)`` does,
and what batchlab did before ``optim.optimizer_arguments``), every trial compiles its own train
step; passed as arguments, trials share one program, and a later trial's "compile" is a trace
plus a load from the persistent compilation cache. Both contenders build the same model
(mnist1d_resnet1d, the CPU reproduction's workload, at batch 1,024) and optimizer (the LAMB
pipeline of the reproduction: LAMB on weights, Adam on biases and BN, beta1 searched; Adam's
1 - beta is where arguments and constants differ most in float32), make a new
jitted step per trial as a new run does, and time jit + compile + the first step on one batch,
in a fresh process with one XLA:CPU thread (batchlab.runner.resources.start_jax_with_threads)
and its own empty cache folder, as a run here has. Each round draws new values, so no
constants-program is ever served from the cache; rounds alternate which contender goes first.
After each trial's first step, 20 more steps time the compiled step itself (does an argument
cost time at every step?).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

__all__ = ["run", "to_markdown"]

WORKLOAD = "mnist1d_resnet1d"
BATCH = 1024
STEADY_STEPS = 20


def _config(peak: float, bias_peak: float, b1: float) -> dict:
    schedule = {"schedule": "piecewise_polynomial", "end_value": 0.0, "warmup_steps": 8, "total_steps": 160,
                "decay_power": 1.0}
    return {
        "weights": {"optimizer": "lamb", "b1": b1, "eps": 1e-6, "weight_decay": 1e-2,
                    "learning_rate": {**schedule, "peak_value": peak}},
        "bias_bn": {"optimizer": "adam", "b1": b1, "eps": 1e-6,
                    "learning_rate": {**schedule, "peak_value": bias_peak}},
    }


def _worker(trials: int, rounds: int) -> dict:
    """In this process: per contender, per trial, seconds to jit, compile and run one step."""
    from batchlab.runner.resources import start_jax_with_threads

    start_jax_with_threads(1)
    cache = tempfile.mkdtemp(prefix="batchlab-bench-compile-")
    try:
        return _sweeps(trials, rounds, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _sweeps(trials: int, rounds: int, cache: str) -> dict:
    import jax
    import jax.numpy as jnp

    from batchlab.optim import from_config, optimizer_arguments
    from batchlab.train.compilation_cache import enable_compilation_cache
    from batchlab.train.steps import TrainState, make_train_step
    from batchlab.train.workloads import get_workload

    enable_compilation_cache(cache, cpu_threads=1)
    workload = get_workload(WORKLOAD)
    hp = workload.hyperparameters({})
    model = workload.model(hp)
    rng = np.random.default_rng(0)
    batch = {"input": jnp.asarray(rng.normal(size=(BATCH, 40)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32)}
    variables = model.init(jax.random.key(0), batch["input"][:2 * hp["virtual_batch_size"]], train=False)

    def state_for(optimizer):
        return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                          batch_stats=variables["batch_stats"], opt_state=optimizer.init(variables["params"]),
                          rng=jax.random.key_data(jax.random.key(1)))

    def constants(cfg):
        step = jax.jit(make_train_step(workload, hp, model, from_config(cfg)))
        return (lambda state: step(state, batch)), state_for(from_config(cfg))

    def arguments(cfg):
        build, values = optimizer_arguments(cfg)

        def train_step(state, batch, values):
            return make_train_step(workload, hp, model, build(values))(state, batch)

        step = jax.jit(train_step)
        values = jax.device_put(values)
        return (lambda state: step(state, batch, values)), state_for(build(values))

    out: dict[str, list[float]] = {"constants": [], "arguments": []}
    steady: dict[str, list[float]] = {"constants": [], "arguments": []}
    draws = rng.uniform(size=(rounds, trials, 3))
    contenders = [("constants", constants), ("arguments", arguments)]
    for r in range(rounds):
        for name, fn in contenders if r % 2 == 0 else contenders[::-1]:
            for u in draws[r]:
                cfg = _config(3e-3 * 300.0 ** u[0], 1e-3 * 300.0 ** u[1], 1.0 - 0.01 * 30.0 ** u[2])
                start = time.perf_counter()
                go, state = fn(cfg)
                state, _ = jax.block_until_ready(go(state))
                out[name].append(time.perf_counter() - start)
                # Then the compiled step itself: does passing values cost time at every step?
                start = time.perf_counter()
                for _ in range(STEADY_STEPS):
                    state, _ = go(state)
                jax.block_until_ready(state)
                steady[name].append((time.perf_counter() - start) / STEADY_STEPS)
    return {"first": out, "steady": steady}


def run(*, rounds: int = 3, trials: int = 4) -> dict:
    """Time ``rounds`` sweeps of ``trials`` trials per contender in a fresh one-thread process."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile", str(trials), str(rounds)],
        capture_output=True, text=True, env={**os.environ, "BATCHLAB_JAX_CACHE": "1"}, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compile benchmark worker failed:\n{proc.stderr[-3000:]}")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    times, steady = measured["first"], measured["steady"]
    first = {name: t[0] for name, t in times.items()}
    later = {name: float(np.median([x for i, x in enumerate(t) if i > 0])) for name, t in times.items()}
    step_ms = {name: 1e3 * float(np.median(t)) for name, t in steady.items()}
    return {
        "steady_step_ms": step_ms,
        "steady_ratio": step_ms["arguments"] / step_ms["constants"],
        "setup": (f"{WORKLOAD}, batch {BATCH}, the LAMB pipeline, {rounds} rounds of {trials} trials per "
                  "contender (new values every round), one XLA thread, a fresh persistent cache"),
        "seconds": {name: [round(x, 3) for x in t] for name, t in times.items()},
        "first_trial_s": first,
        "later_trial_median_s": later,
        "ratio": later["constants"] / later["arguments"],
    }


def to_markdown(result: dict) -> str:
    """Render the result as a markdown section."""
    rows = [
        f"| {name} | {result['first_trial_s'][name]:.2f} | {result['later_trial_median_s'][name]:.2f} | "
        f"{result['seconds'][name]} |"
        for name in ("constants", "arguments")
    ]
    return "\n".join([
        "## A tuning sweep's compile cost: hyperparameters as constants vs as arguments",
        "",
        result["setup"] + ". Each figure is jit + compile (or trace + cache load) + one train step.",
        "",
        "| hyperparameters | first trial (s) | later trials, median (s) | every trial (s) |",
        "|---|---:|---:|---|",
        *rows,
        "",
        f"Later trials' first step, constants / arguments: **{result['ratio']:.1f}x** (batchlab's loop "
        "passes them as arguments).",
        "",
        f"After it, one train step ({STEADY_STEPS} per trial, median over trials): constants "
        f"{result['steady_step_ms']['constants']:.2f} ms, arguments {result['steady_step_ms']['arguments']:.2f} ms "
        f"(arguments / constants {result['steady_ratio']:.3f}).",
        "",
    ])


if __name__ == "__main__":
    print(json.dumps(_worker(int(sys.argv[1]), int(sys.argv[2]))))
