"""What each registered workload declares, importable without JAX: its kind, its
hyperparameters (defaults, kinds, ranges) and the metrics it reports.

The training registry (:mod:`batchlab.train.workloads`) builds models and losses and needs
JAX; the controller installs none, yet it must check a spec's meaning when it is submitted: a
target metric the workload never reports could never be reached, and a hyperparameter of the
wrong kind would only fail on a trainer. So the facts both sides need live here, and
``batchlab.train.workloads`` resolves hyperparameters with :func:`resolve_hyperparameters`
(tests/train/test_workload_declarations.py keeps the two registries equal and checks the
declared metrics against what a real run reports).

Example:
  >>> declared("mnist1d_resnet1d").reports("validation/accuracy")
  True
  >>> problems = check_hyperparameters("mnist1d_resnet1d", {"bn_momentum": "high"})
  >>> problems[0][0]
  'bn_momentum'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from batchlab.errors import FieldError

__all__ = [
    "DECLARATIONS",
    "HyperparameterError",
    "WorkloadDeclaration",
    "check_hyperparameters",
    "microbatch_problem",
    "declared",
    "metrics_of_kind",
    "resolve_hyperparameters",
]

#: Splits every workload evaluates at each evaluation point (batchlab.train.loop.evaluate).
EVAL_SPLITS = ("train", "validation")
#: What an evaluation computes per split, by workload kind (batchlab.train.steps._metrics).
_KIND_METRICS = {
    "classification": ("loss", "accuracy"),
    "mlm": ("loss", "mlm_loss", "mlm_accuracy", "nsp_accuracy"),
}
#: Recorded at every evaluation point besides the split metrics (batchlab.train.loop).
_POINT_METRICS = ("learning_rate", "train/batch_loss")

RESNET_HYPERPARAMETERS: Mapping[str, Any] = {
    "label_smoothing": 0.0,
    "gamma_0": 1.0,
    "virtual_batch_size": 64,
    "bn_momentum": 0.9,
    "bn_epsilon": 1e-5,
    # Train on only the first N examples of the train split (0: all of it), for runs of several
    # epochs over a small training set, where train and validation accuracy separate.
    "train_examples": 0,
    # At most N examples per forward/backward pass (0: the whole batch in one): a larger batch
    # runs as batch/N microbatches whose gradients are averaged into one optimizer step, with
    # one BN running-statistics update from the whole batch. With virtual-batch BN this is the
    # same function up to float rounding (batchlab.train.steps.make_gradient_step); it changes
    # speed and memory only (on this CPU a pass over more than 512 examples of mnist1d_resnet1d
    # costs 1.8x more per example: benchmarks/microbatches.py).
    "microbatch_size": 0,
}
BERT_HYPERPARAMETERS: Mapping[str, Any] = {
    "max_seq_length": 128,
    "max_predictions_per_seq": 20,
    "dropout_rate": 0.1,
}

# Hyperparameters that may be null: a virtual batch of None (or 0) is the whole device batch.
_NULLABLE = frozenset({"virtual_batch_size"})
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "label_smoothing": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "virtual_batch_size": (lambda v: v >= 0, ">= 0 (0 or null: the whole device batch)"),
    "bn_momentum": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "bn_epsilon": (lambda v: v > 0.0, "> 0"),
    "max_seq_length": (lambda v: v >= 5, ">= 5"),  # [CLS] A [SEP] B [SEP]
    "max_predictions_per_seq": (lambda v: v >= 1, ">= 1"),
    "dropout_rate": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "train_examples": (lambda v: v >= 0, ">= 0 (0: the whole train split)"),
    "microbatch_size": (lambda v: v >= 0, ">= 0 (0: the whole batch in one pass)"),
}


class HyperparameterError(FieldError):
    """A workload hyperparameter is unknown, of the wrong kind or out of range.

    Servers map it to INVALID_ARGUMENT naming ``field_path`` (batchlab.rpc.errors.status_for).

    Args:
      field_path: e.g. "workload.bn_momentum".
      reason: what is wrong and what is expected.
    """


def metrics_of_kind(kind: str) -> frozenset[str]:
    """Every metric name a workload of ``kind`` reports at an evaluation point.

    Args:
      kind: "classification" or "mlm".
    """
    names = [f"{split}/{metric}" for split in EVAL_SPLITS for metric in _KIND_METRICS[kind]]
    return frozenset((*names, *_POINT_METRICS))


@dataclasses.dataclass(frozen=True)
class WorkloadDeclaration:
    """What a registered workload is, for checks that must not need JAX.

    Attributes:
      name: the registered name (what a spec's ``workloads[i].workload`` names).
      kind: "classification" or "mlm".
      hyperparameters: the hyperparameters a spec may override, with their defaults (whose
        types are the kinds values must have: bool, int or float).
    """

    name: str
    kind: str
    hyperparameters: Mapping[str, Any]

    @property
    def metrics(self) -> frozenset[str]:
        """Every metric name this workload reports (e.g. "validation/accuracy")."""
        return metrics_of_kind(self.kind)

    def reports(self, metric: str) -> bool:
        """Whether an evaluation point of this workload carries ``metric``."""
        return metric in self.metrics


DECLARATIONS: dict[str, WorkloadDeclaration] = {
    d.name: d
    for d in [
        WorkloadDeclaration("mnist1d_resnet1d", "classification",
                            {**RESNET_HYPERPARAMETERS, "virtual_batch_size": 32}),
        WorkloadDeclaration("mnist1d_resnet1d_small", "classification",
                            {**RESNET_HYPERPARAMETERS, "virtual_batch_size": 16}),
        WorkloadDeclaration("digits_resnet20", "classification",
                            {**RESNET_HYPERPARAMETERS, "virtual_batch_size": 32}),
        WorkloadDeclaration("imagenet_resnet50", "classification", dict(RESNET_HYPERPARAMETERS)),
        WorkloadDeclaration("mlm_tiny_bert", "mlm", dict(BERT_HYPERPARAMETERS)),
        WorkloadDeclaration("bert_large_phase1", "mlm", dict(BERT_HYPERPARAMETERS)),
        WorkloadDeclaration("bert_large_phase2", "mlm",
                            {**BERT_HYPERPARAMETERS, "max_seq_length": 512,
                             "max_predictions_per_seq": 80}),
    ]
}


def declared(name: str) -> WorkloadDeclaration:
    """The declaration of a registered workload.

    Args:
      name: the workload name.

    Raises:
      KeyError: for a name that is not registered.
    """
    return DECLARATIONS[name]


def _convert(path: str, default: Any, value: Any, *, nullable: bool) -> Any:
    """``value`` as the type of ``default``; HyperparameterError naming ``path`` otherwise."""
    if value is None and nullable:
        return None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise HyperparameterError(path, f"must be true or false, got {_short(value)}")
        return value
    # Numbers arrive as floats from JSON and protobuf Structs; bools and strings are mistakes.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise HyperparameterError(path, f"must be a finite number, got {_short(value)}")
    if isinstance(default, int):
        if value != int(value):
            raise HyperparameterError(path, f"must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 64 else f"{text[:64]}... ({type(value).__name__})"


def resolve_hyperparameters(name: str, defaults: Mapping[str, Any],
                            overrides: Mapping[str, Any] | None,
                            path: str = "workload") -> dict[str, Any]:
    """The defaults with ``overrides`` applied, each of the default's kind and in range.

    Args:
      name: the workload name (for messages).
      defaults: the workload's hyperparameters and defaults.
      overrides: values a spec or a search gave.
      path: the field path of the overrides, for messages.

    Raises:
      HyperparameterError: a ValueError naming the field (``<path>.<key>``): unknown, wrong
        kind or out of range.
    """
    if overrides is not None and not isinstance(overrides, Mapping):
        raise HyperparameterError(path, f"must be a mapping of hyperparameters, got "
                                        f"{_short(overrides)}")
    out = dict(defaults)
    for key, value in (overrides or {}).items():
        where = f"{path}.{_short(key)[1:-1] if isinstance(key, str) else key}"
        if key not in defaults:
            raise HyperparameterError(where, f"unknown hyperparameter of workload {name!r}; "
                                             f"allowed: {sorted(defaults)}")
        out[key] = _convert(where, defaults[key], value, nullable=key in _NULLABLE)
    for key, (check, allowed) in _RANGES.items():
        if key in out and out[key] is not None and not check(out[key]):
            raise HyperparameterError(f"{path}.{key}", f"must be {allowed}, got {out[key]!r}")
    return out


def check_hyperparameters(name: str, overrides: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Problems with a spec's workload hyperparameters, as (key, reason) pairs.

    Args:
      name: a registered workload name.
      overrides: the spec's ``workloads[i].hyperparameters`` as plain data.

    Returns:
      One (key, reason) per problem (empty when they resolve).
    """
    defaults = declared(name).hyperparameters
    problems = []
    for key, value in overrides.items():
        try:
            resolve_hyperparameters(name, defaults, {key: value}, path="")
        except HyperparameterError as error:
            problems.append((str(key), error.reason))
    return problems


def microbatch_problem(hyperparameters: Mapping[str, Any], batch_size: int) -> str | None:
    """Why ``microbatch_size`` cannot split a batch of ``batch_size``, or None.

    Args:
      hyperparameters: a workload's resolved hyperparameters (defaults applied).
      batch_size: the global batch size.
    """
    size = int(hyperparameters.get("microbatch_size") or 0)
    if not size or batch_size <= size:
        return None
    virtual = int(hyperparameters.get("virtual_batch_size") or 0)
    if not virtual:
        return (f"{size} needs a virtual_batch_size: with whole-batch BN a microbatch would be "
                f"normalised over fewer examples than the batch of {batch_size}")
    if batch_size % size:
        return f"{size} does not divide batch_size {batch_size}"
    if size % virtual:
        return f"{size} is not a multiple of virtual_batch_size {virtual}"
    return None
