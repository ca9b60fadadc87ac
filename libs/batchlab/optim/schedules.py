"""Learning-rate schedules used in the paper, as jittable optax schedules.

Every function returns an ``optax.Schedule``: a function from the step count
(int or traced int array) to the learning rate. Where optax already implements
the paper's formula exactly, it is reused; where the paper's formula differs
(the piecewise polynomial of Section 2.1.4, BERT's legacy schedule) it is written
here and tested against the reference numbers.

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check", Section 2.1.4 and
  Appendix D (Tables 9-19).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from batchlab.optim.transforms import is_zero as _is_zero

__all__ = [
    "bert_legacy",
    "constant",
    "cosine",
    "linear_decay",
    "piecewise_polynomial",
    "warmup_decay_to_constant",
]


def _check_steps(**steps: int) -> None:
    for name, value in steps.items():
        if value < 0:
            raise ValueError(f"{name}: must be >= 0, got {value}")


def constant(value: float) -> optax.Schedule:
    """A constant learning rate.

    Args:
      value: the learning rate at every step.

    Returns:
      An optax schedule.
    """
    return optax.constant_schedule(value)


def piecewise_polynomial(
    init_value: float,
    peak_value: float,
    end_value: float,
    warmup_steps: int,
    total_steps: int,
    warmup_power: float = 1.0,
    decay_power: float = 2.0,
) -> optax.Schedule:
    """The paper's piecewise polynomial warmup-then-decay schedule.

    eta_t = init + (peak - init) * (t / W)^p_warmup              for t <= W
    eta_t = end + (peak - end) * ((T - t) / (T - W))^p_decay     for W < t < T
    eta_t = end                                                   for t >= T

    Unlike init2winit's mlperf_polynomial (which divides by T - W + 1) and a
    warmup built from optax.polynomial_schedule (whose power acts on the
    distance to the end value), this is the formula of Section 2.1.4 exactly.

    Args:
      init_value: eta_init, the rate at step 0.
      peak_value: eta_peak, reached at step ``warmup_steps``.
      end_value: eta_final, reached at ``total_steps`` and held after it.
      warmup_steps: t_warmup.
      total_steps: T, the step budget.
      warmup_power: p_warmup (1 for LARS, 2 for Nesterov configuration B).
      decay_power: p_decay.

    Returns:
      An optax schedule.

    Example:
      >>> lr = piecewise_polynomial(0.0, 29.0, 1e-4, 706, 2512)
      >>> float(lr(706))
      29.0

    References:
      Nado et al. 2021, Section 2.1.4 (Figure 1, Table 1).
    """
    _check_steps(warmup_steps=warmup_steps, total_steps=total_steps)
    if total_steps < warmup_steps:
        raise ValueError(
            f"total_steps: must be >= warmup_steps ({warmup_steps}), got {total_steps}"
        )
    warmup = float(max(warmup_steps, 1))
    decay = float(max(total_steps - warmup_steps, 1))

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        up_frac = jnp.clip(t / warmup, 0.0, 1.0)
        up = init_value + (peak_value - init_value) * up_frac**warmup_power
        down_frac = jnp.clip((total_steps - t) / decay, 0.0, 1.0)
        down = end_value + (peak_value - end_value) * down_frac**decay_power
        return jnp.where(t <= warmup_steps, up, down)

    return schedule


def bert_legacy(peak_value: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """The schedule of the BERT release, with its drop at the end of warmup.

    lr(t) = peak * t / W                 for t < W
    lr(t) = peak * (1 - min(t, N) / N)   for t >= W

    The linear decay is measured from step 0, not from W, so the peak is never
    reached and the rate drops from peak*(W-1)/W to peak*(1-W/N) at t = W. This
    is a named legacy variant for reproducing old results, never a default.

    Args:
      peak_value: the BERT ``init_lr``.
      warmup_steps: W (``num_warmup_steps``).
      total_steps: N (``num_train_steps``).

    Returns:
      An optax schedule.

    Example:
      >>> lr = bert_legacy(1.0, 20, 100)
      >>> [round(float(lr(t)), 2) for t in (19, 20, 21)]
      [0.95, 0.8, 0.79]

    References:
      google-research/bert optimization.py; Nado et al. 2021, Section 3 and Figure 2.
    """
    _check_steps(warmup_steps=warmup_steps, total_steps=total_steps)
    if total_steps == 0:
        raise ValueError("total_steps: must be > 0 for bert_legacy")
    warmup = float(max(warmup_steps, 1))

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        up = peak_value * t / warmup
        down = peak_value * (1.0 - jnp.minimum(t, total_steps) / total_steps)
        return jnp.where(t < warmup_steps, up, down)

    return schedule


def cosine(
    peak_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    init_value: float = 0.0,
    end_value: float = 0.0,
) -> optax.Schedule:
    """Optional linear warmup, then cosine decay to ``end_value`` at ``total_steps``.

    Args:
      peak_value: the rate after warmup (the paper's eta in Table 8).
      total_steps: the step at which ``end_value`` is reached and held.
      warmup_steps: linear warmup length from ``init_value``; 0 for none.
      init_value: the rate at step 0 when warming up.
      end_value: the final rate.

    Returns:
      An optax schedule.

    References:
      Nado et al. 2021, Section 4 (Table 4, Table 8).
    """
    _check_steps(warmup_steps=warmup_steps, total_steps=total_steps)
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps: must be > warmup_steps ({warmup_steps}), got {total_steps}"
        )
    # alpha = end / peak, 0 for a zero peak (as optax's warmup_cosine_decay_schedule), decided
    # without comparing a value that may be traced (see batchlab.optim.config.optimizer_arguments).
    alpha = 0.0 if _is_zero(peak_value) or _is_zero(end_value) else end_value / peak_value
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(peak_value, total_steps, alpha=alpha)
    return optax.join_schedules(
        [
            optax.linear_schedule(init_value, peak_value, warmup_steps),
            optax.cosine_decay_schedule(peak_value, total_steps - warmup_steps, alpha=alpha),
        ],
        [warmup_steps],
    )


def linear_decay(init_value: float, total_steps: int, decay_factor: float) -> optax.Schedule:
    """Linear decay from eta_0 to eta_0 * decay_factor over ``total_steps``, then held.

    Args:
      init_value: eta_0.
      total_steps: the number of decay steps (the whole run in Table 9, t_decay in Table 11).
      decay_factor: eta_decay_factor; the final rate is init_value * decay_factor.

    Returns:
      An optax schedule.

    References:
      Nado et al. 2021, Appendix D.4, Tables 9-11.
    """
    _check_steps(total_steps=total_steps)
    return optax.linear_schedule(init_value, init_value * decay_factor, total_steps)


def warmup_decay_to_constant(
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    decay_factor: float,
    power: float = 2.0,
    init_value: float = 0.0,
) -> optax.Schedule:
    """Linear warmup, polynomial (quadratic) decay until ``decay_steps``, then constant.

    The final constant is peak_value * decay_factor. ``decay_steps`` (t_decay) is
    counted from step 0, as in the paper's tables.

    Args:
      peak_value: eta_peak, reached at ``warmup_steps``.
      warmup_steps: linear warmup length (500 in Tables 12-19).
      decay_steps: t_decay, the step where the decay ends.
      decay_factor: eta_decay_factor.
      power: the decay polynomial power (2: quadratic).
      init_value: the rate at step 0.

    Returns:
      An optax schedule.

    References:
      Nado et al. 2021, Appendix D.4, Tables 12-19.
    """
    return piecewise_polynomial(
        init_value,
        peak_value,
        peak_value * decay_factor,
        warmup_steps,
        decay_steps,
        warmup_power=1.0,
        decay_power=power,
    )
