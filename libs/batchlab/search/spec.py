"""Load, validate and expand experiment specs (batchlab.v1.ExperimentSpec).

A spec file is the protobuf JSON mapping of ExperimentSpec written as YAML:
YAML -> dict -> google.protobuf.json_format.ParseDict(d, ExperimentSpec()). Before ParseDict
the dict is checked against the message descriptors, so every problem (unknown field, wrong
type, bad enum name, negative count) comes back as a SpecError naming its field path, e.g.
"workloads[0].points[1].batch_size: must be a non-negative integer, got -5"; then the values
are checked (budgets, ranges, names), and every optimizer config is validated by
batchlab.optim.schema with the search space set to its low corner, centre and high corner for
every (workload, point), so a range that produces an invalid config is reported up front.

Two YAML details are fixed on reading: `1e-4` is a float (PyYAML's YAML 1.1 reads it as the
string "1e-4"), and a key given twice is an error (PyYAML keeps the last one silently).

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check", Sections 2 and 4, Appendix D.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from batchlab.paths import get_path, set_path
from batchlab.search.space import (
    SearchSpace,
    SpecError,
    join_path,
    parse_search_space,
    plain_data,
)
from batchlab.search.study import (
    Selection,
    Study,
    fill_total_steps,
    trial_hyperparameters,
)
from batchlab.search.warm_start import warm_start_problems
from batchlab.targets import Goal, Target, TargetReading

try:
    from batchlab.proto.v1 import common_pb2, experiment_pb2
except ImportError as error:  # pragma: no cover - depends on the build step
    raise ImportError(
        "generated protobuf code is missing: run `make setup` or "
        "`python -m batchlab.proto.generate`") from error

ExperimentSpec = experiment_pb2.ExperimentSpec

__all__ = [
    "ExperimentSpec",
    "SpecError",
    "Study",
    "expand_studies",
    "load_spec",
    "parse_spec",
    "read_yaml",
    "resources_per_host",
    "spec_to_dict",
    "study_id",
    "trial_hyperparameters",
    "validate_spec",
]

DEFAULT_MAX_ATTEMPTS = 3
# Resources fields that count the whole run (split over its hosts); the others are per host.
# protos/batchlab/v1/experiment.proto (Resources) states the same.
PER_RUN_RESOURCES = ("gpus", "tpus")
_WORKLOAD_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# The largest u below 1: the high corner of the search space.
_U_MAX = math.nextafter(1.0, 0.0)
_CORNERS = (("centre", 0.5), ("low corner", 0.0), ("high corner", _U_MAX))


# --------------------------------------------------------------------------- YAML


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(source: str | os.PathLike[str]) -> Any:
    """Read a YAML file (or YAML text) into plain data with the fixes above.

    Args:
      source: a path to a .yaml file, or YAML text (anything containing a newline).

    Raises:
      SpecError: the file is missing or is not valid YAML (field path "").
    """
    if isinstance(source, str) and "\n" in source:
        text, where = source, "<text>"
    else:
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as error:
            raise SpecError("", f"cannot read spec {path}: {error}") from error
        where = str(path)
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as error:
        raise SpecError("", f"{where} is not valid YAML: {error}") from error


# --------------------------------------------------------- JSON shape vs descriptors

_JSON_WELL_KNOWN = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOAT_TYPES = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}


def _check_json_value(value: Any, where: str, problems: list[tuple[str, str]]) -> None:
    """Struct/Value contents: JSON values only (YAML can also produce dates, sets, ...)."""
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int | float):
        if not math.isfinite(value):
            problems.append((where, f"must be a finite number, got {value!r}"))
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append((where, f"keys must be strings, got {key!r}"))
            else:
                _check_json_value(item, join_path(where, key), problems)
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_value(item, join_path(where, i), problems)
        return
    problems.append((where, f"must be a JSON value (number, string, bool, list, mapping), "
                            f"got {type(value).__name__} {value!r}"))


def _check_scalar(field: FieldDescriptor, value: Any, where: str,
                  problems: list[tuple[str, str]]) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        full_name = field.message_type.full_name
        if full_name == "google.protobuf.Struct":
            if not isinstance(value, Mapping):
                problems.append((where, f"must be a mapping, got {value!r}"))
                return
        if full_name in _JSON_WELL_KNOWN:
            _check_json_value(value, where, problems)
        else:
            _check_message(value, field.message_type, where, problems)
        return
    if value is None:
        problems.append((where, "must not be null (leave the field out instead)"))
        return
    if field.type == FieldDescriptor.TYPE_ENUM:
        names = [v.name for v in field.enum_type.values]
        numbers = [v.number for v in field.enum_type.values]
        if isinstance(value, str) and value in names:
            return
        if isinstance(value, int) and not isinstance(value, bool) and value in numbers:
            return
        problems.append((where, f"must be one of {names[1:] if len(names) > 1 else names}, "
                                f"got {value!r}"))
        return
    if field.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            problems.append((where, f"must be true or false, got {value!r}"))
        return
    if field.type == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            problems.append((where, f"must be a string, got {value!r}"))
        return
    if field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        integral = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
        if not integral or not low <= value <= high:
            kind = "a non-negative integer" if low == 0 else "an integer"
            problems.append((where, f"must be {kind}, got {value!r}"))
        return
    if field.type in _FLOAT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append((where, f"must be a number, got {value!r}"))
        return
    problems.append((where, f"unsupported field type {field.type}"))  # bytes: none in the spec


def _check_message(data: Any, descriptor: Descriptor, where: str,
                   problems: list[tuple[str, str]]) -> None:
    if not isinstance(data, Mapping):
        problems.append((where, f"must be a mapping, got {data!r}"))
        return
    by_name = {f.name: f for f in descriptor.fields}
    by_name.update({f.json_name: f for f in descriptor.fields if f.json_name not in by_name})
    oneofs: dict[str, str] = {}
    for key, value in data.items():
        field_path = join_path(where, str(key))
        field = by_name.get(key) if isinstance(key, str) else None
        if field is None:
            known = [f.name for f in descriptor.fields]
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}"
            problems.append((field_path, f"unknown field of {descriptor.name}; {hint}"))
            continue
        oneof = field.containing_oneof
        if oneof is not None and not oneof.name.startswith("_"):  # "_x": proto3 optional
            if oneof.name in oneofs:
                problems.append((field_path, f"only one of "
                                 f"{', '.join(f.name for f in oneof.fields)} may be set; "
                                 f"{oneofs[oneof.name]!r} is set too"))
            oneofs[oneof.name] = field.name
        if field.is_repeated:
            if not isinstance(value, list):
                problems.append((field_path, f"must be a list, got {value!r}"))
                continue
            for i, item in enumerate(value):
                _check_scalar(field, item, join_path(field_path, i), problems)
        else:
            _check_scalar(field, value, field_path, problems)


def parse_spec(data: Any, *, known_workloads: Collection[str] | None = None,
               validate_optimizers: bool = True) -> experiment_pb2.ExperimentSpec:
    """Turn plain data (a parsed YAML spec) into a validated ExperimentSpec.

    Args:
      data: the protobuf JSON mapping of an ExperimentSpec.
      known_workloads: registered workload names; None skips that check (the caller owns the
        registry).
      validate_optimizers: validate every optimizer config with batchlab.optim.schema.

    Raises:
      SpecError: every problem found, each with its field path.
    """
    problems: list[tuple[str, str]] = []
    _check_message(data, ExperimentSpec.DESCRIPTOR, "", problems)
    if problems:
        raise SpecError.from_problems(problems)
    spec = ExperimentSpec()
    try:
        json_format.ParseDict(data, spec)
    except json_format.ParseError as error:  # the checks above should have caught it
        raise SpecError("", str(error)) from error
    validate_spec(spec, known_workloads=known_workloads, validate_optimizers=validate_optimizers)
    return spec


def load_spec(source: str | os.PathLike[str] | Mapping[str, Any] | experiment_pb2.ExperimentSpec,
              *, known_workloads: Collection[str] | None = None,
              validate_optimizers: bool = True) -> experiment_pb2.ExperimentSpec:
    """Load and validate an experiment spec from a YAML file, a mapping or a message.

    Args:
      source: a path to a YAML file, its already-parsed mapping, or an ExperimentSpec.
      known_workloads: registered workload names; None skips that check.
      validate_optimizers: validate every optimizer config with batchlab.optim.schema.

    Raises:
      SpecError: naming the field path of every problem.

    Example:
      >>> spec = load_spec("experiments/examples/minimal.yaml")  # doctest: +SKIP
      >>> [s.id for s in expand_studies(spec)]  # doctest: +SKIP
      ['mnist1d_resnet1d.nesterov.b128.s200', ...]
    """
    if isinstance(source, ExperimentSpec):
        validate_spec(source, known_workloads=known_workloads,
                      validate_optimizers=validate_optimizers)
        return source
    data = source if isinstance(source, Mapping) else read_yaml(source)
    return parse_spec(data, known_workloads=known_workloads,
                      validate_optimizers=validate_optimizers)


def resources_per_host(resources: Mapping[str, Any] | None) -> dict[str, Any]:
    """One host's share of a run's Resources: what each of its `num_hosts` trainers asks for.

    gpus and tpus count the whole run and are split evenly over its hosts; cpus and memory_gib
    are per host already. num_hosts itself is left out.

    Args:
      resources: a run's Resources as a mapping (field names as in the proto; missing or 0
        values: none; num_hosts 0 or missing: 1).

    Returns:
      The per-host mapping, without num_hosts and without zero values.

    Raises:
      ValueError: an accelerator count is not a multiple of num_hosts (naming the field).
        validate_spec refuses such specs; this guards other callers.

    >>> resources_per_host({"tpus": 128, "num_hosts": 32, "cpus": 8})
    {'tpus': 4, 'cpus': 8}
    """
    share = {k: v for k, v in dict(resources or {}).items() if v}
    hosts = max(int(share.pop("num_hosts", 1) or 1), 1)
    for name in PER_RUN_RESOURCES:
        if name in share:
            count = int(share[name])
            if count % hosts:
                raise ValueError(f"resources.{name}: must be a multiple of resources.num_hosts "
                                 f"({hosts}), got {count}")
            share[name] = count // hosts
    return share


def spec_to_dict(spec: experiment_pb2.ExperimentSpec) -> dict[str, Any]:
    """The protobuf JSON mapping of a spec with snake_case names (what a spec file holds).

    Args:
      spec: the spec.
    """
    data: dict[str, Any] = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    return data


# ------------------------------------------------------------------ value checks


def _struct(message: Any) -> dict[str, Any]:
    data: dict[str, Any] = plain_data(json_format.MessageToDict(message))
    return data


def _search_space(spec: experiment_pb2.ExperimentSpec, j: int,
                  problems: list[tuple[str, str]]) -> SearchSpace | None:
    where = f"optimizers[{j}].search_space"
    try:
        return parse_search_space(spec.optimizers[j].search_space, field_path=where)
    except SpecError as error:
        problems.extend(error.problems)
        return None


def eval_period(workload: experiment_pb2.WorkloadSpec,
                point: experiment_pb2.BatchPoint) -> tuple[int, int]:
    """A point's evaluation period as (steps, examples given); examples is 0 when given in steps.

    The point's own setting wins over the workload's; a period in examples becomes
    ceil(examples / batch_size) steps, so every batch size is evaluated at (about) the same
    number of examples and steps-to-target has the same resolution in examples.

    Args:
      workload: the workload entry.
      point: one of its points.
    """
    for owner in (point, workload):
        if owner.eval_every_steps:
            return owner.eval_every_steps, 0
        if owner.eval_every_examples:
            batch = max(point.batch_size, 1)
            return -(-owner.eval_every_examples // batch), owner.eval_every_examples
    return 0, 0


def _effective_eval(workload: experiment_pb2.WorkloadSpec,
                    point: experiment_pb2.BatchPoint) -> int:
    return eval_period(workload, point)[0]


def validate_spec(spec: experiment_pb2.ExperimentSpec, *,
                  known_workloads: Collection[str] | None = None,
                  validate_optimizers: bool = True) -> None:
    """Check the values of a parsed spec; raise one SpecError listing every problem.

    Args:
      spec: the spec (e.g. received over gRPC, or from parse_spec).
      known_workloads: registered workload names; None skips that check.
      validate_optimizers: validate every optimizer config with batchlab.optim.schema.

    Raises:
      SpecError: naming the field path of every problem.
    """
    from batchlab.search.admission import check_spec  # names, limits, meaning

    problems: list[tuple[str, str]] = list(check_spec(spec))
    add = problems.append
    if spec.trials_per_study < 1:
        add(("trials_per_study", f"must be >= 1 (feasible trials per study), "
                                 f"got {spec.trials_per_study}"))
    if spec.max_total_trials < max(spec.trials_per_study, 1):
        add(("max_total_trials", "required: the cap on tuning trials per study, diverged ones "
             f"included; must be >= trials_per_study ({spec.trials_per_study}), "
             f"got {spec.max_total_trials}"))
    if spec.selection == experiment_pb2.SELECTION_UNSPECIFIED:
        add(("selection", f"required: one of {[s.name for s in Selection]}"))
    elif int(spec.selection) not in set(Selection):
        add(("selection", f"must be one of {[s.name for s in Selection]}, "
                          f"got {spec.selection!r}"))
    if spec.stop_at_target and spec.selection not in (
            experiment_pb2.SELECTION_UNSPECIFIED, experiment_pb2.FEWEST_STEPS_TO_TARGET):
        add(("stop_at_target", "needs selection FEWEST_STEPS_TO_TARGET: a run stopped at the "
                               "target has no final metric to select on"))
    if spec.stop_at_target and any(w.target.reading == experiment_pb2.END_OF_BUDGET
                                   for w in spec.workloads):
        add(("stop_at_target", "cannot be combined with the END_OF_BUDGET reading, which "
                               "needs every run to reach the end of its budget"))
    if spec.HasField("resources"):
        for name in ("cpus", "memory_gib"):
            value = getattr(spec.resources, name)
            if not math.isfinite(value) or value < 0:
                add((f"resources.{name}", f"must be a finite number >= 0, got {value!r}"))
        hosts = max(spec.resources.num_hosts, 1)
        for name in PER_RUN_RESOURCES:
            value = getattr(spec.resources, name)
            if value % hosts:
                add((f"resources.{name}", f"must be a multiple of resources.num_hosts ({hosts}): "
                     f"{name} counts the whole run, split evenly over its hosts; got {value}"))

    if not spec.workloads:
        add(("workloads", "must list at least one workload"))
    seen_workloads: dict[str, int] = {}
    for i, workload in enumerate(spec.workloads):
        where = f"workloads[{i}]"
        name = workload.workload
        if not _WORKLOAD_RE.fullmatch(name):
            pass  # admission.check_spec reports it, quoting a short prefix
        elif known_workloads is not None and name not in known_workloads:
            close = difflib.get_close_matches(name, sorted(known_workloads), n=1)
            hint = f"did you mean {close[0]!r}?" if close else \
                f"known: {', '.join(sorted(known_workloads))}"
            add((f"{where}.workload", f"unknown workload {name!r}; {hint}"))
        if name in seen_workloads:
            add((f"{where}.workload", f"{name!r} is already workloads[{seen_workloads[name]}]"))
        seen_workloads.setdefault(name, i)
        if not workload.HasField("target"):
            add((f"{where}.target", "required: {metric, value, goal}"))
        else:
            target = workload.target
            if not target.metric:
                add((f"{where}.target.metric", "required, e.g. 'validation/accuracy'"))
            if not target.HasField("value"):
                add((f"{where}.target.value", "required"))
            elif not math.isfinite(target.value):
                add((f"{where}.target.value", f"must be finite, got {target.value!r}"))
            if target.goal == common_pb2.GOAL_UNSPECIFIED:
                add((f"{where}.target.goal", f"required: one of {[g.name for g in Goal]}"))
            elif target.goal not in set(Goal):
                add((f"{where}.target.goal", f"must be one of {[g.name for g in Goal]}, "
                                             f"got {target.goal!r}"))
            if target.reading and target.reading not in set(TargetReading):
                add((f"{where}.target.reading", f"must be one of "
                     f"{[r.name for r in TargetReading]}, got {target.reading!r}"))
            if target.HasField("equivalence_margin") and not (
                    math.isfinite(target.equivalence_margin) and target.equivalence_margin > 0):
                add((f"{where}.target.equivalence_margin",
                     f"must be a finite number > 0, got {target.equivalence_margin!r}"))
            if target.HasField("fraction_margin") and not (
                    math.isfinite(target.fraction_margin) and 0 < target.fraction_margin < 1):
                add((f"{where}.target.fraction_margin",
                     f"must be in (0, 1), got {target.fraction_margin!r}"))
        if workload.eval_every_steps and workload.eval_every_examples:
            add((f"{where}.eval_every_examples", "give the evaluation period in steps or in "
                 "examples, not both"))
        if not workload.points:
            add((f"{where}.points", "must list at least one {batch_size, step_budget}"))
        seen_points: dict[tuple[int, int], int] = {}
        for k, point in enumerate(workload.points):
            point_where = f"{where}.points[{k}]"
            if point.batch_size < 1:
                add((f"{point_where}.batch_size", f"must be > 0, got {point.batch_size}"))
            if point.step_budget < 1:
                add((f"{point_where}.step_budget", f"must be > 0, got {point.step_budget}"))
            if point.eval_every_steps and point.eval_every_examples:
                add((f"{point_where}.eval_every_examples", "give the evaluation period in "
                     "steps or in examples, not both"))
            every = _effective_eval(workload, point)
            if every < 1:
                add((f"{point_where}.eval_every_steps", "required here or in "
                     f"{where}: eval_every_steps or eval_every_examples, > 0"))
            elif point.step_budget >= 1 and every > point.step_budget:
                field = ("eval_every_steps" if point.eval_every_steps else "step_budget")
                add((f"{point_where}.{field}", f"eval_every_steps ({every}) exceeds step_budget "
                     f"({point.step_budget}): no evaluation would run"))
            key = (point.batch_size, point.step_budget)
            if key in seen_points:
                add((point_where, f"same batch_size and step_budget as points"
                                  f"[{seen_points[key]}]"))
            seen_points.setdefault(key, k)

    if not spec.optimizers:
        add(("optimizers", "must list at least one optimizer"))
    seen_optimizers: dict[str, int] = {}
    spaces: dict[int, SearchSpace] = {}
    for j, optimizer in enumerate(spec.optimizers):
        where = f"optimizers[{j}]"
        if optimizer.name in seen_optimizers:
            add((f"{where}.name", f"{optimizer.name!r} is already "
                                  f"optimizers[{seen_optimizers[optimizer.name]}]"))
        seen_optimizers.setdefault(optimizer.name, j)
        if not optimizer.HasField("config") or not optimizer.config.fields:
            add((f"{where}.config", "required: the optimizer config mapping"))
            continue
        space = _search_space(spec, j, problems)
        if space is not None:
            spaces[j] = space
    for c, comparison in enumerate(spec.comparisons):
        for side in ("a", "b"):
            label = getattr(comparison, side)
            if label not in seen_optimizers:
                add((f"comparisons[{c}].{side}", f"must name an optimizer label of this spec "
                     f"({', '.join(sorted(seen_optimizers)) or 'none'}), got {label!r}"))
        if comparison.a and comparison.a == comparison.b:
            add((f"comparisons[{c}].b", f"compares {comparison.a!r} with itself"))

    problems.extend(warm_start_problems(spec))
    if validate_optimizers and not problems:
        for j, space in spaces.items():
            _validate_optimizer_samples(spec, j, space, problems)
    if problems:
        unique = list(dict.fromkeys(problems))
        raise SpecError.from_problems(unique)


def _parameter_for(space: SearchSpace, config_path: str) -> int | None:
    """The search parameter writing config_path ("optimizer.<...>") or a mapping above it."""
    for p, parameter in enumerate(space.parameters):
        for path in parameter.paths:
            if config_path == path or config_path.startswith(path + "."):
                return p
    return None


def _validate_optimizer_samples(spec: experiment_pb2.ExperimentSpec, j: int,
                                space: SearchSpace, problems: list[tuple[str, str]]) -> None:
    from batchlab.optim.schema import ConfigError, validate_optimizer_config

    optimizer = spec.optimizers[j]
    where = f"optimizers[{j}]"
    config = _struct(optimizer.config)
    for i, workload in enumerate(spec.workloads):
        base = {"optimizer": config, "workload": _struct(workload.hyperparameters)}
        for k, point in enumerate(workload.points):
            for corner, u in _CORNERS:
                mapping = {key: plain_data(value) for key, value in base.items()}
                failed = False
                for p, parameter in enumerate(space.parameters):
                    value = parameter.value_at(u if parameter.tuned else None)
                    for t, path in enumerate(parameter.paths):
                        try:
                            set_path(mapping, path, value)
                        except ValueError as error:
                            field = "path" if t == 0 else f"tied_paths[{t - 1}]"
                            problems.append(
                                (f"{where}.search_space.parameters[{p}].{field}", str(error)))
                            failed = True
                if failed:
                    return
                fill_total_steps(mapping["optimizer"], point.step_budget)
                try:
                    validate_optimizer_config(mapping["optimizer"], path=f"{where}.config",
                                              total_steps=point.step_budget)
                except ConfigError as error:
                    context = (f"at the search space's {corner}, for workloads[{i}].points[{k}] "
                               f"(batch {point.batch_size}, {point.step_budget} steps)")
                    relative = error.field_path.removeprefix(f"{where}.config")
                    parameter_index = _parameter_for(space, "optimizer" + relative)
                    if parameter_index is not None:
                        value = get_path(mapping, "optimizer" + relative)
                        problems.append((
                            f"{where}.search_space.parameters[{parameter_index}]",
                            f"gives {error.field_path} = {value!r} {context}: {error.reason}"))
                    else:
                        problems.append((error.field_path, f"{error.reason} ({context})"))
                    return


# ------------------------------------------------------------------ studies


def study_id(workload: str, optimizer: str, batch_size: int, step_budget: int, *,
             replicate: int | None = None) -> str:
    """A study's stable id: f"{workload}.{optimizer}.b{batch_size}.s{step_budget}[.r{k}]".

    Names cannot contain '.', so the id splits back unambiguously; it holds no '/', so it is
    one segment of a resource name (experiments/{e}/studies/{study_id}). The replicate suffix
    is present only when the spec asks for more than one search replicate, so the ids of
    single-replicate experiments are unchanged.

    Args:
      workload: the workload name.
      optimizer: the optimizer label.
      batch_size: examples per step.
      step_budget: training steps.
      replicate: the search replicate, or None for a single-replicate spec.
    """
    base = f"{workload}.{optimizer}.b{batch_size}.s{step_budget}"
    return base if replicate is None else f"{base}.r{replicate}"


def expand_studies(spec: experiment_pb2.ExperimentSpec | Mapping[str, Any]) -> list[Study]:
    """All studies of a spec: workloads x optimizers x points, in that nesting order.

    Args:
      spec: an ExperimentSpec, or its mapping (loaded with load_spec first). A message is
        checked again (without the optimizer schema, which load_spec already ran).

    Raises:
      SpecError: the spec is invalid.

    References:
      Nado et al. 2021, Section 4 (one tuning study per optimizer and batch size).
    """
    if isinstance(spec, ExperimentSpec):
        validate_spec(spec, validate_optimizers=False)
    else:
        spec = load_spec(spec)
    resources = json_format.MessageToDict(spec.resources, preserving_proto_field_name=True)
    studies: list[Study] = []
    replicates = max(spec.search_replicates, 1)
    for workload in spec.workloads:
        target = target_of(workload)
        hyperparameters = _struct(workload.hyperparameters)
        for j, optimizer in enumerate(spec.optimizers):
            space = parse_search_space(optimizer.search_space,
                                       field_path=f"optimizers[{j}].search_space")
            config = _struct(optimizer.config)
            for point, replicate in ((p, r) for p in workload.points
                                     for r in range(replicates)):
                steps, examples = eval_period(workload, point)
                studies.append(Study(
                    id=study_id(workload.workload, optimizer.name, point.batch_size,
                                point.step_budget,
                                replicate=replicate if replicates > 1 else None),
                    index=len(studies),
                    experiment=spec.name,
                    workload=workload.workload,
                    optimizer=optimizer.name,
                    batch_size=point.batch_size,
                    step_budget=point.step_budget,
                    eval_every_steps=steps,
                    target=target,
                    search_space=space,
                    optimizer_config=config,
                    workload_hyperparameters=hyperparameters,
                    search_seed=spec.search_seed,
                    trials_per_study=spec.trials_per_study,
                    max_total_trials=spec.max_total_trials,
                    seeds_per_best=spec.seeds_per_best,
                    selection=Selection(spec.selection),
                    max_attempts=spec.max_attempts or DEFAULT_MAX_ATTEMPTS,
                    resources=resources,
                    replicate=replicate,
                    search_replicates=replicates,
                    share_search_points=spec.share_search_points,
                    eval_every_examples=examples,
                    stop_at_target=spec.stop_at_target,
                ))
    return studies


def target_of(workload: experiment_pb2.WorkloadSpec) -> Target:
    """The Target of a workload entry, with its reading and margins (defaults applied).

    Args:
      workload: a validated workload entry.
    """
    target = workload.target
    return Target(
        metric=target.metric, value=target.value, goal=Goal(target.goal),
        reading=TargetReading(target.reading or TargetReading.FIRST_EVALUATION),
        equivalence_margin=(target.equivalence_margin if target.HasField("equivalence_margin")
                            else None),
        fraction_margin=(target.fraction_margin if target.HasField("fraction_margin")
                         else None))
