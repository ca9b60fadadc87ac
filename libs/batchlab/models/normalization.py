"""Virtual ("ghost") batch normalisation.

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check", Section 2.1.2 and footnote 12:
  the LARS pipeline normalises over sub-batches of 64 examples ("virtual batch size") so that the
  training objective does not change with the batch size.
  Hoffer et al. 2017, "Train longer, generalize better" (ghost batch norm).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import unfreeze
from jax import lax

Dtype = Any
Initializer = Any

#: The collection in which training-mode VirtualBatchNorm layers record their batch's moments
#: ("mean", "var") and running-average "momentum" when it is mutable.
MOMENTS = "batch_moments"


def _none() -> None:
    return None


def _last(_previous: Any, value: Any) -> Any:
    return value


def combine_running_statistics(batch_stats: Any, moments: Sequence[Any]) -> Any:
    """The running statistics after one update from a batch seen as equal-sized microbatches.

    Each element of ``moments`` is the ``MOMENTS`` collection of one microbatch's forward pass
    from the same ``batch_stats``. The batch mean is the mean of the microbatches' means and the
    batch variance is the mean of their variances plus the variance of their means (the law of
    total variance over equal parts), so the result is what one forward pass over the whole
    batch would have stored, up to float rounding: with virtual-batch BN the sub-batches, and
    so the normalisation itself, are the same either way.

    Args:
      batch_stats: the running statistics before the step ({..., "mean", "var"} per layer).
      moments: one ``MOMENTS`` collection per microbatch, all of the same structure.

    Returns:
      ``batch_stats`` with every layer that recorded moments updated once.
    """
    parts = [unfreeze(m) for m in moments]
    if "momentum" in parts[0] and not isinstance(parts[0]["momentum"], Mapping):
        m = parts[0]["momentum"]
        means = jnp.stack([p["mean"] for p in parts])
        batch_mean = jnp.mean(means, axis=0)
        batch_var = jnp.mean(jnp.stack([p["var"] for p in parts]), axis=0) + jnp.mean(
            jnp.square(means - batch_mean), axis=0
        )
        return {
            "mean": (m * batch_stats["mean"] + (1.0 - m) * batch_mean).astype(batch_stats["mean"].dtype),
            "var": (m * batch_stats["var"] + (1.0 - m) * batch_var).astype(batch_stats["var"].dtype),
        }
    return {
        name: combine_running_statistics(value, [p[name] for p in parts]) if name in parts[0] else value
        for name, value in batch_stats.items()
    }


class VirtualBatchNorm(nn.Module):
    """Batch norm whose training statistics come from fixed-size sub-batches of the device batch.

    In training mode the leading (batch) axis is split into consecutive sub-batches of
    ``virtual_batch_size`` examples and each sub-batch is normalised with its own mean and variance,
    taken over every axis except the last (feature) axis. The running statistics used in evaluation
    follow the MLPerf-derived LARS pipeline: the batch mean is the mean of the sub-batch means and
    the batch variance is ``mean(E_sub[x^2]) - mean(E_sub[x])^2``, which is the variance of the
    whole device batch (not the mean of the sub-batch variances). Then
    ``running = momentum * running + (1 - momentum) * batch``.

    Parameters live in ``params`` as ``scale`` and ``bias``; running statistics live in
    ``batch_stats`` as ``mean`` and ``var``. Running statistics are never updated while the module
    is being initialised.

    Attributes:
      virtual_batch_size: examples per normalisation sub-batch; None normalises the whole batch
        (plain batch norm). The batch must be divisible by it in training mode.
      momentum: decay of the running statistics (the paper's rho; 0.9 in the LARS pipeline).
      epsilon: added to the variance (1e-5 in the LARS pipeline).
      use_running_average: evaluate with the running statistics; may be given here or in
        ``__call__`` (not both).
      scale_init: initialiser of ``scale`` (the paper's gamma_0 for the last BN of a residual block).
      bias_init: initialiser of ``bias`` (beta, 0.0 in the paper).
      dtype: dtype of the output; None infers it from the input and the parameters.
      param_dtype: dtype of ``scale``, ``bias`` and the running statistics.
      axis_name: a mapped axis (pmap, shard_map, vmap) over which to average the statistics. The
        sub-batch ``k`` of every device is pooled with the sub-batch ``k`` of the others, so the
        effective virtual batch is ``virtual_batch_size`` times the number of devices. Not needed
        under plain ``jit`` with a sharded global batch: there the sub-batches are consecutive
        slices of the global batch and do not depend on the device count.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> bn = VirtualBatchNorm(virtual_batch_size=2)
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> variables = bn.init(jax.random.key(0), x, use_running_average=False)
      >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
      >>> y.shape
      (4, 3)
    """

    virtual_batch_size: int | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    use_running_average: bool | None = None
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Normalises ``x`` of shape (batch, ..., features).

        Args:
          x: input; the last axis holds the features.
          use_running_average: overrides the attribute of the same name.

        Returns:
          The normalised, scaled and shifted input, of the same shape.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
        ra_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((features,), self.param_dtype)
        )
        ra_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((features,), self.param_dtype)
        )

        out_dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        # Statistics in float32 at least: bfloat16 sums over a sub-batch lose too many bits.
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(stat_dtype)

        if use_running_average:
            y = (xf - ra_mean.value) * lax.rsqrt(ra_var.value + self.epsilon)
            normalised: jax.Array = (y * scale + bias).astype(out_dtype)
            return normalised

        groups = self._split_into_sub_batches(xf)
        reduce_axes = tuple(range(1, groups.ndim - 1))
        sub_mean = jnp.mean(groups, axis=reduce_axes, keepdims=True)
        # Two-pass (centred) variance: E[x^2] - E[x]^2 cancels badly when |mean| >> std, which is
        # common after a convolution; the running update below is rebuilt from these exactly.
        sub_var = jnp.mean(jnp.square(groups - sub_mean), axis=reduce_axes, keepdims=True)
        if self.axis_name is not None and not self.is_initializing():
            local_mean = sub_mean
            sub_mean = lax.pmean(local_mean, self.axis_name)
            # Law of total variance over equal-sized shards (stable, unlike pooling E[x^2]).
            sub_var = lax.pmean(sub_var + jnp.square(local_mean - sub_mean), self.axis_name)

        y = (groups - sub_mean) * lax.rsqrt(sub_var + self.epsilon)
        y = y.reshape(x.shape) * scale + bias

        if not self.is_initializing():
            # MLPerf LARS pipeline: batch mean = mean of sub-batch means, batch var =
            # mean(E_sub[x^2]) - batch_mean^2. With equal sub-batches that equals
            # mean(sub_var) + var(sub_means), the form used here to avoid cancellation.
            means = sub_mean.reshape(-1, features)
            variances = sub_var.reshape(-1, features)
            batch_mean = jnp.mean(means, axis=0)
            batch_var = jnp.mean(variances, axis=0) + jnp.mean(
                jnp.square(means - batch_mean), axis=0
            )
            m = self.momentum
            ra_mean.value = (m * ra_mean.value + (1.0 - m) * batch_mean).astype(self.param_dtype)
            ra_var.value = (m * ra_var.value + (1.0 - m) * batch_var).astype(self.param_dtype)
            # For gradient accumulation (batchlab.train.steps.make_gradient_step): this batch's
            # moments, so that one running update over several microbatches can be made
            # (combine_running_statistics). A no-op unless the collection is mutable.
            self.sow(MOMENTS, "mean", batch_mean, init_fn=_none, reduce_fn=_last)
            self.sow(MOMENTS, "var", batch_var, init_fn=_none, reduce_fn=_last)
            self.sow(MOMENTS, "momentum", jnp.asarray(m, stat_dtype), init_fn=_none, reduce_fn=_last)
        normalised_batch: jax.Array = y.astype(out_dtype)
        return normalised_batch

    def _split_into_sub_batches(self, x: jax.Array) -> jax.Array:
        """Reshapes (batch, ...) to (num_sub_batches, virtual_batch_size, ...)."""
        batch = x.shape[0]
        size = self.virtual_batch_size or batch
        if batch % size != 0:
            if self.is_initializing():
                # Flax convention is to init on a single dummy example; its statistics are
                # thrown away, so one group of the whole batch is harmless here.
                size = batch
            else:
                raise ValueError(
                    f"VirtualBatchNorm: the batch size {batch} is not divisible by "
                    f"virtual_batch_size={self.virtual_batch_size}; use a per-device batch that "
                    "is a multiple of virtual_batch_size, or virtual_batch_size=None."
                )
        return x.reshape((batch // size, size) + x.shape[1:])
