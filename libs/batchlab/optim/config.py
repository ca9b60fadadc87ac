"""Build optimizers and schedules from plain data (as an experiment spec carries them)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import optax

from batchlab.optim import alias, groups, schedules
from batchlab.optim.schema import (
    ConfigError,
    validate_optimizer_config,
    validate_schedule_config,
)
from batchlab.paths import set_path

__all__ = ["from_config", "optimizer_arguments", "optimizer_structure", "schedule_from_config",
           "without_total_steps"]

_BUILDERS = {
    "nesterov": alias.nesterov,
    "heavy_ball": alias.heavy_ball,
    "sgd": alias.sgd,
    "lars": alias.lars,
    "lamb": alias.lamb,
    "adam": alias.adam,
}


def _build_schedule(cfg: dict[str, Any], path: str) -> optax.Schedule:
    kwargs = {k: v for k, v in cfg.items() if k != "schedule"}
    if kwargs.get("total_steps", 0) is None:
        raise ConfigError(f"{path}.total_steps", "required (no step budget was given to fill it)")
    try:
        schedule: optax.Schedule = getattr(schedules, cfg["schedule"])(**kwargs)
    except ValueError as err:  # cross-field checks inside the schedule
        raise ConfigError(path, str(err)) from err
    return schedule


def schedule_from_config(
    value: Any, *, total_steps: int | None = None, path: str = "learning_rate"
) -> optax.Schedule:
    """Build a schedule from a number or a {"schedule": KIND, ...} mapping.

    Args:
      value: see :mod:`batchlab.optim.schema`.
      total_steps: the step budget, used where the mapping leaves ``total_steps`` out.
      path: the field path used in error messages.

    Returns:
      An optax schedule.

    Raises:
      ConfigError: naming the field path.
    """
    cfg = validate_schedule_config(value, path=path, total_steps=total_steps)
    return _build_schedule(cfg, path)


def _build_group(cfg: dict[str, Any], path: str) -> optax.GradientTransformation:
    kwargs = {k: v for k, v in cfg.items() if k not in ("optimizer", "learning_rate")}
    lr = _build_schedule(cfg["learning_rate"], f"{path}.learning_rate")
    return _BUILDERS[cfg["optimizer"]](lr, **kwargs)


def from_config(
    mapping: Any, *, total_steps: int | None = None, path: str = "optimizer"
) -> optax.GradientTransformation:
    """Build an optimizer (per parameter group, each with its schedule) from plain data.

    Args:
      mapping: a GROUP or {"weights": GROUP, "bias_bn": GROUP} (see :mod:`batchlab.optim.schema`).
      total_steps: the step budget, filled into schedules that leave it out.
      path: the field path used in error messages.

    Returns:
      An optax GradientTransformation.

    Raises:
      ConfigError (a ValueError): naming the field path and the allowed values.

    Example:
      >>> opt = from_config({
      ...     "weights": {"optimizer": "lars", "learning_rate": 1.0, "weight_decay": 1e-4},
      ...     "bias_bn": {"optimizer": "heavy_ball", "learning_rate": 1.0},
      ... })
    """
    cfg = validate_optimizer_config(mapping, path=path, total_steps=total_steps)
    return _build(cfg, path)


def _build(cfg: dict[str, Any], path: str) -> optax.GradientTransformation:
    if "optimizer" in cfg:
        return _build_group(cfg, path)
    return groups.grouped(
        weights=_build_group(cfg["weights"], f"{path}.weights"),
        bias_bn=_build_group(cfg["bias_bn"], f"{path}.bias_bn"),
    )


Arguments = dict[str, Any]


def _numbers(cfg: dict[str, Any], prefix: str = "") -> Arguments:
    """Every non-zero float of ``cfg`` by its dotted path (booleans, integers and zeros excluded)."""
    out: Arguments = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
        elif type(value) is float and value != 0.0:
            out[f"{prefix}{key}"] = value
    return out


def optimizer_arguments(
    mapping: Any, *, total_steps: int | None = None, path: str = "optimizer"
) -> tuple[Callable[[Arguments], optax.GradientTransformation], Arguments]:
    """An optimizer as a function of its real-valued hyperparameters, to compile once.

    ``from_config`` bakes every hyperparameter into the programs that jit compiles, so each
    tuning trial compiles its own train step. Passing the values returned here as arguments of
    the jitted step and building the optimizer inside it with ``build(values)`` gives one
    program per optimizer *structure*: trials that differ only in real values (learning rates,
    momenta, decay coefficients, schedule powers) lower to the same program, which the
    persistent compilation cache then serves to every trial after the first, and a process
    training run after run keeps (batchlab.train.loop, keyed by ``optimizer_structure``). What
    changes the structure stays a constant: the optimizer and schedule kinds, integers (step
    counts), booleans, strings, and zeros (a zero weight decay removes its term).

    Numerics: arguments combine in float32 where Python folded constants in float64, so results
    differ from ``from_config``'s at rounding level, and XLA no longer simplifies constant
    powers. Quantities like Adam's 1 - b2 lose relative precision as b2 nears 1 (about
    2**-24 / (1 - b2): 1.3e-5 at the default 0.999); the schema refuses b1 and b2 above
    1 - 2**-24, where 1 - b would be 0.

    Args:
      mapping: an optimizer config (see :func:`from_config`), validated here with concrete
        values, so every error names its field before anything is traced.
      total_steps: the step budget.
      path: the field path used in error messages.

    Returns:
      ``(build, values)``: ``values`` maps dotted field paths (``weights.momentum``) to floats;
      ``build(values)`` with these concrete values returns the same transformation as
      ``from_config(mapping)``, and it accepts traced values of the same paths.

    Example:
      >>> build, values = optimizer_arguments({"optimizer": "nesterov", "learning_rate": 0.1})
      >>> values
      {'momentum': 0.9, 'learning_rate.value': 0.1}
    """
    cfg = validate_optimizer_config(mapping, path=path, total_steps=total_steps)
    _build(cfg, path)  # the builders' own value checks, on the concrete values
    values = _numbers(cfg)

    def build(arguments: Arguments) -> optax.GradientTransformation:
        if set(arguments) != set(values):
            raise ValueError(f"arguments: expected the fields {sorted(values)}, got {sorted(arguments)}")
        filled = copy.deepcopy(cfg)
        for dotted, value in arguments.items():
            set_path(filled, dotted, value)
        return _build(filled, path)

    return build, values


def optimizer_structure(mapping: Any, *, total_steps: int | None = None) -> str:
    """What fixes the programs that ``optimizer_arguments``' optimizer compiles to, as text.

    Two configs with the same structure differ only in the values ``optimizer_arguments``
    passes as arguments: the validated config (defaults and the step budget filled in) with
    each of those values replaced by a placeholder, as canonical JSON.

    Example:
      >>> a = optimizer_structure({"optimizer": "nesterov", "learning_rate": 0.1})
      >>> a == optimizer_structure({"optimizer": "nesterov", "learning_rate": 0.5})
      True
      >>> a == optimizer_structure({"optimizer": "heavy_ball", "learning_rate": 0.1})
      False
    """
    cfg = copy.deepcopy(validate_optimizer_config(mapping, total_steps=total_steps))
    for dotted in _numbers(cfg):
        set_path(cfg, dotted, "<argument>")
    return json.dumps(cfg, sort_keys=True, default=str)


def learning_rate_fn(
    mapping: Any, *, total_steps: int | None = None, group: str = "weights"
) -> optax.Schedule:
    """The learning-rate schedule of one group of a config (for logging and plots).

    Args:
      mapping: an optimizer config.
      total_steps: the step budget.
      group: which group's schedule, for per-group configs.

    Returns:
      An optax schedule.
    """
    cfg = validate_optimizer_config(mapping, total_steps=total_steps)
    group_cfg = cfg if "optimizer" in cfg else cfg[group]
    return _build_schedule(group_cfg["learning_rate"], f"optimizer.{group}.learning_rate")


def without_total_steps(mapping: Any) -> Any:
    """A copy of an optimizer config with every schedule's ``total_steps`` removed.

    A run's stored config has its schedules' ``total_steps`` filled in with that run's step
    budget; a spec built from it (a trial carried to another point, an ablation of a best
    trial) must leave them out, so that each schedule follows the budget where it is used.

    Example:
      >>> without_total_steps({"optimizer": "nesterov", "learning_rate": {
      ...     "schedule": "cosine", "peak_value": 0.1, "total_steps": 160}})
      {'optimizer': 'nesterov', 'learning_rate': {'schedule': 'cosine', 'peak_value': 0.1}}
    """
    config = copy.deepcopy(mapping)

    def strip(node: Any) -> None:
        if isinstance(node, dict):
            if "schedule" in node:
                node.pop("total_steps", None)
            for value in node.values():
                strip(value)

    strip(config)
    return config
