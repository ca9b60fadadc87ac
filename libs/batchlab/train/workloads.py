"""Workloads: a dataset, a model and a loss, chosen by registered name.

A workload turns the trial's workload hyperparameters (label smoothing tau, gamma_0,
BN rho and epsilon, virtual batch size, ...) into a model and a loss. Unknown
hyperparameters are errors naming the field, so a typo in a spec never silently
trains the default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from batchlab import models
from batchlab.workloads import (
    BERT_HYPERPARAMETERS,
    RESNET_HYPERPARAMETERS,
    metrics_of_kind,
    resolve_hyperparameters,
)

__all__ = ["WORKLOADS", "Workload", "get_workload", "workload_names"]


@dataclasses.dataclass(frozen=True)
class Workload:
    """One trainable workload.

    Attributes:
      name: registered name (what an experiment spec names).
      dataset: a name of :func:`batchlab.data.list_datasets`.
      dataset_config: the offline builder config (None: the dataset's default).
      kind: "classification" or "mlm" (masked LM + next sentence).
      model_name: a name of :func:`batchlab.models.get_model`.
      model_kwargs: fixed model arguments.
      defaults: the workload hyperparameters a spec may override, with their defaults.
      target_metric: the metric a study usually targets.
      eval_batch_size: batch size of evaluation passes.
      train_eval_examples: training examples evaluated (in eval mode) at each evaluation.
      validation_examples: validation examples evaluated (None: the whole split).
      dataset_kwargs: extra arguments of :func:`batchlab.data.input_pipeline`.
      description: one line.
    """

    name: str
    dataset: str
    kind: str
    model_name: str
    model_kwargs: Mapping[str, Any]
    defaults: Mapping[str, Any]
    target_metric: str = "validation/accuracy"
    dataset_config: str | None = None
    eval_batch_size: int = 1000
    train_eval_examples: int = 10_000
    validation_examples: int | None = None
    dataset_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""

    def hyperparameters(self, overrides: Mapping[str, Any] | None, path: str = "workload") -> dict[str, Any]:
        """The defaults with ``overrides`` applied; unknown names raise ValueError naming the field."""
        return resolve_hyperparameters(self.name, self.defaults, overrides, path)

    @property
    def metrics(self) -> frozenset[str]:
        """Every metric an evaluation point reports (declared in batchlab.workloads)."""
        return metrics_of_kind(self.kind)

    def model(
        self, hparams: Mapping[str, Any], *, dtype: Any = jnp.float32, **extra: Any
    ) -> nn.Module:
        """The flax module for these hyperparameters (``extra``: e.g. the tokenizer's vocab_size)."""
        kwargs = {**self.model_kwargs, **extra}
        if self.kind == "classification":
            kwargs.update(
                gamma_0=hparams["gamma_0"],
                virtual_batch_size=hparams["virtual_batch_size"] or None,
                bn_momentum=hparams["bn_momentum"],
                bn_epsilon=hparams["bn_epsilon"],
                dtype=dtype,
            )
        else:
            kwargs.update(dropout_rate=hparams["dropout_rate"], dtype=dtype)
        return models.get_model(self.model_name, **kwargs)

    def dummy_batch(
        self, batch_size: int, input_shape: tuple[int, ...], hparams: Mapping[str, Any]
    ) -> dict[str, jax.Array]:
        """A zero batch with the right shapes, to initialise the model."""
        if self.kind == "classification":
            return {"input": jnp.zeros((batch_size, *input_shape), jnp.float32)}
        seq = int(hparams["max_seq_length"])
        preds = int(hparams["max_predictions_per_seq"])
        ids = jnp.zeros((batch_size, seq), jnp.int32)
        return {
            "input_ids": ids,
            "segment_ids": ids,
            "input_mask": jnp.ones_like(ids),
            "masked_lm_positions": jnp.zeros((batch_size, preds), jnp.int32),
        }


def classification_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    label_smoothing: float,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean softmax cross entropy with label smoothing, and the accuracy (per-example weights)."""
    one_hot = jax.nn.one_hot(labels, num_classes)
    targets = optax.smooth_labels(one_hot, label_smoothing) if label_smoothing else one_hot
    per_example = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    if weights is None:
        weights = jnp.ones_like(per_example)
    return per_example, correct, weights


_RESNET_DEFAULTS = RESNET_HYPERPARAMETERS
_BERT_DEFAULTS = BERT_HYPERPARAMETERS

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            name="mnist1d_resnet1d",
            dataset="mnist1d",
            kind="classification",
            model_name="resnet1d",
            model_kwargs={"num_classes": 10, "num_filters": 16, "stage_sizes": (1, 1, 1)},
            defaults={**_RESNET_DEFAULTS, "virtual_batch_size": 32},
            eval_batch_size=2000,
            train_eval_examples=10_000,
            description="1-D ResNet (16 channels, 3 residual stages, virtual-batch BN) on MNIST-1D, 40k/10k.",
        ),
        Workload(
            name="mnist1d_resnet1d_small",
            dataset="mnist1d",
            dataset_config="small",
            kind="classification",
            model_name="resnet1d",
            model_kwargs={"num_classes": 10, "num_filters": 8, "stage_sizes": (1, 1)},
            defaults={**_RESNET_DEFAULTS, "virtual_batch_size": 16},
            eval_batch_size=500,
            train_eval_examples=1000,
            description="A tiny MNIST-1D workload for tests and demos.",
        ),
        Workload(
            name="digits_resnet20",
            dataset="digits",
            kind="classification",
            model_name="resnet20",
            model_kwargs={"num_classes": 10},
            defaults={**_RESNET_DEFAULTS, "virtual_batch_size": 32},
            eval_batch_size=512,
            train_eval_examples=1438,
            description="CIFAR-style ResNet-20 on scikit-learn's 8x8 digits.",
        ),
        Workload(
            name="imagenet_resnet50",
            dataset="imagenet2012",
            kind="classification",
            model_name="resnet50",
            model_kwargs={"num_classes": 1000},
            defaults=dict(_RESNET_DEFAULTS),
            eval_batch_size=1024,
            train_eval_examples=50_000,
            description="ResNet-50 v1.5 on ImageNet with MLPerf preprocessing (Section 2, Appendix B.1).",
        ),
        Workload(
            name="mlm_tiny_bert",
            dataset="mlm_corpus",
            kind="mlm",
            model_name="bert_tiny",
            model_kwargs={},
            defaults=dict(_BERT_DEFAULTS),
            target_metric="validation/mlm_accuracy",
            eval_batch_size=128,
            train_eval_examples=256,
            validation_examples=512,
            description="Tiny BERT (2 layers, d 128) masked-LM + NSP on the local stdlib corpus.",
        ),
        Workload(
            name="bert_large_phase1",
            dataset="bert_pretraining",
            kind="mlm",
            model_name="bert_large",
            model_kwargs={},
            defaults=dict(_BERT_DEFAULTS),
            target_metric="validation/mlm_accuracy",
            description="BERT-Large pretraining phase 1, sequence length 128 (Section 3).",
        ),
        Workload(
            name="bert_large_phase2",
            dataset="bert_pretraining",
            kind="mlm",
            model_name="bert_large",
            model_kwargs={},
            defaults={**_BERT_DEFAULTS, "max_seq_length": 512, "max_predictions_per_seq": 80},
            target_metric="validation/mlm_accuracy",
            description="BERT-Large pretraining phase 2, sequence length 512 (Section 3).",
        ),
    ]
}


def workload_names() -> list[str]:
    """The registered workload names."""
    return sorted(WORKLOADS)


def get_workload(name: str, path: str = "workload") -> Workload:
    """The workload registered under ``name``; ValueError listing the names otherwise."""
    if name not in WORKLOADS:
        raise ValueError(f"{path}: unknown workload {name!r}; allowed: {workload_names()}")
    return WORKLOADS[name]


LossFn = Callable[..., Any]
