"""Run by test_multi_device.py in a fresh process with 8 simulated CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX starts, which is
why this is a separate process. Usage: ``python multi_device_worker.py DATA_DIR OUT_JSON``.
It trains the same run on all 8 devices and on one, and writes what the test asserts on.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from batchlab import data
from batchlab.train import DataParallel, RunConfig, get_workload, train_and_evaluate

VIRTUAL_BATCH = 8
BATCH = 64


def _max_diffs(a, b) -> dict[str, float]:
    """Largest absolute difference and largest excess over allclose(rtol=1e-4, atol=1e-5)."""
    abs_diff, excess = 0.0, -np.inf
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(jax.device_get(x), np.float64), np.asarray(jax.device_get(y), np.float64)
        d = np.abs(x - y)
        abs_diff = max(abs_diff, float(d.max()))
        excess = max(excess, float((d - (1e-5 + 1e-4 * np.abs(y))).max()))
    return {"max_abs": abs_diff, "max_excess": excess, "leaves": len(jax.tree.leaves(a))}


def _error(fn) -> str | None:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def virtual_batch_check(data_dir: str, dp: DataParallel) -> dict[str, float]:
    """The sharded train-mode forward pass vs normalising each sub-batch of 8 on its own."""
    workload = get_workload("mnist1d_resnet1d_small")
    hp = workload.hyperparameters({"virtual_batch_size": VIRTUAL_BATCH})
    model = workload.model(hp)
    whole_batch = workload.model({**hp, "virtual_batch_size": 0})  # plain BN over its input
    with data.input_pipeline(
        "mnist1d", "train", BATCH, data_dir=data_dir, config="small", seed=3, prefetch=0
    ) as it:
        x = jnp.asarray(next(it)["x"])
    variables = model.init(jax.random.key(0), x, train=False)

    @jax.jit
    def forward(variables, x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]

    sharded = forward(dp.put_replicated(variables), jax.device_put(x, dp.batch))
    per_sub_batch = jnp.concatenate([
        whole_batch.apply(variables, x[i : i + VIRTUAL_BATCH], train=True, mutable=["batch_stats"])[0]
        for i in range(0, BATCH, VIRTUAL_BATCH)
    ])
    one_group = whole_batch.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    return {
        "devices_holding_input": len(jax.device_put(x, dp.batch).sharding.device_set),
        "vs_sub_batches": float(jnp.max(jnp.abs(sharded - per_sub_batch))),
        "vs_whole_batch": float(jnp.max(jnp.abs(sharded - one_group))),
    }


def microbatch_check(config: RunConfig, all_devices: DataParallel, one_device: DataParallel) -> dict:
    """Batch 128 as 2 microbatches of 64 on 8 devices (8 examples, one virtual batch, per
    device and microbatch) vs batch 128 in one pass on one device."""
    config = dataclasses.replace(config, batch_size=2 * BATCH)
    split = dataclasses.replace(
        config, hyperparameters={"virtual_batch_size": VIRTUAL_BATCH, "microbatch_size": BATCH})
    r8 = train_and_evaluate(split, data_parallel=all_devices, return_state=True)
    r1 = train_and_evaluate(config, data_parallel=one_device, return_state=True)
    s8, s1 = r8.final_state, r1.final_state
    return {
        "outcomes": [r8.outcome.name, r1.outcome.name],
        "params": _max_diffs(s8.params, s1.params),
        "batch_stats": _max_diffs(s8.batch_stats, s1.batch_stats),
        "curve_max_abs": max(
            abs(p8[k] - p1[k]) for p8, p1 in zip(r8.curve, r1.curve, strict=True) for k in p8
        ),
        "error_microbatch_cuts_virtual_batches": _error(
            lambda: train_and_evaluate(
                dataclasses.replace(split, hyperparameters={"virtual_batch_size": 16,
                                                            "microbatch_size": BATCH}),
                data_parallel=all_devices,
            )
        ),
    }


def main(data_dir: str, out_path: str) -> None:
    all_devices = DataParallel()
    one_device = DataParallel(devices=jax.devices()[:1])
    config = RunConfig(
        workload="mnist1d_resnet1d_small",
        optimizer={"optimizer": "nesterov", "learning_rate": 0.1, "momentum": 0.9},
        batch_size=BATCH,
        total_steps=6,
        eval_every_steps=3,
        hyperparameters={"virtual_batch_size": VIRTUAL_BATCH},
        data_dir=data_dir,
    )
    r8 = train_and_evaluate(config, data_parallel=all_devices, return_state=True)
    r1 = train_and_evaluate(config, data_parallel=one_device, return_state=True)
    s8, s1 = r8.final_state, r1.final_state
    params_devices = {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(s8.params)}
    out = {
        "device_count": jax.device_count(),
        "outcomes": [r8.outcome.name, r1.outcome.name],
        "errors": [r8.error, r1.error],
        "steps": [int(s8.step), int(s1.step)],
        "params_on_devices": sorted(params_devices),
        "params": _max_diffs(s8.params, s1.params),
        "batch_stats": _max_diffs(s8.batch_stats, s1.batch_stats),
        "opt_state": _max_diffs(s8.opt_state, s1.opt_state),
        "curve_steps": [[p["step"] for p in r.curve] for r in (r8, r1)],
        "curve_max_abs": max(
            abs(p8[k] - p1[k]) for p8, p1 in zip(r8.curve, r1.curve, strict=True) for k in p8
        ),
        "error_not_multiple_of_virtual_batch": _error(
            lambda: train_and_evaluate(
                dataclasses.replace(config, hyperparameters={"virtual_batch_size": 16}),
                data_parallel=all_devices,
            )
        ),
        "error_not_divisible_by_devices": _error(
            lambda: train_and_evaluate(
                dataclasses.replace(config, batch_size=60, hyperparameters={"virtual_batch_size": 0}),
                data_parallel=all_devices,
            )
        ),
        "virtual_batches": virtual_batch_check(data_dir, all_devices),
        "microbatches": microbatch_check(config, all_devices, one_device),
    }
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
