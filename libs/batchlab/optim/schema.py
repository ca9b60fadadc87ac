"""Validation of optimizer configurations given as plain data. Pure Python: no JAX.

An experiment spec carries each optimizer as a mapping; the controller (which
installs no JAX) validates it here, and :func:`batchlab.optim.from_config`
builds it. Format::

    GROUP    = {"optimizer": NAME, "learning_rate": NUMBER | SCHEDULE, <NAME's keyword args>}
    SCHEDULE = {"schedule": KIND, <KIND's arguments>}
    CONFIG   = GROUP | {"weights": GROUP, "bias_bn": GROUP}

``total_steps`` may be left out of a schedule; it is then the study's step budget.
Numbers arrive as floats from JSON/protobuf Structs: integral floats are accepted
where an integer is required.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from batchlab.errors import FieldError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "ConfigError",
    "validate_optimizer_config",
    "validate_schedule_config",
]

GROUP_NAMES = ("weights", "bias_bn")


class ConfigError(FieldError):
    """An invalid optimizer configuration value, with the dotted path of the offending field."""


@dataclass(frozen=True)
class Field:
    """One configuration field: how to check it and its default (``REQUIRED`` if none)."""

    check: Callable[[str, Any], Any]
    default: Any


REQUIRED = object()


def _number(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(path, f"must be finite, got {value!r}")
    return float(value)


def _non_negative(path: str, value: Any) -> float:
    number = _number(path, value)
    if number < 0:
        raise ConfigError(path, f"must be >= 0, got {number}")
    return number


def _positive(path: str, value: Any) -> float:
    number = _number(path, value)
    if number <= 0:
        raise ConfigError(path, f"must be > 0, got {number}")
    return number


def _unit_interval(path: str, value: Any) -> float:
    number = _number(path, value)
    if not 0.0 <= number < 1.0:
        raise ConfigError(path, f"must be in [0, 1), got {number}")
    return number


# 1 - 2**-24: the largest float32 below 1. Adam's moment updates compute 1 - b in float32
# once b is an argument of the compiled step (batchlab.optim.config.optimizer_arguments).
_BELOW_ONE_F32 = 1.0 - 2.0**-24


def _moment_decay(path: str, value: Any) -> float:
    number = _unit_interval(path, value)
    if number > _BELOW_ONE_F32:
        raise ConfigError(path, f"must be at most 1 - 2**-24 (float32 rounds it to 1, and 1 - b to 0), "
                                f"got {number}")
    return number


def _steps(path: str, value: Any) -> int:
    value = _number(path, value)
    if value != int(value) or value < 0:
        raise ConfigError(path, f"must be an integer >= 0, got {value}")
    return int(value)


def _boolean(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"must be true or false, got {value!r}")
    return value


def _one_of(*allowed: str) -> Callable[[str, Any], str]:
    def check(path: str, value: Any) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(path, f"must be one of {list(allowed)}, got {value!r}")
        return value

    return check


_MOMENTUM = {"momentum": Field(_unit_interval, 0.9), "weight_decay": Field(_non_negative, 0.0)}
_ADAM = {
    "b1": Field(_moment_decay, 0.9),
    "b2": Field(_moment_decay, 0.999),
    "weight_decay": Field(_non_negative, 0.0),
}

OPTIMIZERS: dict[str, dict[str, Field]] = {
    "nesterov": dict(_MOMENTUM),
    "heavy_ball": dict(_MOMENTUM),
    "sgd": {"weight_decay": Field(_non_negative, 0.0)},
    "lars": {
        **_MOMENTUM,
        "trust_coefficient": Field(_non_negative, 0.001),
        "eps": Field(_non_negative, 0.0),
        "nesterov": Field(_boolean, False),
        "variant": Field(_one_of("mlperf", "optax"), "mlperf"),
    },
    "lamb": {**_ADAM, "eps": Field(_non_negative, 1e-6)},
    "adam": {**_ADAM, "eps": Field(_non_negative, 1e-8), "bias_correction": Field(_boolean, True)},
}

SCHEDULES: dict[str, dict[str, Field]] = {
    "constant": {"value": Field(_non_negative, REQUIRED)},
    "piecewise_polynomial": {
        "init_value": Field(_non_negative, 0.0),
        "peak_value": Field(_non_negative, REQUIRED),
        "end_value": Field(_non_negative, 0.0),
        "warmup_steps": Field(_steps, REQUIRED),
        "total_steps": Field(_steps, None),
        "warmup_power": Field(_positive, 1.0),
        "decay_power": Field(_positive, 2.0),
    },
    "bert_legacy": {
        "peak_value": Field(_non_negative, REQUIRED),
        "warmup_steps": Field(_steps, REQUIRED),
        "total_steps": Field(_steps, None),
    },
    "cosine": {
        "peak_value": Field(_non_negative, REQUIRED),
        "total_steps": Field(_steps, None),
        "warmup_steps": Field(_steps, 0),
        "init_value": Field(_non_negative, 0.0),
        "end_value": Field(_non_negative, 0.0),
    },
    "linear_decay": {
        "init_value": Field(_non_negative, REQUIRED),
        "total_steps": Field(_steps, None),
        "decay_factor": Field(_non_negative, REQUIRED),
    },
    "warmup_decay_to_constant": {
        "peak_value": Field(_non_negative, REQUIRED),
        "warmup_steps": Field(_steps, REQUIRED),
        "decay_steps": Field(_steps, REQUIRED),
        "decay_factor": Field(_non_negative, REQUIRED),
        "power": Field(_positive, 2.0),
        "init_value": Field(_non_negative, 0.0),
    },
}


def _fields(
    path: str, given: Mapping[str, Any], kind: str, spec: Mapping[str, Field], skip: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in given:
        if key != skip and key not in spec:
            raise ConfigError(
                f"{path}.{key}", f"unknown field for {kind!r}; allowed: {sorted(spec)}"
            )
    for key, field in spec.items():
        if key in given:
            out[key] = field.check(f"{path}.{key}", given[key])
        elif field.default is REQUIRED:
            raise ConfigError(f"{path}.{key}", f"required by {kind!r} but missing")
        else:
            out[key] = field.default
    return out


def _mapping(path: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"must be a mapping, got {type(value).__name__}")
    return value


def validate_schedule_config(
    value: Any, *, path: str = "learning_rate", total_steps: int | None = None
) -> dict[str, Any]:
    """Validate a learning rate given as a number or a schedule mapping.

    Args:
      value: a non-negative number (constant) or {"schedule": KIND, ...}.
      path: the field path used in error messages.
      total_steps: the study's step budget, filled in where ``total_steps`` is absent.

    Returns:
      A normalised schedule mapping with every default filled in.

    Raises:
      ConfigError: naming the field path and the allowed values.
    """
    if not isinstance(value, Mapping):
        return {"schedule": "constant", "value": _non_negative(path, value)}
    kind = value.get("schedule")
    # A list or mapping here is a client's mistake too (and unhashable): refuse it the same way.
    if not isinstance(kind, str) or kind not in SCHEDULES:
        raise ConfigError(
            f"{path}.schedule", f"unknown schedule {kind!r}; allowed: {sorted(SCHEDULES)}"
        )
    out = {"schedule": kind, **_fields(path, value, kind, SCHEDULES[kind], "schedule")}
    if "total_steps" in out and out["total_steps"] is None:
        out["total_steps"] = total_steps
    if out.get("total_steps") is not None and "warmup_steps" in out:
        if out["warmup_steps"] > out["total_steps"]:
            raise ConfigError(
                f"{path}.warmup_steps",
                f"must be <= total_steps ({out['total_steps']}), got {out['warmup_steps']}",
            )
    return out


def _validate_group(value: Any, path: str, total_steps: int | None) -> dict[str, Any]:
    value = _mapping(path, value)
    name = value.get("optimizer")
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ConfigError(
            f"{path}.optimizer", f"unknown optimizer {name!r}; allowed: {sorted(OPTIMIZERS)}"
        )
    if "learning_rate" not in value:
        raise ConfigError(f"{path}.learning_rate", "required but missing")
    spec = {**OPTIMIZERS[name], "learning_rate": Field(lambda p, v: v, REQUIRED)}
    out = {"optimizer": name, **_fields(path, value, name, spec, "optimizer")}
    out["learning_rate"] = validate_schedule_config(
        value["learning_rate"], path=f"{path}.learning_rate", total_steps=total_steps
    )
    return out


def validate_optimizer_config(
    mapping: Any, *, path: str = "optimizer", total_steps: int | None = None
) -> dict[str, Any]:
    """Validate an optimizer configuration (one group or per-group) given as plain data.

    Args:
      mapping: a GROUP or {"weights": GROUP, "bias_bn": GROUP} (see the module docstring).
      path: the field path used in error messages (e.g. "optimizers[2].config").
      total_steps: the step budget, filled into schedules that leave it out.

    Returns:
      A normalised copy: every default filled in, integers as int.

    Raises:
      ConfigError: naming the field path and the reason or the allowed values.

    Example:
      >>> validate_optimizer_config({"optimizer": "lars", "learning_rate": 1.0})["momentum"]
      0.9
    """
    mapping = _mapping(path, mapping)
    if "optimizer" in mapping:
        return _validate_group(mapping, path, total_steps)
    unknown = sorted(set(mapping) - set(GROUP_NAMES))
    if unknown:
        raise ConfigError(
            f"{path}.{unknown[0]}",
            f"unknown key; a config is a group with 'optimizer' or has keys {list(GROUP_NAMES)}",
        )
    missing = [g for g in GROUP_NAMES if g not in mapping]
    if missing:
        raise ConfigError(f"{path}.{missing[0]}", "required by a per-group config but missing")
    return {g: _validate_group(mapping[g], f"{path}.{g}", total_steps) for g in GROUP_NAMES}
