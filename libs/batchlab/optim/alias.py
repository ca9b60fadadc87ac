"""The named optimizers of the paper, each a readable chain of blocks.

Conventions shared by every optimizer here:
  * ``learning_rate`` is a float or an optax schedule (see :mod:`batchlab.optim.schedules`).
  * Nesterov, heavy ball, SGD and LARS take ``weight_decay`` as L2: it is added to the
    gradient before momentum (the same as an L2 term (wd/2)*||w||^2 in the loss).
  * Adam and LAMB take ``weight_decay`` as decoupled decay (AdamW): wd*w is added to the
    Adam direction, after the moments, and scaled by the learning rate.
  * Bias and batch-norm parameters are handled apart with :func:`batchlab.optim.grouped`.
"""

from __future__ import annotations

import jax
import optax

from batchlab.optim import transforms

__all__ = ["adam", "heavy_ball", "lamb", "lars", "nesterov", "sgd"]

ScalarOrSchedule = float | optax.Schedule


def _l2(weight_decay: float) -> list[optax.GradientTransformation]:
    return [] if transforms.is_zero(weight_decay) else [optax.add_decayed_weights(weight_decay)]


# The checks below pass over traced values: batchlab.optim.config.optimizer_arguments checks the
# concrete values once before it builds an optimizer from traced ones.
def _check_unit_interval(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, jax.core.Tracer):
            continue
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}: must be in [0, 1), got {value}")


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, jax.core.Tracer):
            continue
        if value < 0:
            raise ValueError(f"{name}: must be >= 0, got {value}")


def nesterov(
    learning_rate: ScalarOrSchedule, *, momentum: float = 0.9, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """Nesterov momentum: v <- mu*v + g; theta <- theta - eta_t * (mu*v + g).

    Args:
      learning_rate: eta_t, a float or a schedule.
      momentum: mu.
      weight_decay: L2 coefficient, added to the gradient before momentum.

    Returns:
      An optax GradientTransformation.

    Example:
      >>> import jax.numpy as jnp
      >>> opt = nesterov(0.1, momentum=0.9)
      >>> state = opt.init(jnp.ones(()))
      >>> updates, state = opt.update(jnp.ones(()), state)
      >>> round(float(1.0 + updates), 4)
      0.81

    References:
      Nado et al. 2021, Section 2.1.1; Sutskever et al. 2013.
    """
    _check_unit_interval(momentum=momentum)
    _check_non_negative(weight_decay=weight_decay)
    return optax.chain(
        *_l2(weight_decay),
        optax.trace(decay=momentum, nesterov=True),
        optax.scale_by_learning_rate(learning_rate),
    )


def heavy_ball(
    learning_rate: ScalarOrSchedule, *, momentum: float = 0.9, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """Classical (heavy-ball) momentum: v <- mu*v + g; theta <- theta - eta_t * v.

    Args:
      learning_rate: eta_t, a float or a schedule.
      momentum: mu.
      weight_decay: L2 coefficient, added to the gradient before momentum.

    Returns:
      An optax GradientTransformation.

    References:
      Polyak 1964; Nado et al. 2021, Section 2.1.1.
    """
    _check_unit_interval(momentum=momentum)
    _check_non_negative(weight_decay=weight_decay)
    return optax.chain(
        *_l2(weight_decay),
        optax.trace(decay=momentum, nesterov=False),
        optax.scale_by_learning_rate(learning_rate),
    )


def sgd(learning_rate: ScalarOrSchedule, *, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Plain SGD with optional L2.

    Args:
      learning_rate: a float or a schedule.
      weight_decay: L2 coefficient.

    Returns:
      An optax GradientTransformation.
    """
    _check_non_negative(weight_decay=weight_decay)
    return optax.chain(*_l2(weight_decay), optax.scale_by_learning_rate(learning_rate))


def lars(
    learning_rate: ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    variant: str = "mlperf",
) -> optax.GradientTransformation:
    """LARS, in the MLPerf v0.7 form (default) or the optax form.

    variant="mlperf" (the paper's LARS pipeline, flax.optim.LARS):
      ratio = eta*||w|| / (||g|| + wd*||w|| + eps);  v <- mu*v + lr*ratio*(g + wd*w);  w <- w - v.
    variant="optax" (identical to optax.lars):
      u = g + wd*w;  ratio = eta*||w|| / (||u|| + eps);  v <- mu*v + lr*ratio*u;  w <- w - v.
    Both apply the learning rate before momentum and use ratio = 1 where a norm is zero.
    Apply LARS to weights only, and heavy ball to biases and BN parameters, with
    :func:`batchlab.optim.grouped` to reproduce the paper's pipeline.

    Args:
      learning_rate: a float or a schedule.
      weight_decay: L2 coefficient folded into the trust ratio.
      trust_coefficient: eta (0.001).
      eps: added to the trust-ratio denominator.
      momentum: mu (the paper's LARS pipeline: 1 - 0.071 = 0.929).
      nesterov: use Nesterov momentum.
      variant: "mlperf" or "optax".

    Returns:
      An optax GradientTransformation.

    References:
      You et al. 2017; mlcommons/training_results_v0.7; Nado et al. 2021, Sections 2 and 4.
    """
    _check_unit_interval(momentum=momentum)
    _check_non_negative(weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps)
    if variant == "mlperf":
        trust = [
            transforms.scale_by_lars(
                trust_coefficient=trust_coefficient, weight_decay=weight_decay, eps=eps
            )
        ]
    elif variant == "optax":
        trust = [
            *_l2(weight_decay),
            transforms.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps),
        ]
    else:
        raise ValueError(f"variant: must be one of ['mlperf', 'optax'], got {variant!r}")
    return optax.chain(
        *trust,
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum, nesterov=nesterov),
    )


def lamb(
    learning_rate: ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """LAMB: bias-corrected Adam direction plus decoupled decay, scaled by a layer-wise trust ratio.

    r = m_hat / (sqrt(v_hat) + eps) + wd*w;  ratio = ||w|| / ||r|| (1 where a norm is 0);
    w <- w - lr * ratio * r. No phi clipping.

    Args:
      learning_rate: a float or a schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: 1e-6 by default, as in LAMB's code (the paper notes eps matters).
      weight_decay: decoupled decay coefficient.

    Returns:
      An optax GradientTransformation.

    References:
      You et al. 2019; tensorflow/addons lamb.py; Nado et al. 2021, Section 4.
    """
    _check_unit_interval(b1=b1, b2=b2)
    _check_non_negative(weight_decay=weight_decay, eps=eps)
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        *_l2(weight_decay),
        transforms.scale_by_trust_ratio(trust_coefficient=1.0),
        optax.scale_by_learning_rate(learning_rate),
    )


def adam(
    learning_rate: ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    bias_correction: bool = True,
) -> optax.GradientTransformation:
    """Adam with decoupled weight decay (AdamW); ``bias_correction=False`` is BERT's legacy Adam.

    update = m_hat / (sqrt(v_hat) + eps) + wd*w;  w <- w - lr * update.
    With bias_correction=False, m and v replace m_hat and v_hat (the BERT release's
    AdamWeightDecayOptimizer). That variant exists to reproduce old results only.

    Args:
      learning_rate: a float or a schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to sqrt(v_hat).
      weight_decay: decoupled decay coefficient.
      bias_correction: False for the BERT release's variant.

    Returns:
      An optax GradientTransformation.

    References:
      Kingma & Ba 2015; Loshchilov & Hutter 2019; google-research/bert optimization.py;
      Nado et al. 2021, Section 3.
    """
    _check_unit_interval(b1=b1, b2=b2)
    _check_non_negative(weight_decay=weight_decay, eps=eps)
    direction = (
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
        if bias_correction
        else transforms.scale_by_adam_no_bias_correction(b1=b1, b2=b2, eps=eps)
    )
    return optax.chain(direction, *_l2(weight_decay), optax.scale_by_learning_rate(learning_rate))
