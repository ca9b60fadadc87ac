"""Optimizers against shared/reference/optimizers.md, crossed with dtypes and jit behaviour.

Expected values are computed here from the reference formulas with NumPy, independently of
the library, or taken from optax where the reference says the variant matches optax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from batchlab import optim

OPTIMIZERS = {
    "nesterov": lambda: optim.nesterov(0.1, momentum=0.9, weight_decay=1e-4),
    "heavy_ball": lambda: optim.heavy_ball(0.1, momentum=0.9, weight_decay=1e-4),
    "sgd": lambda: optim.sgd(0.1, weight_decay=1e-4),
    "lars_mlperf": lambda: optim.lars(0.5, weight_decay=1e-4),
    "lars_optax": lambda: optim.lars(0.5, weight_decay=1e-4, variant="optax"),
    "lamb": lambda: optim.lamb(1e-2, weight_decay=1e-2),
    "adam": lambda: optim.adam(1e-3, weight_decay=1e-2),
    "adam_bert": lambda: optim.adam(1e-3, weight_decay=1e-2, bias_correction=False),
    "lars_pipeline": lambda: optim.grouped(
        weights=optim.lars(0.5, weight_decay=1e-4), bias_bn=optim.heavy_ball(0.5)
    ),
}


def _tree(dtype):
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), dtype)},
        "bn": {"scale": jnp.ones((8,), dtype), "bias": jnp.zeros((8,), dtype)},
        "dense": {"kernel": jnp.asarray(rng.normal(size=(8, 5)), dtype), "bias": jnp.zeros((5,), dtype)},
    }


def _grads(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_finite_shapes_dtypes_and_no_recompile(name, dtype):
    opt = OPTIMIZERS[name]()
    params = _tree(dtype)
    state = opt.init(params)
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    for i in range(3):
        params, state = step(params, state, _grads(params, seed=i))
    assert len(traces) == 1, "the second jitted update recompiled"
    for leaf, ref in zip(jax.tree.leaves(params), jax.tree.leaves(_tree(dtype)), strict=True):
        assert leaf.shape == ref.shape and leaf.dtype == ref.dtype
        assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32))))


def _run_scalar(opt, steps):
    theta = jnp.ones(())
    state = opt.init(theta)
    out = []
    for _ in range(steps):
        updates, state = opt.update(jnp.ones(()), state, theta)
        theta = optax.apply_updates(theta, updates)
        out.append(float(theta))
    return out


def test_nesterov_vs_heavy_ball_reference():
    # Reference section 5: theta0=1, g=1, lr=0.1, mu=0.9.
    np.testing.assert_allclose(_run_scalar(optim.nesterov(0.1, momentum=0.9), 2), [0.81, 0.539], rtol=1e-6)
    np.testing.assert_allclose(_run_scalar(optim.heavy_ball(0.1, momentum=0.9), 2), [0.9, 0.71], rtol=1e-6)


def test_nesterov_matches_optax_sgd_and_l2_is_added_before_momentum():
    params, grads = _tree(jnp.float32), _grads(_tree(jnp.float32))
    ours = optim.nesterov(0.1, momentum=0.9)
    ref = optax.sgd(0.1, momentum=0.9, nesterov=True)
    u1, _ = ours.update(grads, ours.init(params), params)
    u2, _ = ref.update(grads, ref.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)
    # With L2, the first step is -lr * (1 + mu) * (g + wd * w).
    wd = 1e-2
    opt = optim.nesterov(0.1, momentum=0.9, weight_decay=wd)
    u, _ = opt.update(grads, opt.init(params), params)
    jax.tree.map(
        lambda u, g, w: np.testing.assert_allclose(u, -0.1 * 1.9 * (g + wd * w), rtol=1e-5), u, grads, params
    )


def _np_lars_mlperf(w, g, lr, wd, eta, eps, mu, v):
    wn, gn = np.linalg.norm(w), np.linalg.norm(g)
    ratio = eta * wn / (gn + wd * wn + eps) if wn > 0 and gn > 0 else 1.0
    v = mu * v + lr * ratio * (g + wd * w)
    return w - v, v


def _np_lars_optax(w, g, lr, wd, eta, eps, mu, v):
    u = g + wd * w
    wn, un = np.linalg.norm(w), np.linalg.norm(u)
    ratio = eta * wn / (un + eps) if wn > 0 and un > 0 else 1.0
    v = mu * v + lr * ratio * u
    return w - v, v


@pytest.mark.parametrize("variant, reference", [("mlperf", _np_lars_mlperf), ("optax", _np_lars_optax)])
def test_lars_two_steps_match_formula(variant, reference):
    rng = np.random.default_rng(3)
    w0 = rng.normal(size=(4, 6)).astype(np.float32)
    g_seq = [rng.normal(size=(4, 6)).astype(np.float32) * s for s in (0.1, 2.0)]
    lr, wd, eta, eps, mu = 2.0, 1e-2, 0.001, 1e-9, 0.9
    opt = optim.lars(lr, weight_decay=wd, trust_coefficient=eta, eps=eps, momentum=mu, variant=variant)
    w, state = jnp.asarray(w0), opt.init(jnp.asarray(w0))
    w_ref, v_ref = w0.astype(np.float64), np.zeros_like(w0, np.float64)
    for g in g_seq:
        u, state = opt.update(jnp.asarray(g), state, w)
        w = optax.apply_updates(w, u)
        w_ref, v_ref = reference(w_ref, g.astype(np.float64), lr, wd, eta, eps, mu, v_ref)
    np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-5)


def test_lars_variants_differ_and_optax_variant_equals_optax_lars():
    params, grads = _tree(jnp.float32), _grads(_tree(jnp.float32))
    kw = dict(weight_decay=0.1, trust_coefficient=0.001, eps=0.0, momentum=0.9)
    ours = optim.lars(1.0, variant="optax", **kw)
    ref = optax.lars(1.0, **kw)
    s1, s2 = ours.init(params), ref.init(params)
    for i in range(2):
        g = _grads(params, seed=i)
        u1, s1 = ours.update(g, s1, params)
        u2, s2 = ref.update(g, s2, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-9), u1, u2)
    mlperf = optim.lars(1.0, variant="mlperf", **kw)
    u3, _ = mlperf.update(grads, mlperf.init(params), params)
    u4, _ = ours.update(grads, ours.init(params), params)
    assert not np.allclose(u3["conv"]["kernel"], u4["conv"]["kernel"], rtol=1e-4)


def test_lars_trust_ratio_is_one_for_zero_norm():
    # A zero-initialised BN scale: ||w|| = 0, so the ratio is 1.0, not eta (reference section 1).
    opt = optim.lars(1.0, momentum=0.0, trust_coefficient=0.001)
    w = jnp.zeros((8,))
    g = jnp.full((8,), 0.5)
    u, _ = opt.update(g, opt.init(w), w)
    np.testing.assert_allclose(np.asarray(u), -0.5 * np.ones(8), rtol=1e-6)
    u0, _ = opt.update(jnp.zeros((8,)), opt.init(jnp.ones(8)), jnp.ones(8))
    np.testing.assert_allclose(np.asarray(u0), np.zeros(8))


def test_lamb_step_matches_formula():
    rng = np.random.default_rng(5)
    w0 = rng.normal(size=(5, 7)).astype(np.float64)
    b1, b2, eps, wd, lr = 0.9, 0.999, 1e-6, 0.01, 0.1
    opt = optim.lamb(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    w, state = jnp.asarray(w0, jnp.float32), opt.init(jnp.asarray(w0, jnp.float32))
    m = np.zeros_like(w0)
    v = np.zeros_like(w0)
    w_ref = w0.copy()
    for t in (1, 2, 3):
        g = rng.normal(size=w0.shape)
        u, state = opt.update(jnp.asarray(g, jnp.float32), state, w)
        w = optax.apply_updates(w, u)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * w_ref
        w_ref = w_ref - lr * np.linalg.norm(w_ref) / np.linalg.norm(r) * r
    np.testing.assert_allclose(np.asarray(w), w_ref, rtol=2e-5)


def test_lamb_matches_optax_lamb():
    params = _tree(jnp.float32)
    ours, ref = optim.lamb(1e-2, weight_decay=1e-2), optax.lamb(1e-2, weight_decay=1e-2)
    s1, s2 = ours.init(params), ref.init(params)
    for i in range(3):
        g = _grads(params, seed=i)
        u1, s1 = ours.update(g, s1, params)
        u2, s2 = ref.update(g, s2, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-9), u1, u2)


def test_bert_adam_first_step_reference():
    # Reference section 3: g = 1, b1 = 0.9, b2 = 0.999, eps = 1e-6, lr = 1.
    w = jnp.zeros(())
    bert = optim.adam(1.0, b1=0.9, b2=0.999, eps=1e-6, bias_correction=False)
    corrected = optim.adam(1.0, b1=0.9, b2=0.999, eps=1e-6)
    ub, _ = bert.update(jnp.ones(()), bert.init(w), w)
    uc, _ = corrected.update(jnp.ones(()), corrected.init(w), w)
    np.testing.assert_allclose(-float(ub), 3.16217766, rtol=1e-6)
    # float32 bias correction (1 - 0.999**1) rounds at about 1e-5.
    np.testing.assert_allclose(-float(uc), 1.0 / (1.0 + 1e-6), rtol=2e-5)


def test_adam_decoupled_decay_matches_optax_adamw_and_is_not_l2():
    params, grads = _tree(jnp.float32), _grads(_tree(jnp.float32))
    ours, ref = optim.adam(1e-3, weight_decay=0.1), optax.adamw(1e-3, weight_decay=0.1)
    u1, _ = ours.update(grads, ours.init(params), params)
    u2, _ = ref.update(grads, ref.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)
    # L2 would pass wd*w through the Adam normalisation; decoupled decay adds lr*wd*w after it.
    l2 = optax.chain(optax.add_decayed_weights(0.1), optax.adam(1e-3))
    u3, _ = l2.update(grads, l2.init(params), params)
    assert not np.allclose(u1["conv"]["kernel"], u3["conv"]["kernel"])


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: optim.nesterov(0.1, momentum=1.0), "momentum"),
        (lambda: optim.lars(0.1, variant="tf"), "variant"),
        (lambda: optim.adam(0.1, b2=-0.1), "b2"),
        (lambda: optim.lamb(0.1, weight_decay=-1.0), "weight_decay"),
    ],
)
def test_bad_arguments_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_schedule_as_learning_rate_is_applied_per_step():
    lr = optim.schedules.piecewise_polynomial(0.0, 1.0, 0.0, 2, 4)
    opt = optim.sgd(lr)
    w = jnp.zeros(())
    state = opt.init(w)
    steps = []
    for _ in range(5):
        u, state = opt.update(jnp.ones(()), state, w)
        steps.append(-float(u))
    np.testing.assert_allclose(steps, [0.0, 0.5, 1.0, 0.25, 0.0], atol=1e-7)
