"""One jitted optimizer update on the ResNet-50 parameter tree: ours vs. optax, side by side.

Each contender runs ``params, state = step(params, state, grads)`` where step is
``opt.update`` followed by ``optax.apply_updates`` in one jit with the parameters and
state donated, as in a training step. The update is memory-bound, so the expected
floors (passes over parameter-sized arrays) are about Nesterov 5, LARS 7, LAMB 10.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from batchlab import optim
from batchlab.models import ResNet50
from benchmarks.common import interleaved

__all__ = ["run"]


def _contenders() -> dict[str, optax.GradientTransformation]:
    lr, wd = 0.1, 1e-4
    return {
        "optax.sgd(nesterov)": optax.sgd(lr, momentum=0.9, nesterov=True),
        "batchlab nesterov": optim.nesterov(lr, momentum=0.9),
        "batchlab heavy_ball": optim.heavy_ball(lr, momentum=0.9),
        "optax.lars": optax.lars(lr, weight_decay=wd),
        "batchlab lars (mlperf)": optim.lars(lr, weight_decay=wd),
        "batchlab lars (optax variant)": optim.lars(lr, weight_decay=wd, variant="optax"),
        "batchlab lars pipeline (lars + heavy ball on bias/BN)": optim.grouped(
            weights=optim.lars(lr, weight_decay=wd), bias_bn=optim.heavy_ball(lr)
        ),
        "optax.lamb": optax.lamb(lr, weight_decay=wd),
        "batchlab lamb": optim.lamb(lr, weight_decay=wd),
        "optax.adamw": optax.adamw(lr, weight_decay=wd),
        "batchlab adam": optim.adam(lr, weight_decay=wd),
        "batchlab adam (BERT, no bias correction)": optim.adam(lr, weight_decay=wd, bias_correction=False),
    }


def _resnet50_tree(dtype=jnp.float32):
    model = ResNet50(num_classes=1000)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.05, dtype), shapes)
    grads = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 1e-3, dtype), shapes)
    return params, grads


def run(*, rounds: int = 5, iters: int = 5) -> dict:
    """Run the benchmark; return rows and ratios as plain data."""
    params, grads = _resnet50_tree()
    leaves = jax.tree.leaves(params)
    fns = {}
    for name, opt in _contenders().items():
        step = jax.jit(
            lambda p, s, g, opt=opt: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(
                opt.update(g, s, p)
            ),
            donate_argnums=(0, 1),
        )
        box = {"p": jax.tree.map(jnp.copy, params)}
        box["s"] = opt.init(box["p"])
        box["p"], box["s"] = step(box["p"], box["s"], grads)  # compile
        jax.block_until_ready(box["p"])

        def one(step=step, box=box):
            box["p"], box["s"] = step(box["p"], box["s"], grads)
            return box["p"]

        fns[name] = one
    times = interleaved(fns, rounds=rounds, iters=iters, sync=jax.block_until_ready)
    ms = {name: m.median * 1e3 for name, m in times.items()}
    ratios = {
        "batchlab nesterov / optax.sgd(nesterov)": ms["batchlab nesterov"] / ms["optax.sgd(nesterov)"],
        "batchlab lars (mlperf) / batchlab nesterov": ms["batchlab lars (mlperf)"] / ms["batchlab nesterov"],
        "batchlab lamb / batchlab nesterov": ms["batchlab lamb"] / ms["batchlab nesterov"],
        "batchlab lars (mlperf) / optax.lars": ms["batchlab lars (mlperf)"] / ms["optax.lars"],
        "batchlab lars (optax variant) / optax.lars": ms["batchlab lars (optax variant)"] / ms["optax.lars"],
        "batchlab lamb / optax.lamb": ms["batchlab lamb"] / ms["optax.lamb"],
        "batchlab adam / optax.adamw": ms["batchlab adam"] / ms["optax.adamw"],
    }
    targets = {
        "batchlab nesterov / optax.sgd(nesterov)": ("<= 1.10", lambda r: r <= 1.10),
        "batchlab lars (mlperf) / batchlab nesterov": ("<= 1.5", lambda r: r <= 1.5),
        "batchlab lamb / batchlab nesterov": ("<= 2.0", lambda r: r <= 2.0),
        "batchlab lars (mlperf) / optax.lars": ("< 1", lambda r: r < 1.0),
        "batchlab lamb / optax.lamb": ("< 1", lambda r: r < 1.0),
    }
    return {
        "tree": f"ResNet-50 params: {len(leaves)} leaves, {sum(x.size for x in leaves):,} float32",
        "rows": [
            (name, m.median * 1e3, m.q25 * 1e3, m.q75 * 1e3) for name, m in times.items()
        ],
        "ratios": [
            (k, v, targets[k][0] if k in targets else "", (targets[k][1](v) if k in targets else None))
            for k, v in ratios.items()
        ],
    }


def to_markdown(result: dict) -> str:
    """Render the result as a markdown section."""
    lines = [
        "## Optimizer update on the ResNet-50 parameter tree",
        "",
        result["tree"] + "; update + apply_updates in one jit, params and state donated.",
        "",
        "| optimizer | median ms | q25 | q75 |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {n} | {m:.2f} | {a:.2f} | {b:.2f} |" for n, m, a, b in result["rows"]]
    lines += ["", "| ratio | value | target | met |", "|---|---:|---|---|"]
    for name, value, target, met in result["ratios"]:
        lines.append(f"| {name} | {value:.3f} | {target} | {'' if met is None else ('yes' if met else 'NO')} |")
    return "\n".join(lines) + "\n"
