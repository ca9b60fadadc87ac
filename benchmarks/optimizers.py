"""One optimizer update on the ResNet-50 parameter tree, each against its own floor.

For every batchlab optimizer three contenders run interleaved in the same rounds, each as
``params, state = step(params, state, grads)`` in one jit with params and state donated
(as in a training step):

* batchlab's update (``opt.update`` then ``optax.apply_updates``);
* a minimal hand-written form of exactly the same math: plain jnp, one
  ``jax.tree_util.tree_map`` over params, grads and state per update. It is the floor
  XLA reaches for that formula, so batchlab / minimal measures batchlab's overhead alone;
* optax's own optimizer where optax has one, as the peer a user would otherwise pick.

All use the same hyperparameters and the same weight decay (``WEIGHT_DECAY``): L2 added to
the gradient for Nesterov, heavy ball and LARS; decoupled for Adam and LAMB, as batchlab
defines them (libs/batchlab/optim/alias.py). batchlab's factories apply decay and trust
ratios to every leaf (bias/BN exclusion is opt-in through ``optim.grouped``), and so do
the minimal forms and the optax peers here.

The update is memory-bound: the table states the bytes it must move (params, grads and
state read once, params and state written once) and the bandwidth that implies. Trust-ratio
updates (LARS, LAMB) need each leaf's norm before they can write it, so on leaves larger
than the cache they read the operands a second time; their GB/s on the one-pass bytes is
therefore a lower bound on the traffic actually achieved.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from batchlab import optim
from batchlab.models import ResNet50
from benchmarks.common import interleaved

__all__ = [
    "MINIMAL",
    "OPTIMIZERS",
    "Contender",
    "Minimal",
    "contenders",
    "random_tree",
    "resnet50_tree",
    "run",
    "to_markdown",
]

LEARNING_RATE = 0.1
WEIGHT_DECAY = 1e-4
MOMENTUM = 0.9
TRUST_COEFFICIENT = 0.001  # LARS's eta
B1, B2 = 0.9, 0.999
LAMB_EPS = 1e-6  # batchlab.optim.lamb's and optax.lamb's default
ADAM_EPS = 1e-8  # batchlab.optim.adam's and optax.adamw's default

# batchlab's optimizers, in report order; each keys its minimal form and its optax peer.
OPTIMIZERS = (
    "nesterov",
    "heavy_ball",
    "lars (mlperf)",
    "lamb",
    "adam",
    "adam (BERT, no bias correction)",
)

State = Any
Step = Callable[[Any, State, Any], tuple[Any, State]]


@dataclass(frozen=True)
class Minimal:
    """A minimal same-math update: ``init(params) -> state`` and ``step(params, state, grads)``."""

    init: Callable[[Any], State]
    step: Step


def _unzip(out, params, n: int):
    """Split a tree of n-tuples (one tree_map's output) into n trees shaped like ``params``."""
    treedef = jax.tree_util.tree_structure(params)
    leaves = treedef.flatten_up_to(out)
    return tuple(treedef.unflatten([t[i] for t in leaves]) for i in range(n))


def _zeros(params):
    return jax.tree_util.tree_map(jnp.zeros_like, params)


def _norm(x):
    return jnp.linalg.norm(x.ravel())


def _momentum(*, nesterov: bool) -> Minimal:
    # L2: g <- g + wd*w; v <- mu*v + g; w <- w - lr*(mu*v + g) (Nesterov) or w - lr*v (heavy ball).
    def leaf(w, g, v):
        g = g + WEIGHT_DECAY * w
        v = MOMENTUM * v + g
        d = MOMENTUM * v + g if nesterov else v
        return w - LEARNING_RATE * d, v

    def step(params, state, grads):
        return _unzip(jax.tree_util.tree_map(leaf, params, grads, state), params, 2)

    return Minimal(_zeros, step)


def _lars_mlperf() -> Minimal:
    # ratio = eta*||w|| / (||g|| + wd*||w||), 1 where a norm is 0; v <- mu*v + lr*ratio*(g + wd*w); w <- w - v.
    def leaf(w, g, v):
        w_norm, g_norm = _norm(w), _norm(g)
        zero = (w_norm == 0.0) | (g_norm == 0.0)
        den = g_norm + WEIGHT_DECAY * w_norm
        ratio = jnp.where(zero, 1.0, TRUST_COEFFICIENT * w_norm / jnp.where(zero, 1.0, den))
        v = MOMENTUM * v + LEARNING_RATE * ratio * (g + WEIGHT_DECAY * w)
        return w - v, v

    def step(params, state, grads):
        return _unzip(jax.tree_util.tree_map(leaf, params, grads, state), params, 2)

    return Minimal(_zeros, step)


def _adam(*, trust_ratio: bool, bias_correction: bool, eps: float) -> Minimal:
    # m, v moments; r = m_hat/(sqrt(v_hat) + eps) + wd*w (decoupled decay);
    # LAMB: r <- (||w||/||r||) * r, 1 where a norm is 0; w <- w - lr*r.
    def init(params):
        return _zeros(params), _zeros(params), jnp.zeros((), jnp.int32)

    def step(params, state, grads):
        m_tree, v_tree, count = state
        count = count + 1
        if bias_correction:
            c1 = 1.0 - B1 ** count.astype(jnp.float32)
            c2 = 1.0 - B2 ** count.astype(jnp.float32)
        else:
            c1 = c2 = 1.0

        def leaf(w, g, m, v):
            m = B1 * m + (1.0 - B1) * g
            v = B2 * v + (1.0 - B2) * (g * g)
            r = (m / c1) / (jnp.sqrt(v / c2) + eps) + WEIGHT_DECAY * w
            if trust_ratio:
                w_norm, r_norm = _norm(w), _norm(r)
                zero = (w_norm == 0.0) | (r_norm == 0.0)
                r = jnp.where(zero, 1.0, w_norm / jnp.where(zero, 1.0, r_norm)) * r
            return w - LEARNING_RATE * r, m, v

        new_w, new_m, new_v = _unzip(
            jax.tree_util.tree_map(leaf, params, grads, m_tree, v_tree), params, 3
        )
        return new_w, (new_m, new_v, count)

    return Minimal(init, step)


MINIMAL: dict[str, Callable[[], Minimal]] = {
    "nesterov": lambda: _momentum(nesterov=True),
    "heavy_ball": lambda: _momentum(nesterov=False),
    "lars (mlperf)": _lars_mlperf,
    "lamb": lambda: _adam(trust_ratio=True, bias_correction=True, eps=LAMB_EPS),
    "adam": lambda: _adam(trust_ratio=False, bias_correction=True, eps=ADAM_EPS),
    "adam (BERT, no bias correction)": lambda: _adam(
        trust_ratio=False, bias_correction=False, eps=ADAM_EPS
    ),
}


def _batchlab(name: str) -> optax.GradientTransformation:
    lr, wd = LEARNING_RATE, WEIGHT_DECAY
    return {
        "nesterov": lambda: optim.nesterov(lr, momentum=MOMENTUM, weight_decay=wd),
        "heavy_ball": lambda: optim.heavy_ball(lr, momentum=MOMENTUM, weight_decay=wd),
        "lars (mlperf)": lambda: optim.lars(
            lr, weight_decay=wd, momentum=MOMENTUM, trust_coefficient=TRUST_COEFFICIENT
        ),
        "lamb": lambda: optim.lamb(lr, b1=B1, b2=B2, eps=LAMB_EPS, weight_decay=wd),
        "adam": lambda: optim.adam(lr, b1=B1, b2=B2, eps=ADAM_EPS, weight_decay=wd),
        "adam (BERT, no bias correction)": lambda: optim.adam(
            lr, b1=B1, b2=B2, eps=ADAM_EPS, weight_decay=wd, bias_correction=False
        ),
    }[name]()


def _optax_peer(name: str) -> tuple[str, optax.GradientTransformation] | None:
    """optax's optimizer for the same job, same hyperparameters and decay; None where it has none."""
    lr, wd = LEARNING_RATE, WEIGHT_DECAY
    if name == "nesterov":
        return "optax.sgd(nesterov) + L2", optax.chain(
            optax.add_decayed_weights(wd), optax.sgd(lr, momentum=MOMENTUM, nesterov=True)
        )
    if name == "heavy_ball":
        return "optax.sgd(momentum) + L2", optax.chain(
            optax.add_decayed_weights(wd), optax.sgd(lr, momentum=MOMENTUM)
        )
    if name == "lars (mlperf)":
        # optax's trust ratio uses ||g + wd*w|| in the denominator: the peer, not the same math.
        return "optax.lars", optax.lars(
            lr, weight_decay=wd, momentum=MOMENTUM, trust_coefficient=TRUST_COEFFICIENT
        )
    if name == "lamb":
        return "optax.lamb", optax.lamb(lr, b1=B1, b2=B2, eps=LAMB_EPS, weight_decay=wd)
    if name == "adam":
        return "optax.adamw", optax.adamw(lr, b1=B1, b2=B2, eps=ADAM_EPS, weight_decay=wd)
    return None  # optax has no Adam without bias correction


def _optax_step(opt: optax.GradientTransformation) -> Step:
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


@dataclass(frozen=True)
class Contender:
    """One timed update: its role ("batchlab", "minimal" or "optax"), label, init and step."""

    optimizer: str
    role: str
    label: str
    init: Callable[[Any], State]
    step: Step

    @functools.cached_property
    def donated_step(self) -> Step:
        """``step`` jitted with params and state donated, built once per contender."""
        return jax.jit(self.step, donate_argnums=(0, 1))


@functools.cache
def contenders() -> tuple[Contender, ...]:
    """Every contender, grouped by optimizer in :data:`OPTIMIZERS` order.

    Built once per process, so a second run (or a test on the same tree) reuses the compiled steps.
    """
    out = []
    for name in OPTIMIZERS:
        ours = _batchlab(name)
        out.append(Contender(name, "batchlab", f"batchlab {name}", ours.init, _optax_step(ours)))
        minimal = MINIMAL[name]()
        out.append(Contender(name, "minimal", "minimal same-math form", minimal.init, minimal.step))
        peer = _optax_peer(name)
        if peer is not None:
            out.append(Contender(name, "optax", peer[0], peer[1].init, _optax_step(peer[1])))
    return tuple(out)


def resnet50_tree(dtype=jnp.float32):
    """ResNet-50 v1.5's parameter shapes filled with random params and grads."""
    model = ResNet50(num_classes=1000)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )["params"]
    return random_tree(shapes, dtype)


def random_tree(shapes, dtype=jnp.float32):
    """Random (params, grads) with the shapes of ``shapes`` (a tree of arrays or ShapeDtypeStructs)."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.05, dtype), shapes)
    grads = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 1e-3, dtype), shapes)
    return params, grads


def _nbytes(tree) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _rel_diff(a, b) -> float:
    """max over leaves of max|a - b| / max|b| (the first step's parameters of two contenders)."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = float(jnp.max(jnp.abs(y))) or 1.0
        worst = max(worst, float(jnp.max(jnp.abs(x - y))) / scale)
    return worst


def run(*, rounds: int = 5, iters: int = 5, tree=None) -> dict:
    """Time every contender in interleaved rounds; return rows, ratios and bytes as plain data.

    Args:
      rounds: cycles through all contenders (1 in ``--quick``).
      iters: timed updates per contender per round.
      tree: (params, grads) to use instead of the ResNet-50 tree (tests pass a small one).

    Returns:
      {"tree", "weight_decay", "rows": [...], "optimizers": [...]} with times in ms.
    """
    params, grads = resnet50_tree() if tree is None else tree
    leaves = jax.tree.leaves(params)
    all_contenders = contenders()
    fns, boxes = {}, {}
    for c in all_contenders:
        step = c.donated_step
        box = {"p": jax.tree.map(jnp.copy, params)}
        box["s"] = c.init(box["p"])
        box["p"], box["s"] = step(
            box["p"], box["s"], grads
        )  # compile; every box is now one step in
        jax.block_until_ready(box["p"])

        def one(step=step, box=box):
            box["p"], box["s"] = step(box["p"], box["s"], grads)
            return box["p"]

        key = (c.optimizer, c.role)
        fns[key], boxes[key] = one, box

    # Same start, same grads, one step each: batchlab and its minimal form must agree.
    first_step_diff = {
        name: _rel_diff(boxes[(name, "batchlab")]["p"], boxes[(name, "minimal")]["p"])
        for name in OPTIMIZERS
    }
    # The one-pass traffic: params read+written, grads read, the minimal form's state read+written.
    state_bytes = {name: _nbytes(boxes[(name, "minimal")]["s"]) for name in OPTIMIZERS}
    param_bytes, grad_bytes = _nbytes(params), _nbytes(grads)

    times = interleaved(fns, rounds=rounds, iters=iters, sync=jax.block_until_ready)

    rows, per_optimizer = [], []
    for name in OPTIMIZERS:
        must_move = 2 * param_bytes + grad_bytes + 2 * state_bytes[name]
        medians = {}
        for c in all_contenders:
            if c.optimizer != name:
                continue
            m = times[(name, c.role)]
            medians[c.role] = m.median
            rows.append(
                {
                    "optimizer": name,
                    "role": c.role,
                    "label": c.label,
                    "median_ms": m.median * 1e3,
                    "q25_ms": m.q25 * 1e3,
                    "q75_ms": m.q75 * 1e3,
                    "bytes": must_move,
                    "gb_per_s": must_move / m.median / 1e9,
                }
            )
        per_optimizer.append(
            {
                "optimizer": name,
                "bytes": must_move,
                "state_bytes": state_bytes[name],
                "batchlab_over_minimal": medians["batchlab"] / medians["minimal"],
                "batchlab_over_optax": (
                    medians["batchlab"] / medians["optax"] if "optax" in medians else None
                ),
                "first_step_rel_diff": first_step_diff[name],
            }
        )
    what = "ResNet-50 params" if tree is None else "a given tree"
    return {
        "tree": f"{what}: {len(leaves)} leaves, {sum(x.size for x in leaves):,} float32",
        "weight_decay": WEIGHT_DECAY,
        "rounds": rounds,
        "iters": iters,
        "rows": rows,
        "optimizers": per_optimizer,
    }


TARGET_OVER_MINIMAL = 1.10


def to_markdown(result: dict) -> str:
    """Render the result as a markdown section."""
    lines = [
        "## Optimizer update on the ResNet-50 parameter tree",
        "",
        f"{result['tree']}; each update (update + apply in one jit, params and state "
        f"donated) runs interleaved with a minimal same-math form (plain jnp, one tree_map) and optax's "
        f"peer, all with lr {LEARNING_RATE}, momentum/b1 {MOMENTUM}, weight decay {result['weight_decay']:g} "
        "on every leaf (L2 for Nesterov, heavy ball and LARS; decoupled for Adam and LAMB). "
        f"{result['rounds']} rounds x {result['iters']} updates per contender. Bytes: params read and "
        "written, grads read, state read and written once (float32); LARS and LAMB also read large "
        "leaves a second time for their norms, so their GB/s is a lower bound on achieved traffic.",
        "",
        "| optimizer | contender | median ms | q25 | q75 | GB moved | GB/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['optimizer']} | {r['label']} | {r['median_ms']:.2f} | {r['q25_ms']:.2f} | "
            f"{r['q75_ms']:.2f} | {r['bytes'] / 1e9:.3f} | {r['gb_per_s']:.1f} |"
        )
    lines += [
        "",
        f"| optimizer | batchlab / minimal (target <= {TARGET_OVER_MINIMAL:.2f}) | met | batchlab / optax | "
        "first-step max rel. diff vs minimal |",
        "|---|---:|---|---:|---:|",
    ]
    for o in result["optimizers"]:
        ratio = o["batchlab_over_minimal"]
        peer = o["batchlab_over_optax"]
        lines.append(
            f"| {o['optimizer']} | {ratio:.3f} | {'yes' if ratio <= TARGET_OVER_MINIMAL else 'NO'} | "
            f"{'n/a (optax has none)' if peer is None else f'{peer:.3f}'} | {o['first_step_rel_diff']:.1e} |"
        )
    lines += [
        "",
        "optax.lars is the peer, not the same math: its trust ratio divides by ||g + wd*w|| where "
        "MLPerf's (batchlab's) divides by ||g|| + wd*||w||. Timings on a shared machine are noisy: "
        "read ratios with their quartiles.",
    ]
    return "\n".join(lines) + "\n"
