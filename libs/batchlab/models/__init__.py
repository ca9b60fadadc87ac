"""Flax linen models of the paper's workloads, and a registry to choose them by name.

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check": ResNet-50 v1.5 on ImageNet
  (Section 2) and BERT-Large pretraining (Section 3); the small variants make CPU-scale studies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from batchlab.models.bert import (
    BERT_BASE,
    BERT_LARGE,
    BERT_TINY,
    BertConfig,
    BertEmbeddings,
    BertForPreTraining,
    BertLayer,
    BertModel,
    BertSelfAttention,
)
from batchlab.models.normalization import MOMENTS, VirtualBatchNorm, combine_running_statistics
from batchlab.models.resnet import (
    BasicBlock,
    BottleneckBlock,
    ResNet,
    ResNet1D,
    ResNet18,
    ResNet20,
    ResNet34,
    ResNet50,
)

__all__ = [
    "BERT_BASE",
    "BERT_LARGE",
    "BERT_TINY",
    "BasicBlock",
    "BertConfig",
    "BertEmbeddings",
    "BertForPreTraining",
    "BertLayer",
    "BertModel",
    "BertSelfAttention",
    "BottleneckBlock",
    "MODEL_NAMES",
    "MOMENTS",
    "ResNet",
    "ResNet18",
    "ResNet1D",
    "ResNet20",
    "ResNet34",
    "ResNet50",
    "VirtualBatchNorm",
    "combine_running_statistics",
    "get_model",
]


def _bert(config: BertConfig) -> Callable[..., nn.Module]:
    def build(**overrides: Any) -> nn.Module:
        return BertForPreTraining(dataclasses.replace(config, **overrides))

    return build


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet20": ResNet20,
    "resnet1d": ResNet1D,
    "bert_tiny": _bert(BERT_TINY),
    "bert_base": _bert(BERT_BASE),
    "bert_large": _bert(BERT_LARGE),
}
MODEL_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))


def get_model(name: str, **overrides: Any) -> nn.Module:
    """Builds a registered model, with fields overridden.

    Args:
      name: one of MODEL_NAMES ('bert_base', 'bert_large', 'bert_tiny', 'resnet18', 'resnet1d',
        'resnet20', 'resnet34', 'resnet50').
      **overrides: module fields for the ResNets (e.g. ``num_classes=10``, ``gamma_0=0.0``,
        ``virtual_batch_size=None``, ``dtype=jnp.bfloat16``); BertConfig fields for the BERTs
        (e.g. ``vocab_size=1024``, ``dropout_rate=0.0``).

    Returns:
      An unbound Flax module.

    Raises:
      ValueError: for an unknown name (the message lists the allowed ones).
      TypeError: for an override that is not a field of the model or config.

    Example:
      >>> model = get_model('resnet20', gamma_0=0.0)
      >>> model.gamma_0
      0.0

    References:
      Nado et al. 2021, Sections 2 and 3.
    """
    try:
        build = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; allowed names: {', '.join(MODEL_NAMES)}"
        ) from None
    return build(**overrides)
