"""Parameter groups: weights vs. biases and batch-norm parameters, each with its own optimizer.

The paper's pipelines never apply LARS, LAMB or weight decay to biases and BN
parameters (Section 2.1.3, Table 4). Public code often misses BN layers that are
not auto-named (``bn1``, ``proj_bn``); here a leaf's group follows from what it IS:
rank <= 1 leaves (biases, BN/LayerNorm scales and offsets) and any leaf named
``bias``/``scale`` are "bias_bn", everything else (conv and dense kernels,
embeddings) is "weights". Module names play no part.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import jax
import optax

__all__ = ["BIAS_BN", "GROUPS", "WEIGHTS", "grouped", "param_groups"]

WEIGHTS = "weights"
BIAS_BN = "bias_bn"
GROUPS = (WEIGHTS, BIAS_BN)
_BIAS_BN_NAMES = frozenset({"bias", "scale", "offset", "beta", "gamma"})


def _leaf_name(path: tuple[Any, ...]) -> str:
    if not path:
        return ""
    key = path[-1]
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _label(path: tuple[Any, ...], leaf: Any) -> str:
    # A multi-head attention bias is rank 2 (heads, head_dim): the name catches it.
    if getattr(leaf, "ndim", 0) <= 1 or _leaf_name(path) in _BIAS_BN_NAMES:
        return BIAS_BN
    return WEIGHTS


def param_groups(params: optax.Params) -> Any:
    """Label every leaf of ``params`` "weights" or "bias_bn".

    Args:
      params: any pytree of arrays (or ShapeDtypeStructs), e.g. a flax ``params`` collection.

    Returns:
      A pytree of the same structure holding "weights" or "bias_bn" strings.

    Example:
      >>> import jax.numpy as jnp
      >>> param_groups({"conv": {"kernel": jnp.ones((3, 3, 1, 2))}, "bn1": {"scale": jnp.ones(2)}})
      {'bn1': {'scale': 'bias_bn'}, 'conv': {'kernel': 'weights'}}

    References:
      Nado et al. 2021, Section 2.1.3; mlcommons/training_results_v0.7 (selection by path).
    """
    return jax.tree_util.tree_map_with_path(_label, params)


def grouped(
    *,
    weights: optax.GradientTransformation,
    bias_bn: optax.GradientTransformation,
    labels: Any = None,
) -> optax.GradientTransformation:
    """Apply one transformation to the "weights" group and another to "bias_bn".

    Args:
      weights: the transformation for kernels and embeddings (e.g. LARS with L2).
      bias_bn: the transformation for biases and BN parameters (e.g. heavy ball, no decay).
      labels: optional label tree or function of params; defaults to :func:`param_groups`.

    Returns:
      An optax GradientTransformation (``optax.multi_transform``).

    Example:
      >>> from batchlab.optim import heavy_ball, lars
      >>> opt = grouped(weights=lars(1.0, weight_decay=1e-4), bias_bn=heavy_ball(1.0))
    """
    transforms: Mapping[Hashable, optax.GradientTransformation] = {WEIGHTS: weights, BIAS_BN: bias_bn}
    return optax.multi_transform(transforms, param_groups if labels is None else labels)
