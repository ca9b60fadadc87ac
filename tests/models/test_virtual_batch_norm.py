"""VirtualBatchNorm: per-sub-batch normalisation, MLPerf running statistics, eval mode.

The running-statistics formula under test (reference/optimizers.md section 6, paper footnote 12):
batch_mean = mean of sub-batch means; batch_var = mean(sub-batch E[x^2]) - batch_mean^2;
running = momentum * running + (1 - momentum) * batch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batchlab.models import VirtualBatchNorm

FEATURES = 3


def _sub_batch_input(num_sub: int, size: int, seed: int = 0) -> np.ndarray:
    """(num_sub * size, 2, FEATURES) data where each sub-batch has its own offset and spread."""
    rng = np.random.default_rng(seed)
    parts = []
    for k in range(num_sub):
        offset = 5.0 * (k - 1) + np.arange(FEATURES)  # different mean per sub-batch and feature
        spread = 0.5 + 2.0 * k  # different scale per sub-batch
        parts.append(offset + spread * rng.standard_normal((size, 2, FEATURES)))
    return np.concatenate(parts).astype(np.float32)


def _numpy_running_stats(batches, virtual_batch_size, momentum):
    """The MLPerf formula in float64, written independently of the module."""
    mean = np.zeros(FEATURES)
    var = np.ones(FEATURES)
    for x in batches:
        x = np.asarray(x, np.float64)
        size = virtual_batch_size or x.shape[0]
        groups = x.reshape(-1, size, *x.shape[1:])
        axes = tuple(range(1, groups.ndim - 1))
        sub_mean = groups.mean(axis=axes)
        sub_mean_sq = (groups**2).mean(axis=axes)
        batch_mean = sub_mean.mean(axis=0)
        batch_var = sub_mean_sq.mean(axis=0) - batch_mean**2
        mean = momentum * mean + (1 - momentum) * batch_mean
        var = momentum * var + (1 - momentum) * batch_var
    return mean, var


def _train_apply(bn, variables, x):
    return bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])


@pytest.mark.parametrize("num_sub,size", [(3, 4), (2, 8), (4, 2)])
def test_each_sub_batch_is_normalised_on_its_own(num_sub, size):
    x = _sub_batch_input(num_sub, size)
    bn = VirtualBatchNorm(virtual_batch_size=size)
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    y, _ = _train_apply(bn, variables, x)
    y = np.asarray(y).reshape(num_sub, size, 2, FEATURES)
    np.testing.assert_allclose(y.mean(axis=(1, 2)), 0.0, atol=1e-5)
    # Exactly 1 only without epsilon: a sub-batch's variance v comes out as v / (v + eps).
    sub_var = x.astype(np.float64).reshape(num_sub, size, 2, FEATURES).var(axis=(1, 2))
    np.testing.assert_allclose(y.var(axis=(1, 2)), sub_var / (sub_var + 1e-5), rtol=1e-5)

    # The data really needs per-sub-batch statistics: whole-batch BN leaves sub-batch offsets.
    whole = VirtualBatchNorm(virtual_batch_size=None)
    y_whole, _ = _train_apply(whole, variables, x)
    offsets = np.asarray(y_whole).reshape(num_sub, size, 2, FEATURES).mean(axis=(1, 2))
    assert np.abs(offsets).max() > 0.1


@pytest.mark.parametrize("virtual_batch_size", [None, 2, 4, 12])
@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_running_stats_follow_mlperf_formula(virtual_batch_size, momentum):
    batches = [_sub_batch_input(3, 4, seed=s) for s in (1, 2)]
    bn = VirtualBatchNorm(virtual_batch_size=virtual_batch_size, momentum=momentum)
    variables = bn.init(jax.random.key(0), batches[0], use_running_average=False)
    for x in batches:
        _, updates = _train_apply(bn, variables, x)
        variables = {"params": variables["params"], **updates}
    want_mean, want_var = _numpy_running_stats(batches, virtual_batch_size, momentum)
    np.testing.assert_allclose(variables["batch_stats"]["mean"], want_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variables["batch_stats"]["var"], want_var, rtol=1e-5, atol=1e-5)


def test_running_var_is_whole_batch_variance_not_mean_of_sub_batch_variances():
    x = _sub_batch_input(3, 4)
    bn = VirtualBatchNorm(virtual_batch_size=4, momentum=0.0)
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    _, updates = _train_apply(bn, variables, x)
    whole_var = x.astype(np.float64).var(axis=(0, 1))
    np.testing.assert_allclose(updates["batch_stats"]["var"], whole_var, rtol=1e-5)


def test_eval_uses_running_stats_and_params():
    x = _sub_batch_input(2, 4)
    bn = VirtualBatchNorm(virtual_batch_size=4)
    variables = bn.init(jax.random.key(0), x, use_running_average=True)
    mean = np.array([1.0, -2.0, 0.5], np.float32)
    var = np.array([4.0, 0.25, 1.0], np.float32)
    scale = np.array([2.0, 0.5, -1.0], np.float32)
    bias = np.array([0.1, 0.2, 0.3], np.float32)
    variables = {
        "params": {"scale": scale, "bias": bias},
        "batch_stats": {"mean": mean, "var": var},
    }
    y = bn.apply(variables, x, use_running_average=True)
    want = (x - mean) / np.sqrt(var + 1e-5) * scale + bias
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # Per-example in eval: one example alone gives the same answer as inside the batch.
    np.testing.assert_allclose(bn.apply(variables, x[:1], use_running_average=True), y[:1])


def test_init_does_not_update_running_stats():
    x = _sub_batch_input(2, 4)
    bn = VirtualBatchNorm(virtual_batch_size=4)
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(FEATURES))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(FEATURES))
    assert set(variables["params"]) == {"scale", "bias"}
    assert set(variables["batch_stats"]) == {"mean", "var"}


def test_init_on_a_single_example_is_allowed():
    # Flax's convention is to initialise on one dummy example even in training mode.
    bn = VirtualBatchNorm(virtual_batch_size=64)
    variables = bn.init(jax.random.key(0), jnp.ones((1, FEATURES)), use_running_average=False)
    assert variables["params"]["scale"].shape == (FEATURES,)


def test_indivisible_batch_is_a_clear_error():
    bn = VirtualBatchNorm(virtual_batch_size=4)
    variables = bn.init(jax.random.key(0), jnp.ones((4, FEATURES)), use_running_average=False)
    with pytest.raises(ValueError, match="virtual_batch_size=4"):
        _train_apply(bn, variables, jnp.ones((6, FEATURES)))


def test_use_running_average_given_both_ways_is_an_error():
    bn = VirtualBatchNorm(use_running_average=True)
    x = jnp.ones((2, FEATURES))
    variables = bn.init(jax.random.key(0), x)
    with pytest.raises(ValueError):
        bn.apply(variables, x, use_running_average=False)


def test_whole_batch_mode_matches_flax_batch_norm():
    x = _sub_batch_input(3, 4)
    ours = VirtualBatchNorm(virtual_batch_size=None, momentum=0.9, epsilon=1e-5)
    flax_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
    v_ours = ours.init(jax.random.key(0), x, use_running_average=False)
    v_flax = flax_bn.init(jax.random.key(0), x, use_running_average=False)
    y_ours, s_ours = _train_apply(ours, v_ours, x)
    y_flax, s_flax = flax_bn.apply(v_flax, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y_ours, y_flax, atol=1e-5)
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            s_ours["batch_stats"][name], s_flax["batch_stats"][name], rtol=1e-5
        )


def test_axis_name_shares_statistics_across_shards():
    x = _sub_batch_input(2, 4)
    shards = x.reshape(2, 4, *x.shape[1:])
    bn = VirtualBatchNorm(virtual_batch_size=None, axis_name="devices")
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    y_mapped, s_mapped = jax.vmap(lambda xs: _train_apply(bn, variables, xs), axis_name="devices")(
        shards
    )
    y_global, s_global = _train_apply(VirtualBatchNorm(virtual_batch_size=None), variables, x)
    np.testing.assert_allclose(y_mapped.reshape(x.shape), y_global, atol=1e-5)
    for shard in range(2):
        for name in ("mean", "var"):
            np.testing.assert_allclose(
                s_mapped["batch_stats"][name][shard], s_global["batch_stats"][name], rtol=1e-5
            )


def test_bfloat16_input_keeps_float32_statistics():
    x = jnp.asarray(_sub_batch_input(2, 4), jnp.bfloat16)
    bn = VirtualBatchNorm(virtual_batch_size=4, dtype=jnp.bfloat16)
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    y, updates = _train_apply(bn, variables, x)
    assert y.dtype == jnp.bfloat16
    assert updates["batch_stats"]["var"].dtype == jnp.float32
    assert np.isfinite(np.asarray(y, np.float32)).all()
