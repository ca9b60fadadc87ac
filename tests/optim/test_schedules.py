"""Schedules against the numbers in shared/reference/optimizers.md (sections 3 and 4)."""

import jax
import numpy as np
import optax
import pytest

from batchlab.optim import schedules

LARS_32K = dict(init_value=0.0, peak_value=29.0, end_value=1e-4, warmup_steps=706, total_steps=2512)


@pytest.mark.parametrize(
    "step, expected",
    [(0, 0.0), (353, 14.5), (706, 29.0), (1609, 7.250075), (2512, 1e-4), (3000, 1e-4)],
)
def test_piecewise_polynomial_lars_reference(step, expected):
    lr = schedules.piecewise_polynomial(**LARS_32K)
    np.testing.assert_allclose(float(lr(step)), expected, rtol=1e-6, atol=1e-6)


def test_piecewise_polynomial_warmup_power_two_is_not_optax_polynomial():
    # Nesterov configuration B: p_warmup 2 gives 7.05 * 0.5^2 at the warmup midpoint.
    lr = schedules.piecewise_polynomial(0.0, 7.05, 6e-6, 706, 2512, warmup_power=2.0)
    np.testing.assert_allclose(float(lr(353)), 7.05 * 0.25, rtol=1e-6)
    # The pitfall in the reference notes: optax.polynomial_schedule's power acts on the
    # distance to the end value, giving 21.75 (for peak 29) instead of 7.25.
    pitfall = optax.polynomial_schedule(0.0, 29.0, power=2, transition_steps=706)
    np.testing.assert_allclose(float(pitfall(353)), 21.75, rtol=1e-6)
    ours = schedules.piecewise_polynomial(0.0, 29.0, 1e-4, 706, 2512, warmup_power=2.0)
    np.testing.assert_allclose(float(ours(353)), 7.25, rtol=1e-6)


def test_piecewise_polynomial_is_not_init2winit_off_by_one():
    lr = schedules.piecewise_polynomial(**LARS_32K)
    t = 1609
    off_by_one = 1e-4 + (29.0 - 1e-4) * ((2512 - t) / (2512 - 706 + 1)) ** 2
    assert abs(float(lr(t)) - off_by_one) > 1e-3


@pytest.mark.parametrize("step, expected", [(0, 0.0), (10, 0.5), (19, 0.95), (20, 0.80), (21, 0.79), (100, 0.0), (150, 0.0)])
def test_bert_legacy_drop_at_warmup_end(step, expected):
    lr = schedules.bert_legacy(1.0, warmup_steps=20, total_steps=100)
    np.testing.assert_allclose(float(lr(step)), expected, atol=1e-6)


def test_cosine_endpoints_and_midpoint():
    lr = schedules.cosine(2.0, total_steps=100)
    np.testing.assert_allclose([float(lr(t)) for t in (0, 50, 100, 200)], [2.0, 1.0, 0.0, 0.0], atol=1e-6)
    warm = schedules.cosine(2.0, total_steps=110, warmup_steps=10)
    np.testing.assert_allclose([float(warm(t)) for t in (0, 5, 10, 60, 110)], [0.0, 1.0, 2.0, 1.0, 0.0], atol=1e-5)


def test_linear_decay_table9():
    lr = schedules.linear_decay(init_value=4.0, total_steps=100, decay_factor=1e-2)
    np.testing.assert_allclose([float(lr(t)) for t in (0, 50, 100, 150)], [4.0, 2.02, 0.04, 0.04], rtol=1e-5)


def test_warmup_decay_to_constant_tables_12_to_19():
    lr = schedules.warmup_decay_to_constant(
        peak_value=10.0, warmup_steps=500, decay_steps=2500, decay_factor=1e-3
    )
    end = 10.0 * 1e-3
    mid = end + (10.0 - end) * 0.5**2
    np.testing.assert_allclose(
        [float(lr(t)) for t in (0, 250, 500, 1500, 2500, 2700)],
        [0.0, 5.0, 10.0, mid, end, end],
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: schedules.piecewise_polynomial(**LARS_32K),
        lambda: schedules.bert_legacy(1e-3, 10, 100),
        lambda: schedules.cosine(1.0, 100, warmup_steps=5),
        lambda: schedules.linear_decay(1.0, 100, 0.1),
        lambda: schedules.warmup_decay_to_constant(1.0, 10, 90, 0.01),
    ],
)
def test_schedules_jit_over_traced_steps(make):
    lr = make()
    steps = np.arange(0, 120, 7)
    eager = np.array([float(lr(int(t))) for t in steps])
    traced = np.asarray(jax.jit(jax.vmap(lr))(steps))
    np.testing.assert_allclose(traced, eager, rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(traced))


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: schedules.piecewise_polynomial(0, 1, 0, 10, 5), "total_steps"),
        (lambda: schedules.bert_legacy(1.0, -1, 10), "warmup_steps"),
        (lambda: schedules.cosine(1.0, 5, warmup_steps=5), "total_steps"),
    ],
)
def test_schedule_errors_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()
