"""train_step and eval_step: pure functions of (state, batch), jitted by the loop."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from batchlab.models import MOMENTS, combine_running_statistics
from batchlab.train.workloads import Workload, classification_loss

__all__ = [
    "TrainState",
    "eval_step",
    "make_apply_step",
    "make_eval_step",
    "make_gradient_step",
    "make_train_step",
]

Batch = Mapping[str, jax.Array]
# {'loss': (weighted sum, total weight), ...}: what eval steps add up across batches.
Sums = dict[str, tuple[jax.Array, jax.Array]]


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training and is checkpointed."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def _forward(
    workload: Workload,
    model: nn.Module,
    variables: Mapping[str, Any],
    batch: Batch,
    *,
    train: bool,
    rng: jax.Array | None = None,
    collections: Sequence[str] = ("batch_stats",),
) -> tuple[Any, Mapping[str, Any]]:
    """Model outputs, and in training the updated ``collections``, for one batch."""
    if workload.kind == "classification":
        mutable = list(collections) if train else False
        out = model.apply(variables, batch["input"], train=train, mutable=mutable)
        logits, updates = out if train else (out, {})
        return logits, updates
    rngs = {"dropout": rng} if train and rng is not None else {}
    logits = model.apply(
        variables,
        batch["input_ids"],
        batch["segment_ids"],
        batch["input_mask"],
        batch["masked_lm_positions"],
        train=train,
        rngs=rngs,
    )
    return logits, {}


def _metrics(
    workload: Workload,
    hparams: Mapping[str, Any],
    outputs: Any,
    batch: Batch,
    weights: jax.Array | None,
) -> Sums:
    """Weighted sums: {'loss': (sum, count), ...}; the loss includes no regulariser."""
    if workload.kind == "classification":
        per_example, correct, w = classification_loss(
            outputs,
            batch["label"],
            num_classes=outputs.shape[-1],
            label_smoothing=hparams["label_smoothing"],
            weights=weights,
        )
        return {
            "loss": (jnp.sum(per_example * w), jnp.sum(w)),
            "accuracy": (jnp.sum(correct * w), jnp.sum(w)),
        }
    mlm_logits, nsp_logits = outputs
    mlm_w = batch["masked_lm_weights"].astype(jnp.float32)
    if weights is not None:
        mlm_w = mlm_w * weights[:, None]
    mlm_xent = optax.softmax_cross_entropy_with_integer_labels(
        mlm_logits.astype(jnp.float32), batch["masked_lm_ids"]
    )
    mlm_correct = (jnp.argmax(mlm_logits, -1) == batch["masked_lm_ids"]).astype(jnp.float32)
    ex_w = jnp.ones(nsp_logits.shape[0]) if weights is None else weights
    nsp_xent = optax.softmax_cross_entropy_with_integer_labels(
        nsp_logits.astype(jnp.float32), batch["next_sentence_label"]
    )
    nsp_correct = (jnp.argmax(nsp_logits, -1) == batch["next_sentence_label"]).astype(jnp.float32)
    mlm_count = jnp.maximum(jnp.sum(mlm_w), 1.0)
    nsp_count = jnp.sum(ex_w)
    # BERT's pretraining loss: mean masked-LM loss + mean next-sentence loss.
    total = jnp.sum(mlm_xent * mlm_w) / mlm_count + jnp.sum(nsp_xent * ex_w) / jnp.maximum(nsp_count, 1.0)
    return {
        "loss": (total * nsp_count, nsp_count),
        "mlm_loss": (jnp.sum(mlm_xent * mlm_w), mlm_count),
        "mlm_accuracy": (jnp.sum(mlm_correct * mlm_w), mlm_count),
        "nsp_accuracy": (jnp.sum(nsp_correct * ex_w), nsp_count),
    }


def _step(
    optimizer: optax.GradientTransformation, state: TrainState, grads: Any, batch_stats: Any, sums: Sums
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step from the batch's gradient; the batch's mean metrics."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, {k: s / jnp.maximum(c, 1.0) for k, (s, c) in sums.items()}


def make_train_step(
    workload: Workload,
    hparams: Mapping[str, Any],
    model: nn.Module,
    optimizer: optax.GradientTransformation,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """A ``train_step(state, batch) -> (state, metrics)`` for jit.

    The gradient is of the mean unregularised loss; L2 and weight decay live in the
    optimizer, per parameter group. Virtual-batch BN statistics are updated in
    ``batch_stats``. The returned metrics are batch means (loss, accuracy).
    """

    def loss_fn(
        params: Any, state: TrainState, batch: Batch, rng: jax.Array
    ) -> tuple[jax.Array, tuple[Any, Sums]]:
        variables = {"params": params}
        if state.batch_stats is not None:
            variables["batch_stats"] = state.batch_stats
        outputs, updates = _forward(workload, model, variables, batch, train=True, rng=rng)
        sums = _metrics(workload, hparams, outputs, batch, None)
        loss = sums["loss"][0] / sums["loss"][1]
        return loss, (updates.get("batch_stats", state.batch_stats), sums)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        grads, (batch_stats, sums) = jax.grad(loss_fn, has_aux=True)(state.params, state, batch, rng)
        return _step(optimizer, state, grads, batch_stats, sums)

    return train_step


#: One microbatch's share of a step: (the running sum of the microbatches' gradients up to and
#: including this one, this microbatch's BN moments, its metric sums).
Part = tuple[Any, Any, Sums]


def make_gradient_step(
    workload: Workload, hparams: Mapping[str, Any], model: nn.Module
) -> Callable[[TrainState, Batch, Any], Part]:
    """A ``gradient_step(state, microbatch, total) -> (total + grads, moments, sums)`` for jit.

    Gradient accumulation: a batch too large to run well in one pass (on this CPU, more than
    512 examples of mnist1d_resnet1d cost 1.8x more per example) is run as equal microbatches,
    each by this step from the same state, adding its gradient to the running sum ``total``
    (None for the first), and
    :func:`make_apply_step` makes one optimizer step of the mean. Only the sum is kept, so
    memory holds one gradient whatever the number of microbatches. With virtual-batch BN
    whose sub-batches each lie inside one microbatch, every example is normalised with the
    same statistics as in one pass, and the running statistics get one update from the whole
    batch's moments (``combine_running_statistics``), so the two compute the same function up
    to float rounding. Classification workloads only (no dropout key is split across
    microbatches).
    """
    if workload.kind != "classification":
        raise ValueError(f"gradient accumulation is for classification workloads, not {workload.kind!r}")

    def loss_fn(params: Any, state: TrainState, batch: Batch) -> tuple[jax.Array, tuple[Any, Sums]]:
        variables = {"params": params}
        if state.batch_stats is not None:
            variables["batch_stats"] = state.batch_stats
        outputs, updates = _forward(workload, model, variables, batch, train=True,
                                    collections=("batch_stats", MOMENTS))
        sums = _metrics(workload, hparams, outputs, batch, None)
        return sums["loss"][0] / sums["loss"][1], (updates.get(MOMENTS, {}), sums)

    def gradient_step(state: TrainState, batch: Batch, total: Any) -> Part:
        grads, (moments, sums) = jax.grad(loss_fn, has_aux=True)(state.params, state, batch)
        if total is not None:
            grads = jax.tree.map(jnp.add, total, grads)
        return grads, moments, sums

    return gradient_step


def make_apply_step(
    optimizer: optax.GradientTransformation,
) -> Callable[[TrainState, Any, Sequence[Any], Sequence[Sums]], tuple[TrainState, dict[str, jax.Array]]]:
    """An ``apply_step(state, total, moments, sums) -> (state, metrics)`` for jit: one optimizer
    step from a batch's equal-sized microbatches, given the sum of their gradients and each
    one's BN moments and metric sums from :func:`make_gradient_step` (the mean of their
    gradients is the gradient of the batch's mean loss)."""

    def apply_step(
        state: TrainState, total: Any, moments: Sequence[Any], sums: Sequence[Sums]
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        k = len(sums)
        grads = jax.tree.map(lambda g: g / k, total)
        batch_stats = state.batch_stats
        if batch_stats is not None and moments[0]:
            batch_stats = combine_running_statistics(batch_stats, list(moments))
        summed: Sums = {
            name: (functools.reduce(operator.add, [s[name][0] for s in sums]),
                   functools.reduce(operator.add, [s[name][1] for s in sums]))
            for name in sums[0]
        }
        return _step(optimizer, state, grads, batch_stats, summed)

    return apply_step


def make_eval_step(
    workload: Workload, hparams: Mapping[str, Any], model: nn.Module
) -> Callable[[TrainState, Batch], Sums]:
    """An ``eval_step(state, batch) -> {name: (weighted sum, weight)}`` for jit (eval-mode BN)."""

    def eval_step(state: TrainState, batch: Batch) -> Sums:
        variables = {"params": state.params}
        if state.batch_stats is not None:
            variables["batch_stats"] = state.batch_stats
        outputs, _ = _forward(workload, model, variables, batch, train=False)
        weights = batch.get("mask")
        weights = None if weights is None else weights.astype(jnp.float32)
        return _metrics(workload, hparams, outputs, batch, weights)

    return eval_step


eval_step = make_eval_step
