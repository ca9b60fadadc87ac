"""Checks of a spec beyond its types: names, limits and meaning.

Part of `batchlab.search.validate_spec`, so `batchlab spec check`, `batchlab local run` and the
controller's Submit refuse the same specs, before anything runs or is stored, for what would
only fail later or never finish:

* names that are not exactly a name: every identifier is matched whole (a name ending in a
  newline is not a name), and no string holds control characters (a description may hold
  tabs and newlines);
* values past the documented maxima of :mod:`batchlab.limits` (batch size, steps, trials,
  seeds, search dimensions, description length, ...);
* meaning, from the workload declarations of :mod:`batchlab.workloads` (importable without
  JAX, which the controller does not install): a target metric the workload never reports,
  a workload hyperparameter that is unknown or of the wrong kind, in the workload's
  hyperparameters or in a search parameter that writes one.

Every problem is returned with its field path in the spec, as `SpecError` problems are.

Example:
  >>> spec = experiment_pb2.ExperimentSpec(name="bad\\n")
  >>> check_spec(spec)[0]
  ('name', "must be 1-63 lower-case letters, digits, '_' or '-', starting with a letter, got 'bad\\\\n'")
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from batchlab import limits
from batchlab.limits import shorten
from batchlab.proto.v1 import experiment_pb2
from batchlab.workloads import (
    DECLARATIONS,
    WorkloadDeclaration,
    check_hyperparameters,
    microbatch_problem,
)

__all__ = ["check_request_id", "check_spec"]

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_WORKLOAD = re.compile(r"[a-z][a-z0-9_]{0,62}")
# C0 and C1 control characters; free text may keep tabs and newlines.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_FREE_TEXT_FIELDS = frozenset({"description"})
_NAME_RULE = "must be 1-63 lower-case letters, digits, '_' or '-', starting with a letter"

Problems = list[tuple[str, str]]


def _join(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else name


def _strings(message: Message, path: str = "") -> Iterator[tuple[str, str, str]]:
    """Every string in a message: (field path, field name, value); Struct keys included."""
    kind = message.DESCRIPTOR.full_name
    if kind == "google.protobuf.Struct":
        for key, value in message.fields.items():
            yield path, "<key>", key
            yield from _strings(value, _join(path, shorten(key, 40, quote=False)))
        return
    if kind == "google.protobuf.ListValue":
        for i, value in enumerate(message.values):
            yield from _strings(value, _join(path, i))
        return
    if kind == "google.protobuf.Value":
        which = message.WhichOneof("kind")
        if which == "string_value":
            yield path, "<value>", message.string_value
        elif which in ("struct_value", "list_value"):
            yield from _strings(getattr(message, which), path)
        return
    for field, value in message.ListFields():
        where = _join(path, field.name)
        items: list[tuple[int | None, Any]] = (
            list(enumerate(value)) if field.is_repeated else [(None, value)]
        )
        for index, item in items:
            item_path = where if index is None else _join(where, index)
            if field.type == FieldDescriptor.TYPE_STRING:
                yield item_path, field.name, item
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                if field.message_type.GetOptions().map_entry:
                    continue
                yield from _strings(item, item_path)


def _check_strings(spec: Message, problems: Problems) -> None:
    for path, name, value in _strings(spec):
        pattern = _TEXT_CONTROL if name in _FREE_TEXT_FIELDS else _CONTROL
        if pattern.search(value):
            what = "a key" if name == "<key>" else "it"
            problems.append((path or "spec", f"{what} must not contain control characters, got "
                                             f"{shorten(value)}"))


def _at_most(problems: Problems, path: str, value: float, bound: int, what: str = "") -> None:
    # A float is shown as %g: 1e300 written out with separators would be 400 characters.
    if value > bound:
        shown = f"{value:,}" if isinstance(value, int) else f"{value:g}"
        problems.append((path, f"must be at most {bound:,}{what} (batchlab.limits), got "
                               f"{shown}"))


def _check_limits(spec: experiment_pb2.ExperimentSpec, problems: Problems) -> None:
    _at_most(problems, "trials_per_study", spec.trials_per_study, limits.MAX_TRIALS_PER_STUDY)
    _at_most(problems, "max_total_trials", spec.max_total_trials, limits.MAX_TRIALS_PER_STUDY)
    _at_most(problems, "seeds_per_best", spec.seeds_per_best, limits.MAX_SEEDS_PER_BEST)
    _at_most(problems, "max_attempts", spec.max_attempts, limits.MAX_ATTEMPTS)
    if "search_replicates" in spec.DESCRIPTOR.fields_by_name:
        _at_most(problems, "search_replicates", spec.search_replicates,
                 limits.MAX_SEARCH_REPLICATES)
    _at_most(problems, "description", len(spec.description), limits.MAX_DESCRIPTION_CHARS,
             " characters")
    if spec.HasField("resources"):
        # NaN and infinities are validate_spec's to refuse ("must be a finite number").
        for name, bound, unit in (("cpus", limits.MAX_CPUS_PER_HOST, " CPUs per host"),
                                  ("memory_gib", limits.MAX_MEMORY_GIB_PER_HOST,
                                   " GiB per host")):
            value = getattr(spec.resources, name)
            if math.isfinite(value):
                _at_most(problems, f"resources.{name}", value, bound, unit)
    _at_most(problems, "workloads", len(spec.workloads), limits.MAX_WORKLOADS, " workloads")
    _at_most(problems, "optimizers", len(spec.optimizers), limits.MAX_OPTIMIZERS, " optimizers")
    studies = len(spec.optimizers) * sum(len(w.points) for w in spec.workloads)
    _at_most(problems, "optimizers", studies, limits.MAX_STUDIES,
             " studies (optimizers x batch points)")
    for i, workload in enumerate(spec.workloads):
        where = f"workloads[{i}]"
        _at_most(problems, f"{where}.points", len(workload.points),
                 limits.MAX_POINTS_PER_WORKLOAD, " points")
        for k, point in enumerate(workload.points):
            _at_most(problems, f"{where}.points[{k}].batch_size", point.batch_size,
                     limits.MAX_BATCH_SIZE)
            _at_most(problems, f"{where}.points[{k}].step_budget", point.step_budget,
                     limits.MAX_STEPS)
    for j, optimizer in enumerate(spec.optimizers):
        where = f"optimizers[{j}]"
        _at_most(problems, f"{where}.description", len(optimizer.description),
                 limits.MAX_DESCRIPTION_CHARS, " characters")
        parameters = optimizer.search_space.parameters
        _at_most(problems, f"{where}.search_space.parameters", len(parameters),
                 limits.MAX_SEARCH_DIMENSIONS, " parameters")
        for p, parameter in enumerate(parameters):
            _at_most(problems, f"{where}.search_space.parameters[{p}].discrete.values",
                     len(parameter.discrete.values), limits.MAX_DISCRETE_VALUES, " values")


def _check_names(spec: experiment_pb2.ExperimentSpec, problems: Problems) -> None:
    if not _NAME.fullmatch(spec.name):
        problems.append(("name", f"{_NAME_RULE}, got {shorten(spec.name)}"))
    for j, optimizer in enumerate(spec.optimizers):
        if not _NAME.fullmatch(optimizer.name):
            problems.append((f"optimizers[{j}].name", f"{_NAME_RULE}, got "
                                                      f"{shorten(optimizer.name)}"))
        # Search paths are checked (whole, quoted short) by batchlab.search.space.parse_path.
    for i, workload in enumerate(spec.workloads):
        if not _WORKLOAD.fullmatch(workload.workload):
            problems.append((f"workloads[{i}].workload", "must be a registered workload name "
                             f"(lower-case letters, digits and '_'), got "
                             f"{shorten(workload.workload)}"))


def _plain(message: Message) -> Any:
    try:
        return json_format.MessageToDict(message)
    except (ValueError, TypeError):  # non-finite numbers: refused by the request guard
        return None


def _search_values(parameter: experiment_pb2.SearchParameter) -> list[Any]:
    """Values a search parameter can write, as far as they can be listed: its fixed or
    discrete values, or the ends of its range (after one_minus and integer rounding)."""
    scale = parameter.WhichOneof("scale")
    if scale == "fixed":
        values = [_plain(parameter.fixed.value)]
    elif scale == "discrete":
        values = [_plain(v) for v in parameter.discrete.values]
    elif scale in ("linear", "log"):
        bounds = getattr(parameter, scale)
        values = [getattr(bounds, end) for end in ("min", "max") if bounds.HasField(end)]
        if parameter.one_minus:
            values = [1.0 - v for v in values]
        if parameter.integer:
            values = [round(v) for v in values]
    else:
        values = []
    return [v for v in values if v is not None]


def _check_meaning(spec: experiment_pb2.ExperimentSpec, problems: Problems,
                   declarations: Mapping[str, WorkloadDeclaration]) -> None:
    for i, workload in enumerate(spec.workloads):
        declaration = declarations.get(workload.workload)
        if declaration is None:
            continue  # an unknown name is validate_spec's to report
        where = f"workloads[{i}]"
        metric = workload.target.metric
        if metric and not declaration.reports(metric):
            problems.append((f"{where}.target.metric", f"workload {workload.workload!r} never "
                             f"reports {shorten(metric)}, so no run could reach the target; it "
                             f"reports {sorted(declaration.metrics)}"))
        hyperparameters = _plain(workload.hyperparameters) or {}
        bad = check_hyperparameters(workload.workload, hyperparameters)
        for key, reason in bad:
            problems.append((f"{where}.hyperparameters.{shorten(key, 40, quote=False)}",
                             reason))
        if not bad:
            _check_microbatches(spec, i, {**declaration.hyperparameters, **hyperparameters},
                                problems)
        for j, optimizer in enumerate(spec.optimizers):
            for p, parameter in enumerate(optimizer.search_space.parameters):
                for t, path in enumerate([parameter.path, *parameter.tied_paths]):
                    if not path.startswith("workload.") or path.count(".") != 1:
                        continue
                    field = "path" if t == 0 else f"tied_paths[{t - 1}]"
                    problem = _search_problem(workload.workload, path, parameter)
                    if problem is not None:
                        problems.append((f"optimizers[{j}].search_space.parameters[{p}]."
                                         f"{field}", f"{problem} (for {where})"))


_SPLIT_KEYS = ("microbatch_size", "virtual_batch_size")


def _check_microbatches(spec: experiment_pb2.ExperimentSpec, i: int,
                        resolved: Mapping[str, Any], problems: Problems) -> None:
    """Workload ``i``'s microbatch_size (``resolved``: its declared defaults and the spec's
    values) must split every point's batch into microbatches that are whole virtual batches
    (batchlab.workloads.microbatch_problem), and so must every microbatch_size and
    virtual_batch_size an optimizer's search space can write (as far as they can be listed):
    a run would fail."""
    workload = spec.workloads[i]
    for k, point in enumerate(workload.points):
        problem = microbatch_problem(resolved, point.batch_size)
        if problem is not None:
            problems.append((f"workloads[{i}].hyperparameters.microbatch_size",
                             f"{problem} (points[{k}])"))
    for j, optimizer in enumerate(spec.optimizers):
        candidates: dict[str, list[tuple[Any, str]]] = {}
        for p, parameter in enumerate(optimizer.search_space.parameters):
            for t, path in enumerate([parameter.path, *parameter.tied_paths]):
                key = path.removeprefix("workload.")
                if path.startswith("workload.") and key in _SPLIT_KEYS:
                    field = "path" if t == 0 else f"tied_paths[{t - 1}]"
                    where = f"optimizers[{j}].search_space.parameters[{p}].{field}"
                    candidates.setdefault(key, []).extend(
                        (v, where) for v in _search_values(parameter)
                        if isinstance(v, int | float) and not isinstance(v, bool))
        if not candidates:
            continue
        sizes = candidates.get("microbatch_size") or [(resolved.get("microbatch_size"), "")]
        virtuals = candidates.get("virtual_batch_size") or [(resolved.get("virtual_batch_size"), "")]
        for size, size_where in sizes:
            for virtual, virtual_where in virtuals:
                for k, point in enumerate(workload.points):
                    problem = microbatch_problem(
                        {"microbatch_size": size, "virtual_batch_size": virtual}, point.batch_size)
                    if problem is not None:
                        problems.append((size_where or virtual_where,
                                         f"microbatch_size {problem} (for workloads[{i}]."
                                         f"points[{k}])"))
                        break


def _search_problem(workload: str, path: str,
                    parameter: experiment_pb2.SearchParameter) -> str | None:
    """Why a search parameter writing ``workload.<key>`` gives a bad value, or None."""
    key = path.removeprefix("workload.")
    for value in _search_values(parameter):
        for _, reason in check_hyperparameters(workload, {key: value}):
            return f"writes {path} = {shorten(repr(value))} to {workload}: {reason}"
    return None


def check_spec(spec: experiment_pb2.ExperimentSpec, *,
               declarations: Mapping[str, WorkloadDeclaration] = DECLARATIONS) -> Problems:
    """Problems with a spec's names, limits and meaning, as (field path, reason) pairs.

    Args:
      spec: the submitted spec.
      declarations: the workloads whose meaning is known (batchlab.workloads).

    Returns:
      Every problem found (empty when there is none), each naming its field in the spec.
    """
    problems: Problems = []
    _check_strings(spec, problems)
    _check_names(spec, problems)
    _check_limits(spec, problems)
    if not problems:
        _check_meaning(spec, problems, declarations)
    return list(dict.fromkeys(problems))


def check_request_id(request_id: str) -> str | None:
    """Why a submission's idempotency key is refused, or None.

    Args:
      request_id: the client's key.
    """
    if len(request_id) > limits.MAX_REQUEST_ID_CHARS:
        return (f"must be at most {limits.MAX_REQUEST_ID_CHARS} characters (batchlab.limits), "
                f"got {len(request_id):,}")
    if _CONTROL.search(request_id):
        return f"must not contain control characters, got {shorten(request_id)}"
    return None
