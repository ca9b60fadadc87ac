"""batchlab.optim: the paper's optimizers and schedules as optax GradientTransformations.

Everything returns optax objects, composes with ``optax.chain``, jits and works on
any pytree. The JAX-free parts (:mod:`batchlab.optim.schema`,
:mod:`batchlab.optim.paper`) import without JAX, so the controller can validate
configurations; the rest loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the submodule that defines it; None marks a submodule itself.
_EXPORTS = {
    "nesterov": "alias",
    "heavy_ball": "alias",
    "sgd": "alias",
    "lars": "alias",
    "lamb": "alias",
    "adam": "alias",
    "param_groups": "groups",
    "grouped": "groups",
    "from_config": "config",
    "optimizer_arguments": "config",
    "optimizer_structure": "config",
    "schedule_from_config": "config",
    "learning_rate_fn": "config",
    "ConfigError": "schema",
    "validate_optimizer_config": "schema",
    "PAPER_CONFIGS": "paper",
    "paper_config": "paper",
    "table1_differences": "paper",
    "schedules": None,
    "transforms": None,
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'batchlab.optim' has no attribute {name!r}")
    module = _EXPORTS[name]
    if module is None:
        return importlib.import_module(f"batchlab.optim.{name}")
    return getattr(importlib.import_module(f"batchlab.optim.{module}"), name)
