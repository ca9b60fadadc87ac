"""The optimizer-update benchmark (benchmarks/optimizers.py): its minimal same-math forms compute
batchlab's updates, and its quick run reports every optimizer against its floor and its peer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import optimizers as bench

# A small tree with every kind of leaf the trust-ratio rules care about: kernels of two ranks,
# a bias, a BN scale initialised to zero (||w|| = 0: ratio 1) and a leaf whose gradient is zero.
SHAPES = {
    "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)},
    "dense": {
        "kernel": jax.ShapeDtypeStruct((8, 5), jnp.float32),
        "bias": jax.ShapeDtypeStruct((5,), jnp.float32),
    },
    "bn": {"scale": jax.ShapeDtypeStruct((8,), jnp.float32)},
    "frozen": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)},
}
FLOATS = 3 * 3 * 4 * 8 + 8 * 5 + 5 + 8 + 4 * 4


def _small_tree():
    params, grads = bench.random_tree(SHAPES)
    params["bn"]["scale"] = jnp.zeros((8,), jnp.float32)
    grads["frozen"]["kernel"] = jnp.zeros((4, 4), jnp.float32)
    # Gradients comparable to the weights, so decay, momentum and trust ratios all matter.
    grads = jax.tree.map(lambda g: g * 50.0, grads)
    return params, grads


def _steps(init, step, params, grads_seq):
    params = jax.tree.map(jnp.copy, params)  # a donating step must not consume the caller's arrays
    state = init(params)
    out = []
    for grads in grads_seq:
        params, state = step(params, state, grads)
        out.append(jax.tree.map(np.array, params))  # a copy: the next step donates params
    return out


@pytest.mark.parametrize("name", bench.OPTIMIZERS)
def test_the_minimal_form_computes_batchlabs_update(name):
    params, grads = _small_tree()
    # Three steps with different gradients: the state (momentum, moments, step count) must agree too.
    grads_seq = [
        jax.tree.map(lambda g, k=k: g * (1.0 + 0.5 * k) * (-1) ** k, grads) for k in range(3)
    ]
    by_role = {c.role: c for c in bench.contenders() if c.optimizer == name}
    # The benchmark's own jitted, donating steps (the quick-run test below then reuses them).
    ours = _steps(by_role["batchlab"].init, by_role["batchlab"].donated_step, params, grads_seq)
    minimal = _steps(by_role["minimal"].init, by_role["minimal"].donated_step, params, grads_seq)
    for k, (a, b) in enumerate(zip(ours, minimal, strict=True)):
        jax.tree.map(
            lambda x, y, k=k: np.testing.assert_allclose(
                x, y, rtol=2e-5, atol=1e-7, err_msg=f"{name} step {k + 1}"
            ),
            a,
            b,
        )
    # The updates are not trivially zero: every leaf with a gradient moved.
    moved = jax.tree.map(lambda x, p: bool(jnp.any(x != p)), ours[-1], params)
    assert all(
        moved[k][leaf] for k, leaf in [("conv", "kernel"), ("dense", "kernel"), ("bn", "scale")]
    )


def test_the_minimal_forms_follow_the_reference_formulas_on_a_scalar():
    # reference/optimizers.md section 5: theta0=1, g=1, lr=0.1, mu=0.9 gives Nesterov 0.81 then
    # 0.539, heavy ball 0.9 then 0.71, without decay; with L2 wd the gradient is 1 + wd*theta.
    wd = bench.WEIGHT_DECAY
    theta, v = 1.0, 0.0
    nesterov = []
    for _ in range(2):
        g = 1.0 + wd * theta
        v = 0.9 * v + g
        theta -= 0.1 * (0.9 * v + g)
        nesterov.append(theta)
    assert nesterov == pytest.approx([0.81, 0.539], abs=1e-3)  # decay moves it only slightly
    got = _steps(
        bench.MINIMAL["nesterov"]().init,
        jax.jit(bench.MINIMAL["nesterov"]().step),
        {"w": jnp.ones(())},
        [{"w": jnp.ones(())}] * 2,
    )
    assert [float(p["w"]) for p in got] == pytest.approx(nesterov, rel=1e-6)
    # BERT's Adam: the first step with g = 1 is 3.16x the bias-corrected step (section 3).
    one = {"w": jnp.zeros(())}
    bert = _steps(
        bench.MINIMAL["adam (BERT, no bias correction)"]().init,
        jax.jit(bench.MINIMAL["adam (BERT, no bias correction)"]().step),
        one,
        [{"w": jnp.ones(())}],
    )
    adam = _steps(
        bench.MINIMAL["adam"]().init,
        jax.jit(bench.MINIMAL["adam"]().step),
        one,
        [{"w": jnp.ones(())}],
    )
    assert float(bert[0]["w"]) / float(adam[0]["w"]) == pytest.approx(3.16227766, rel=1e-4)


def test_the_optax_peers_carry_the_same_weight_decay():
    # With zero gradients only decay acts (L2 through momentum, or AdamW's decoupled term), so a
    # peer configured without decay would leave the weights where they are.
    params = {"w": jnp.full((4, 4), 2.0)}
    grads = {"w": jnp.zeros((4, 4))}
    for c in bench.contenders():
        if c.role != "optax" or c.label == "optax.lars":  # LARS: ratio 1 on a zero gradient
            continue
        (after,) = _steps(c.init, jax.jit(c.step), params, [grads])
        assert float(after["w"][0, 0]) < 2.0, c.label


def test_the_quick_run_reports_every_optimizer_against_its_floor_and_its_peer():
    result = bench.run(rounds=1, iters=2, tree=_small_tree())
    per = {o["optimizer"]: o for o in result["optimizers"]}
    assert list(per) == list(bench.OPTIMIZERS)
    # One-pass bytes from the tree's size: params read+written, grads read, state read+written.
    one_tree = 4 * FLOATS
    expected_state = {
        "nesterov": 1,
        "heavy_ball": 1,
        "lars (mlperf)": 1,
        "lamb": 2,
        "adam": 2,
        "adam (BERT, no bias correction)": 2,
    }
    for name, trees in expected_state.items():
        count_bytes = 4 if trees == 2 else 0  # the int32 step count of the Adam family
        assert per[name]["bytes"] == (3 + 2 * trees) * one_tree + 2 * count_bytes, name
        assert per[name]["batchlab_over_minimal"] > 0
        assert per[name]["first_step_rel_diff"] < 1e-5, name
    assert per["adam (BERT, no bias correction)"]["batchlab_over_optax"] is None
    assert all(per[n]["batchlab_over_optax"] > 0 for n in bench.OPTIMIZERS[:5])
    roles = [(r["optimizer"], r["role"]) for r in result["rows"]]
    assert len(roles) == 6 * 2 + 5 and len(set(roles)) == len(roles)
    for row in result["rows"]:
        assert 0 < row["q25_ms"] <= row["median_ms"] <= row["q75_ms"]
        assert row["gb_per_s"] == pytest.approx(row["bytes"] / row["median_ms"] / 1e6)
    md = bench.to_markdown(result)
    assert "batchlab / minimal" in md and "/ batchlab nesterov" not in md
    assert md.count("| minimal same-math form |") == 6 and "optax.lamb" in md
