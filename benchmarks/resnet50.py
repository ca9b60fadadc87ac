"""ResNet-50 v1.5 training throughput (bfloat16 compute, synthetic data) and its model FLOP utilisation.

One jitted train step (forward, backward, the LARS pipeline update) on a synthetic batch,
timed after compilation. FLOPs per step come from XLA's cost analysis of the compiled step;
MFU = achieved FLOP/s / the device's peak. The peak is the vendor's dense bf16 figure for
known accelerators, and on CPU the float32 matmul rate measured in the same run (bf16 has no
faster path on this CPU, so that is the honest ceiling).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from batchlab import optim
from batchlab.models import ResNet50
from batchlab.train.workloads import classification_loss

__all__ = ["PEAK_BF16", "measured_matmul_peak", "peak_flops", "run", "to_markdown"]

# Dense bf16 peak FLOP/s per device, from the vendors' datasheets.
PEAK_BF16 = {
    "NVIDIA H200": 989e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    # Matched by prefix in this order: the PCIe and NVL cards before the plain "NVIDIA H100".
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
}


def measured_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """float32 FLOP/s of an n x n matmul on the default device, timed over ``reps`` products."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def peak_flops(device) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for ``device``: the datasheet table, else a CPU matmul."""
    kind = device.device_kind
    for name, peak in PEAK_BF16.items():
        if kind.startswith(name):
            return peak, f"{kind} datasheet dense bf16"
    if device.platform == "cpu":
        return measured_matmul_peak(), "float32 matmul measured in this run"
    return float("nan"), f"unknown peak for {kind}"


def run(*, rounds: int = 3, batch_size: int | None = None, image_size: int = 224) -> dict:
    """Time the step; return images/s, FLOPs per step and MFU."""
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    batch = batch_size or (8 if on_cpu else 256)
    steps = 2 if on_cpu else 20
    model = ResNet50(num_classes=1000, dtype=jnp.bfloat16, virtual_batch_size=None if on_cpu else 64)
    lr = optim.schedules.piecewise_polynomial(0.0, 29.0, 1e-4, 706, 2512)
    tx = optim.grouped(weights=optim.lars(lr, weight_decay=1e-4, momentum=0.929),
                       bias_bn=optim.heavy_ball(lr, momentum=0.929))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, image_size, image_size, 3)), jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 1000, size=(batch,)), jnp.int32)
    variables = jax.jit(lambda k: model.init(k, images[:2], train=False))(jax.random.key(0))
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            per_example, _, _ = classification_loss(logits, y, num_classes=1000, label_smoothing=0.1)
            return per_example.mean(), upd["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(params, stats, opt_state, images, labels).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", float("nan")))
    params, stats, opt_state, loss = compiled(params, stats, opt_state, images, labels)
    jax.block_until_ready(loss)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            params, stats, opt_state, loss = compiled(params, stats, opt_state, images, labels)
        jax.block_until_ready(loss)
        times.append((time.perf_counter() - start) / steps)
    step_s = float(np.median(times))
    peak, peak_source = peak_flops(device)
    return {
        "device": f"{jax.device_count()} x {device.device_kind} ({device.platform})",
        "batch_size": batch,
        "image_size": image_size,
        "compile_s": compile_s,
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "flops_per_step": flops,
        "achieved_flops": flops / step_s,
        "peak_flops": peak,
        "peak_source": peak_source,
        "mfu": flops / step_s / peak,
        "finite_loss": bool(np.isfinite(float(loss))),
    }


def to_markdown(r: dict) -> str:
    """Render the result as a markdown section."""
    return "\n".join([
        "## ResNet-50 v1.5 training step, bfloat16, synthetic data",
        "",
        f"{r['device']}; batch {r['batch_size']} at {r['image_size']}px; LARS pipeline update; "
        f"compile {r['compile_s']:.1f} s; loss finite: {r['finite_loss']}.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| step time | {r['step_s'] * 1e3:.1f} ms |",
        f"| images/s | {r['images_per_s']:,.1f} |",
        f"| model FLOPs per step (XLA cost analysis) | {r['flops_per_step'] / 1e12:.3f} TFLOP |",
        f"| achieved | {r['achieved_flops'] / 1e12:.3f} TFLOP/s |",
        f"| peak ({r['peak_source']}) | {r['peak_flops'] / 1e12:.3f} TFLOP/s |",
        f"| model FLOP utilisation | {r['mfu']:.1%} |",
        "",
    ])
