"""Search spaces as data: linear, log, discrete and fixed hyperparameters addressed by path.

A search space is the `search_space` of an OptimizerSpec (protos/batchlab/v1/experiment.proto)
or the same thing as a plain mapping (its protobuf JSON form). Each non-fixed parameter takes
one coordinate u in [0, 1) of a quasi-random point and maps it to a value; `SearchSpace.assign`
turns a point into {path: value}; `batchlab.paths.set_path` writes a value into the trial's hyperparameters.

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check", Appendix D (Tables 6, 8, 9): the
  scales used (log for learning rates, weight decay and 1 - momentum; linear for label
  smoothing; discrete sets such as np.logspace points).
  Bousquet et al. 2017, "Critical Hyper-Parameters: No Random, No Cry": quasi-random search.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from batchlab.errors import FieldError
from batchlab.limits import shorten

PATH_ROOTS = ("optimizer", "workload")
_PATH_RE = re.compile(r"^(optimizer|workload)(\.[A-Za-z_][A-Za-z0-9_]*)+$")


class SpecError(FieldError):
    """An invalid experiment spec or search space, naming the offending field.

    `field_path` is the first problem's path in the spec (e.g.
    "optimizers[1].search_space.parameters[0].log.min"); `problems` lists every problem found
    as (field_path, message) pairs, so a user sees them all at once.

    Args:
      field_path: where the (first) problem is, as a dotted path with [index] for lists.
      message: what is wrong and what was expected.
      problems: all problems, when more than one was found; defaults to the one above.
    """

    def __init__(self, field_path: str, message: str,
                 problems: Sequence[tuple[str, str]] = ()) -> None:
        self.problems: tuple[tuple[str, str], ...] = tuple(problems) or ((field_path, message),)
        super().__init__(field_path, message)
        self.message = message
        # Every problem, one per line (FieldError's message names the first only).
        self.args = ("\n".join(_format_problem(p, m) for p, m in self.problems),)

    @classmethod
    def from_problems(cls, problems: Sequence[tuple[str, str]]) -> SpecError:
        """One error carrying every problem; the first names `field_path`.

        Args:
          problems: (field_path, message) pairs, at least one.
        """
        first_path, first_message = problems[0]
        return cls(first_path, first_message, problems)


def _format_problem(path: str, message: str) -> str:
    return f"{path}: {message}" if path else message


def join_path(parent: str, child: str | int) -> str:
    """Extend a field path by a field name or a list index.

    Args:
      parent: the path so far ("" for the root).
      child: a field name, or an int for a list index.
    """
    if isinstance(child, int):
        return f"{parent}[{child}]"
    return f"{parent}.{child}" if parent else child


class Scale(enum.StrEnum):
    """How a parameter maps u in [0, 1) to a value."""

    LINEAR = "linear"
    LOG = "log"
    DISCRETE = "discrete"
    FIXED = "fixed"


def linear_scale(u: float, low: float, high: float) -> float:
    """Map u in [0, 1) to low + u * (high - low).

    Args:
      u: the quasi-random coordinate.
      low: the value at u = 0.
      high: the value approached as u -> 1.
    """
    return low + u * (high - low)


def log_scale(u: float, low: float, high: float) -> float:
    """Map u in [0, 1) to low * exp(u * ln(high / low)), uniform in log(value).

    Example: u = 0.5 on [1e-4, 1e-2] gives 1e-3.

    Args:
      u: the quasi-random coordinate.
      low: the value at u = 0, > 0.
      high: the value approached as u -> 1.

    References:
      Shared reference/optimizers.md section 7 (the mapping used with quasi-random search).
    """
    return low * math.exp(u * math.log(high / low))


def discrete_choice(u: float, values: Sequence[Any]) -> Any:
    """Pick values[floor(u * len(values))] for u in [0, 1).

    Args:
      u: the quasi-random coordinate.
      values: the candidates, non-empty.
    """
    index = min(int(math.floor(u * len(values))), len(values) - 1)
    return values[index]


def plain_number(value: Any) -> Any:
    """Return an integral float as int, anything else unchanged (JSON has one number type).

    Protobuf Struct and Value store every number as a double; this gives back 706 rather than
    706.0 for step counts and sizes, as YAML would have read them.

    Args:
      value: a value read from a Struct or a YAML file.
    """
    if isinstance(value, float) and value.is_integer() and abs(value) < 2.0**53:
        return int(value)
    return value


def plain_data(value: Any) -> Any:
    """Apply `plain_number` throughout nested mappings and lists, copying them.

    Mapping keys come back sorted: protobuf Struct maps have no stable order, and a trial's
    hyperparameters should print (and hash) the same in every process.

    Args:
      value: JSON-like data.
    """
    if isinstance(value, Mapping):
        return {str(k): plain_data(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [plain_data(v) for v in value]
    return plain_number(value)


@dataclass(frozen=True)
class SearchParameter:
    """One hyperparameter of a search space.

    Args:
      path: dotted path into {"optimizer": config, "workload": hyperparameters}.
      scale: how u maps to a value.
      low: lower bound (linear, log).
      high: upper bound (linear, log).
      values: the candidates (discrete).
      value: the constant (fixed).
      one_minus: write 1 - v instead of v (tune 1 - momentum on a log scale, Table 9).
      integer: round to an integer (linear, log).
      tied_paths: further paths that receive the same value (one power p for warmup and decay,
        Table 6).
    """

    path: str
    scale: Scale
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()
    value: Any = None
    one_minus: bool = False
    integer: bool = False
    tied_paths: tuple[str, ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        """Every path this parameter writes."""
        return (self.path, *self.tied_paths)

    @property
    def tuned(self) -> bool:
        """Whether the parameter takes a coordinate of the quasi-random point."""
        return self.scale is not Scale.FIXED

    def value_at(self, u: float | None = None) -> Any:
        """The parameter's value at coordinate u (ignored, and may be None, when fixed).

        Args:
          u: the quasi-random coordinate in [0, 1).
        """
        if self.scale is Scale.FIXED:
            raw = self.value
        else:
            if u is None or not 0.0 <= u < 1.0:
                raise ValueError(f"{self.path}: u must be in [0, 1), got {u!r}")
            raw = self._mapped(u)
        if self.one_minus:
            return 1.0 - raw
        return raw

    def _mapped(self, u: float) -> Any:
        if self.scale is Scale.DISCRETE:
            return discrete_choice(u, self.values)
        assert self.low is not None and self.high is not None
        if self.scale is Scale.LINEAR:
            if self.integer:
                # Uniform over the integers in [low, high], endpoints included.
                lo, hi = math.ceil(self.low), math.floor(self.high)
                return lo + min(int(math.floor(u * (hi - lo + 1))), hi - lo)
            return linear_scale(u, self.low, self.high)
        mapped = log_scale(u, self.low, self.high)
        if self.integer:
            return min(max(round(mapped), math.ceil(self.low)), math.floor(self.high))
        return mapped

    def to_dict(self) -> dict[str, Any]:
        """The protobuf JSON form of this parameter (round-trips through parse_search_space)."""
        out: dict[str, Any] = {"path": self.path}
        if self.scale in (Scale.LINEAR, Scale.LOG):
            out[self.scale.value] = {"min": self.low, "max": self.high}
        elif self.scale is Scale.DISCRETE:
            out["discrete"] = {"values": list(self.values)}
        else:
            out["fixed"] = {"value": self.value}
        if self.one_minus:
            out["one_minus"] = True
        if self.integer:
            out["integer"] = True
        if self.tied_paths:
            out["tied_paths"] = list(self.tied_paths)
        return out


@dataclass(frozen=True)
class SearchSpace:
    """An ordered set of parameters; tuned ones take Halton dimensions in this order.

    Args:
      parameters: the parameters, in the order they appear in the spec.
    """

    parameters: tuple[SearchParameter, ...] = ()

    @property
    def dimension(self) -> int:
        """How many coordinates a point of this space has (fixed parameters take none)."""
        return sum(1 for p in self.parameters if p.tuned)

    def assign(self, point: Sequence[float]) -> dict[str, Any]:
        """Map a point of the unit cube to {path: value} for every path of every parameter.

        Args:
          point: `dimension` coordinates in [0, 1).
        """
        if len(point) != self.dimension:
            raise ValueError(f"a point of this space has {self.dimension} coordinates, "
                             f"got {len(point)}")
        coordinates = iter(point)
        assignment: dict[str, Any] = {}
        for parameter in self.parameters:
            u = next(coordinates) if parameter.tuned else None
            value = parameter.value_at(u)
            for path in parameter.paths:
                assignment[path] = value
        return assignment

    def to_dict(self) -> dict[str, Any]:
        """The protobuf JSON form of this space."""
        return {"parameters": [p.to_dict() for p in self.parameters]}


def parse_path(path: Any) -> list[str]:
    """Split a dotted hyperparameter path, checking its syntax.

    Args:
      path: e.g. "optimizer.weights.momentum"; the first part is "optimizer" or "workload".

    Raises:
      ValueError: the path is not of that form.
    """
    if not isinstance(path, str) or not _PATH_RE.fullmatch(path):
        raise ValueError(
            "must be a dotted path of identifiers starting with 'optimizer.' or 'workload.', "
            f"e.g. 'optimizer.weights.momentum'; got {shorten(path)}")
    return path.split(".")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | bool) or _is_number(value)


def _bounds(body: Any, where: str, problems: list[tuple[str, str]],
            *, log: bool) -> tuple[float, float] | None:
    if not isinstance(body, Mapping):
        problems.append((where, f"must be a mapping with min and max, got {body!r}"))
        return None
    unknown = sorted(set(body) - {"min", "max"})
    for key in unknown:
        problems.append((join_path(where, key), "unknown field; expected min and max"))
    found: dict[str, float] = {}
    for key in ("min", "max"):
        value = body.get(key)
        if value is None:
            problems.append((join_path(where, key), "required"))
        elif not _is_number(value) or not math.isfinite(value):
            problems.append((join_path(where, key), f"must be a finite number, got {value!r}"))
        else:
            found[key] = float(value)
    if len(found) != 2:
        return None
    low, high = found["min"], found["max"]
    ok = True
    if log and low <= 0:
        problems.append((join_path(where, "min"),
                         f"must be > 0 for a log scale, got {plain_number(low)!r}"))
        ok = False
    if low >= high:
        problems.append((join_path(where, "max"),
                         f"must be > min ({plain_number(low)!r}), got {plain_number(high)!r}"))
        ok = False
    return (low, high) if ok else None


_PARAMETER_FIELDS = {"path", "linear", "log", "discrete", "fixed", "one_minus", "integer",
                     "tied_paths"}


def _parse_parameter(data: Any, where: str,
                     problems: list[tuple[str, str]]) -> SearchParameter | None:
    if not isinstance(data, Mapping):
        problems.append((where, f"must be a mapping, got {data!r}"))
        return None
    before = len(problems)
    for key in sorted(set(data) - _PARAMETER_FIELDS, key=str):
        problems.append((join_path(where, str(key)), "unknown field; expected one of "
                         + ", ".join(sorted(_PARAMETER_FIELDS))))
    path = data.get("path")
    try:
        parse_path(path)
    except ValueError as error:
        problems.append((join_path(where, "path"), str(error)))
    tied = data.get("tied_paths", [])
    if not isinstance(tied, list | tuple):
        problems.append((join_path(where, "tied_paths"), f"must be a list, got {tied!r}"))
        tied = []
    for i, tied_path in enumerate(tied):
        try:
            parse_path(tied_path)
        except ValueError as error:
            problems.append((join_path(join_path(where, "tied_paths"), i), str(error)))
    flags = {}
    for flag in ("one_minus", "integer"):
        flags[flag] = data.get(flag, False)
        if not isinstance(flags[flag], bool):
            problems.append((join_path(where, flag), f"must be true or false, got "
                             f"{flags[flag]!r}"))
    scales = [s for s in Scale if s.value in data]
    if not scales:
        problems.append((where, "needs exactly one of linear, log, discrete, fixed"))
        return None
    if len(scales) > 1:
        problems.append((join_path(where, scales[1].value),
                         "only one of linear, log, discrete, fixed may be set; also got "
                         + scales[0].value))
        return None
    scale = scales[0]
    body = data[scale.value]
    body_path = join_path(where, scale.value)
    low = high = value = None
    values: tuple[Any, ...] = ()
    if scale in (Scale.LINEAR, Scale.LOG):
        bounds = _bounds(body, body_path, problems, log=scale is Scale.LOG)
        if bounds is not None:
            low, high = bounds
            if flags["integer"] is True and math.ceil(low) > math.floor(high):
                problems.append((body_path, f"holds no integer between {low!r} and {high!r}"))
    elif scale is Scale.DISCRETE:
        raw = body.get("values") if isinstance(body, Mapping) else None
        values_path = join_path(body_path, "values")
        if isinstance(body, Mapping):
            for key in sorted(set(body) - {"values"}, key=str):
                problems.append((join_path(body_path, str(key)), "unknown field; expected values"))
        if not isinstance(raw, list | tuple) or not raw:
            problems.append((values_path, f"must be a non-empty list, got {raw!r}"))
        else:
            values = tuple(plain_number(v) for v in raw)
            for i, candidate in enumerate(values):
                if not _is_scalar(candidate) or (_is_number(candidate)
                                                 and not math.isfinite(candidate)):
                    problems.append((join_path(values_path, i),
                                     f"must be a finite number, a string or a bool, "
                                     f"got {candidate!r}"))
            seen: set[tuple[type, Any]] = set()
            for i, candidate in enumerate(values):
                if not _is_scalar(candidate):
                    continue
                key = (type(candidate), candidate)
                if key in seen:
                    problems.append((join_path(values_path, i),
                                     f"duplicate value {candidate!r}"))
                seen.add(key)
    else:
        if not isinstance(body, Mapping) or body.get("value") is None:
            problems.append((join_path(body_path, "value"), "required"))
        else:
            for key in sorted(set(body) - {"value"}, key=str):
                problems.append((join_path(body_path, str(key)), "unknown field; expected value"))
            value = plain_data(body["value"])
    if flags["integer"] is True and scale not in (Scale.LINEAR, Scale.LOG):
        problems.append((join_path(where, "integer"), "applies to linear and log scales only"))
    if flags["one_minus"] is True:
        if flags["integer"] is True:
            problems.append((join_path(where, "one_minus"), "cannot be combined with integer"))
        candidates = values if scale is Scale.DISCRETE else (value,) if scale is Scale.FIXED else ()
        if any(not _is_number(c) for c in candidates):
            problems.append((join_path(where, "one_minus"), "needs numeric values"))
    if len(problems) > before or not isinstance(path, str):  # parse_path rejected a non-str
        return None
    return SearchParameter(path=path, scale=scale, low=low, high=high, values=values,
                           value=value, one_minus=flags["one_minus"], integer=flags["integer"],
                           tied_paths=tuple(tied))


def _check_path_conflicts(parameters: Iterable[tuple[int, SearchParameter]], where: str,
                          problems: list[tuple[str, str]]) -> None:
    owners: dict[str, int] = {}
    for index, parameter in parameters:
        for path in parameter.paths:
            parameter_path = join_path(join_path(where, "parameters"), index)
            if path in owners:
                problems.append((join_path(parameter_path, "path"),
                                 f"{path!r} is already set by parameters[{owners[path]}]"))
                continue
            for other, other_index in owners.items():
                if path.startswith(other + ".") or other.startswith(path + "."):
                    problems.append((join_path(parameter_path, "path"),
                                     f"{path!r} overlaps {other!r} of "
                                     f"parameters[{other_index}]"))
            owners[path] = index


def parse_search_space(data: Any, *, field_path: str = "search_space") -> SearchSpace:
    """Build and validate a SearchSpace from its protobuf JSON form or a SearchSpace message.

    Args:
      data: {"parameters": [...]} (None or {} for an empty space), or a
        batchlab.v1.SearchSpace message.
      field_path: where the space sits in the spec, used in error messages.

    Raises:
      SpecError: listing every problem, each with its field path, e.g.
        "optimizers[1].search_space.parameters[0].log.min: must be > 0 for a log scale, got -1".
    """
    if data is not None and hasattr(data, "DESCRIPTOR"):
        from google.protobuf import json_format

        data = json_format.MessageToDict(data, preserving_proto_field_name=True)
    if data is None:
        return SearchSpace()
    problems: list[tuple[str, str]] = []
    if not isinstance(data, Mapping):
        raise SpecError(field_path, f"must be a mapping with 'parameters', got {data!r}")
    for key in sorted(set(data) - {"parameters"}, key=str):
        problems.append((join_path(field_path, str(key)), "unknown field; expected parameters"))
    raw = data.get("parameters", [])
    if not isinstance(raw, list | tuple):
        problems.append((join_path(field_path, "parameters"), f"must be a list, got {raw!r}"))
        raw = []
    parsed: list[tuple[int, SearchParameter]] = []
    for i, item in enumerate(raw):
        parameter = _parse_parameter(item, join_path(join_path(field_path, "parameters"), i),
                                     problems)
        if parameter is not None:
            parsed.append((i, parameter))
    _check_path_conflicts(parsed, field_path, problems)
    if problems:
        raise SpecError.from_problems(problems)
    return SearchSpace(tuple(p for _, p in parsed))
