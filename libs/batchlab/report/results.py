"""A typed, read-only view of an experiment's stored results, for tables and figures.

Reports are built only from what a runner stored, so any experiment (finished or still running)
can be reported again at any time:

    OUT/experiment.json                      name, spec, status, timestamps, command, studies
    OUT/runs/<study_id>/t{T}_r{R}_a{A}.json  one run attempt: {"request": ..., "result": ...}
    OUT/studies/<study_id>.json              a finished study: best trial and its StudyScore

A study without a studies/<id>.json (the experiment is still running) is scored from its run
files with `batchlab.search.scoring.score_study`, so the report shows how far it got; if even
that is impossible (a spec without the protocol settings) it is shown as in progress.

No JAX and no protobuf here: the controller service reports with numpy, matplotlib and json.

Example:
  >>> experiment = load_results("results/minimal")  # doctest: +SKIP
  >>> [s.id for s in experiment.studies]  # doctest: +SKIP
  ['mnist1d_resnet1d.nesterov.b128.s200', ...]
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from batchlab.errors import FieldError
from batchlab.search.compare import Arm
from batchlab.search.protocol import ProtocolError, RunRecord
from batchlab.search.scoring import (
    Effort,
    MetricSummary,
    SeedSummary,
    StudyScore,
    TuningTrial,
    score_study,
    summarize_metric,
)
from batchlab.search.space import SearchSpace, SpecError, parse_search_space
from batchlab.search.study import Study
from batchlab.targets import Goal, Outcome, Target, TargetReading

__all__ = [
    "Experiment",
    "ResultsFileError",
    "Run",
    "StudyGroup",
    "StudyInfo",
    "StudyResult",
    "load_results",
    "protocol_studies",
    "spec_get",
    "score_from_dict",
    "train_metric_name",
]

log = logging.getLogger(__name__)

_RUN_FILE = re.compile(r"^t(\d+)_r(\d+)_a(\d+)\.json$")


# ----------------------------------------------------------------------------- helpers


def _freeze(value: Any) -> Any:
    """Deep read-only copy: mappings become MappingProxyType, lists become tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Plain dicts and lists again (for code that wants mutable JSON data)."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_thaw(v) for v in value]
    return value


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def spec_get(mapping: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """A spec field by its proto name, or its protobuf JSON (lowerCamelCase) name."""
    if name in mapping:
        return mapping[name]
    return mapping.get(_camel(name), default)


def _number(value: Any) -> float:
    """A stored number as float: null -> NaN, "inf"/"-inf"/"nan" strings -> their float."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.lower() in ("inf", "-inf", "+inf", "nan", "infinity",
                                                     "-infinity"):
        return float(value)
    raise TypeError(f"expected a number, got {value!r}")


def _steps(value: Any) -> float:
    """A stored steps-to-target: null or "inf" -> math.inf (never reached)."""
    if value is None:
        return math.inf
    number = _number(value)
    if math.isnan(number) or number < 0:
        raise TypeError(f"expected steps >= 0, null or \"inf\", got {value!r}")
    return number


def train_metric_name(metric: str) -> str | None:
    """The train counterpart of a validation metric ("validation/x" -> "train/x").

    Args:
      metric: a metric name such as "validation/accuracy" or "validation/mlm_accuracy".

    Returns:
      The train metric name, or None when the metric is not a "validation/" one.
    """
    if metric.startswith("validation/"):
        return "train/" + metric.removeprefix("validation/")
    return None


class ResultsFileError(FieldError):
    """A stored results file that does not hold what it should, naming the file and the field.

    Args:
      file: the file's path.
      field_path: the field inside it, dotted.
      reason: what is wrong.
    """

    def __init__(self, file: Path | str, field_path: str, reason: str):
        super().__init__(field_path, reason)
        self.file = str(file)
        self.args = (f"{file}: {field_path}: {reason}",)


class _Reader:
    """Reads one JSON file; every error names the file and the field path."""

    def __init__(self, path: Path, root: Path):
        self.path = path
        try:
            self.name = str(path.relative_to(root))
        except ValueError:
            self.name = str(path)

    def load(self) -> Any:
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: missing (expected a results file)")
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.path}: not valid JSON ({error})") from error
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.path}: not UTF-8 text ({error})") from error

    def error(self, field: str, message: str) -> ResultsFileError:
        return ResultsFileError(self.path, field, message)

    def get(self, data: Any, field: str, kind: type | tuple[type, ...], *,
            optional: bool = False, default: Any = None) -> Any:
        """data[field's last part], checked against kind (field is a dotted path for errors)."""
        key = field.rsplit(".", 1)[-1]
        if not isinstance(data, Mapping):
            parent = field.rsplit(".", 1)[0] if "." in field else "(top level)"
            raise self.error(parent, f"must be a mapping, got {type(data).__name__}")
        if key not in data or data[key] is None:
            if optional:
                return default
            raise self.error(field, "missing")
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if int in kinds and float not in kinds and isinstance(value, float) \
                and value.is_integer():
            value = int(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(field, f"must be {_kind_names(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.error(field, f"must be {_kind_names(kinds)}, got {value!r}")
        return value

    def number(self, data: Mapping[str, Any], field: str, *, optional: bool = False) -> float:
        key = field.rsplit(".", 1)[-1]
        if key not in data and optional:
            return math.nan
        if key not in data:
            raise self.error(field, "missing")
        try:
            return _number(data[key])
        except TypeError as error:
            raise self.error(field, str(error)) from None


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {dict: "a mapping", Mapping: "a mapping", list: "a list", str: "a string",
             int: "an integer", float: "a number", bool: "true or false"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


# ----------------------------------------------------------------------------- the view


@dataclass(frozen=True)
class StudyInfo:
    """A study as experiment.json describes it.

    Args:
      id: the study id, f"{workload}.{optimizer}.b{batch_size}.s{step_budget}".
      workload: the workload name.
      optimizer: the spec's optimizer label (e.g. "lars_pipeline").
      optimizer_config: the label's base optimizer config (read-only).
      batch_size: examples per step.
      step_budget: training steps per run.
      eval_every_steps: evaluation period (resolution of steps-to-target).
      target: the target metric, value, goal, reading and margins.
      group_id: the id shared by the study's search replicates (the id without ".r<k>").
      replicate: the study's search replicate.
      eval_every_examples: the evaluation period in examples when the spec gave it so, else 0.
    """

    id: str
    workload: str
    optimizer: str
    optimizer_config: Mapping[str, Any]
    batch_size: int
    step_budget: int
    eval_every_steps: int
    target: Target
    group_id: str = ""
    replicate: int = 0
    eval_every_examples: int = 0

    @property
    def resolution_examples(self) -> int:
        """Examples between two evaluations: the resolution of steps-to-target in examples."""
        return self.eval_every_steps * self.batch_size

    @property
    def point(self) -> tuple[str, int, int]:
        """(workload, batch size, step budget): the studies compared side by side."""
        return (self.workload, self.batch_size, self.step_budget)

    @property
    def weights_optimizer(self) -> str:
        """The optimizer applied to the weights (the whole model for a single group)."""
        return _group_optimizer(self.optimizer_config, "weights")

    @property
    def bias_bn_optimizer(self) -> str:
        """The optimizer applied to biases and batch-norm parameters (Table 4's 2nd column)."""
        return _group_optimizer(self.optimizer_config, "bias_bn")

    @property
    def train_metric(self) -> str | None:
        """The train counterpart of the target metric, or None."""
        return train_metric_name(self.target.metric)


def _group_optimizer(config: Mapping[str, Any], group: str) -> str:
    if "optimizer" in config:
        return str(config["optimizer"])
    part = config.get(group)
    if isinstance(part, Mapping) and "optimizer" in part:
        return str(part["optimizer"])
    return "?"


@dataclass(frozen=True)
class Run:
    """One stored run attempt (request and result).

    Args:
      path: the file it was read from.
      study_id: its study.
      kind: "tuning" or "rerun".
      trial_index: the trial whose hyperparameters it used.
      replica: 0 for the tuning run, 1.. for reruns.
      seed: the run seed.
      attempt: 1 for the first attempt, 2.. for retries.
      hyperparameters: {"optimizer": config, "workload": overrides} (read-only).
      outcome: SUCCEEDED, DIVERGED, FAILED or CANCELLED; None while the run has no result.
      steps_completed: training steps the attempt ran.
      curve: the evaluations, one read-only mapping per point (metric -> value, with "step").
      steps_to_target: the first evaluation step meeting the target; math.inf if never.
      diverged_step: the step at which it diverged, if it did.
      error: the error message of a FAILED attempt.
      final_metrics: metrics at the end of training (NaN for a stored null).
      wall_time_s: wall-clock seconds of the attempt (NaN if not stored).
      examples_per_second: training throughput (NaN if not stored).
      failure: why a FAILED or CANCELLED attempt ended, as the controller records it ("RUN",
        "INFRASTRUCTURE", "CONTROLLER", "UNSCHEDULABLE"); None when not recorded.
      counted: whether the attempt counts toward max_attempts (attempts lost to a controller
        restart or a lost cluster link do not).
    """

    path: Path
    study_id: str
    kind: str
    trial_index: int
    replica: int
    seed: int
    attempt: int
    hyperparameters: Mapping[str, Any]
    outcome: Outcome | None
    steps_completed: int
    curve: tuple[Mapping[str, float], ...]
    steps_to_target: float
    diverged_step: int | None
    error: str | None
    final_metrics: Mapping[str, float]
    wall_time_s: float
    examples_per_second: float
    failure: str | None = None
    counted: bool = True

    @property
    def has_result(self) -> bool:
        """Whether the attempt ended as a result (SUCCEEDED or DIVERGED)."""
        return self.outcome in (Outcome.SUCCEEDED, Outcome.DIVERGED)

    def series(self, metric: str) -> tuple[list[float], list[float]]:
        """The (steps, values) of a metric along the stored curve; points without it are skipped.

        Args:
          metric: a curve key, e.g. "validation/accuracy" or "learning_rate".
        """
        steps: list[float] = []
        values: list[float] = []
        for point in self.curve:
            if metric in point and "step" in point:
                steps.append(point["step"])
                values.append(point[metric])
        return steps, values

    def to_record(self) -> RunRecord:
        """This attempt as a protocol RunRecord (for scoring an unfinished study).

        Raises:
          ValueError: the attempt has no outcome yet.
        """
        if self.outcome is None:
            raise ValueError(f"{self.path}: result: missing (the run has not finished)")
        return RunRecord(trial_index=self.trial_index, seed=self.seed, outcome=self.outcome,
                         final_metrics=dict(self.final_metrics),
                         steps_to_target=self.steps_to_target, steps_run=self.steps_completed,
                         curve=self.curve)


@dataclass(frozen=True)
class StudyResult:
    """A study with its runs and its score.

    Args:
      info: the study as experiment.json describes it.
      runs: its stored run attempts, ordered by (trial, replica, attempt).
      score: the stored score (studies/<id>.json), or one computed from the runs, or None.
      stored: whether the score was read from studies/<id>.json (the study finished).
      note: why the score is missing or provisional ("" for a stored score).
    """

    info: StudyInfo
    runs: tuple[Run, ...]
    score: StudyScore | None
    stored: bool
    note: str = ""

    @property
    def id(self) -> str:
        """The study id."""
        return self.info.id

    @property
    def done(self) -> bool:
        """Whether the score is final."""
        return self.score is not None and self.score.done

    @property
    def best_trial(self) -> int | None:
        """The selected trial, once tuning is complete."""
        return None if self.score is None else self.score.best_trial

    def tuning_runs(self) -> tuple[Run, ...]:
        """Tuning attempts (replica 0), every attempt included."""
        return tuple(r for r in self.runs if r.kind == "tuning")

    def scored_runs(self) -> tuple[Run, ...]:
        """The finished runs the score is over: reruns of the best trial with a result.

        When the study has no reruns of its best trial but a best trial (seeds_per_best 0),
        the best trial's tuning run, as scoring does.
        """
        best = self.best_trial
        if best is None:
            return ()
        reruns = tuple(r for r in self.runs
                       if r.trial_index == best and r.kind == "rerun" and r.has_result)
        if reruns:
            return tuple(sorted(reruns, key=lambda r: r.replica))
        # No rerun has a result, yet the score counts a finished seed: seeds_per_best is 0
        # and the score is over the best trial's tuning run.
        if self.score is not None and self.score.seeds.finished > 0:
            return tuple(r for r in self.runs
                         if r.trial_index == best and r.kind == "tuning" and r.has_result)
        return ()

    def feasible_scored_runs(self) -> tuple[Run, ...]:
        """Scored runs that succeeded with a finite target metric (the metric statistics')."""
        metric = self.info.target.metric
        return tuple(r for r in self.scored_runs()
                     if r.outcome is Outcome.SUCCEEDED
                     and math.isfinite(r.final_metrics.get(metric, math.nan)))

    def final_values(self, metric: str) -> list[float]:
        """A metric's final value of each feasible scored run (NaN where it was not stored).

        Args:
          metric: a final_metrics key.
        """
        return [r.final_metrics.get(metric, math.nan) for r in self.feasible_scored_runs()]

    def train_summary(self) -> MetricSummary | None:
        """The train counterpart of the target metric over the feasible scored runs, or None."""
        name = self.info.train_metric
        if name is None:
            return None
        return summarize_metric(v for v in self.final_values(name) if math.isfinite(v))

    def best_run(self) -> Run | None:
        """A run with the best trial's hyperparameters: its tuning run, else its first rerun."""
        best = self.best_trial
        if best is None:
            return None
        candidates = [r for r in self.runs if r.trial_index == best and r.has_result]
        candidates.sort(key=lambda r: (r.replica, r.attempt))
        return candidates[0] if candidates else None


@dataclass(frozen=True)
class StudyGroup:
    """One optimizer at one point: its studies, one per search replicate.

    Args:
      label: the optimizer label.
      studies: the replicates, in replicate order.
    """

    label: str
    studies: tuple[StudyResult, ...]

    @property
    def info(self) -> StudyInfo:
        """The first replicate's description (the point, target and configs are shared)."""
        return self.studies[0].info

    @property
    def done(self) -> bool:
        """Whether every replicate's score is final."""
        return all(s.done for s in self.studies)

    def seed_summaries(self) -> list[SeedSummary]:
        """Each scored replicate's seed summary."""
        return [s.score.seeds for s in self.studies if s.score is not None]

    def arm(self, *, steps: bool = False) -> Arm:
        """The seeds of every replicate, as one side of a comparison.

        Args:
          steps: compare steps-to-target (inf when not reached) instead of the final metric
            (for studies whose runs stop at the target).
        """
        summaries = self.seed_summaries()
        values = tuple(tuple(x.steps if steps else x.values) for x in summaries)
        return Arm(self.label, values, tuple(tuple(x.reached) for x in summaries))

    def train_arm(self) -> Arm | None:
        """The seeds' final train metric (the target's train counterpart), as a comparison arm.

        A seed that diverged counts at the worst value, as for the target metric; None when the
        target metric has no train counterpart.
        """
        name = self.info.train_metric
        if name is None:
            return None
        worst = self.info.target.worst_value()
        values, reached = [], []
        for study in self.studies:
            runs = study.scored_runs()
            numbers = [r.final_metrics.get(name, math.nan) if r.outcome is Outcome.SUCCEEDED
                       else math.nan for r in runs]
            values.append(tuple(v if math.isfinite(v) else worst for v in numbers))
            reached.append(tuple(False for _ in runs))
        return Arm(self.label, tuple(values), tuple(reached))

    def pooled(self) -> tuple[list[float], list[bool], list[float]]:
        """(values, reached, steps) of every finished seed, replicates concatenated."""
        values: list[float] = []
        reached: list[bool] = []
        steps: list[float] = []
        for summary in self.seed_summaries():
            values += summary.values
            reached += summary.reached
            steps += summary.steps
        return values, reached, steps

    def median_steps_to_target(self) -> float | None:
        """The median steps-to-target over every finished seed (inf: half or more never)."""
        steps = self.pooled()[2]
        return float(np.median(steps)) if steps else None


@dataclass(frozen=True)
class Experiment:
    """An experiment's stored results.

    Args:
      path: the results folder.
      name: the experiment name.
      spec: the ExperimentSpec as its JSON mapping (read-only).
      status: "RUNNING", "SUCCEEDED", ... as stored.
      started_at: ISO timestamp as stored.
      finished_at: ISO timestamp as stored, or None while running.
      command: the command that produced the results, as stored.
      studies: the studies, in experiment.json order.
      protocol: the protocol's Study of each study id, rebuilt from the stored spec (empty
        when the stored spec is not valid).
      code: the code that produced the results as the runner stored it ({"commit", "dirty",
        "version"}); empty when not stored.
      sessions: every start of the runner on this folder, oldest first: {"started_at",
        "code", "runs_before": run files already stored}; empty when not stored.
    """

    path: Path
    name: str
    spec: Mapping[str, Any]
    status: str
    started_at: str | None
    finished_at: str | None
    command: str
    studies: tuple[StudyResult, ...]
    protocol: Mapping[str, Study] = field(default_factory=lambda: MappingProxyType({}))
    code: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    sessions: tuple[Mapping[str, Any], ...] = ()

    def study(self, study_id: str) -> StudyResult:
        """The study with this id.

        Args:
          study_id: the id.

        Raises:
          KeyError: no such study.
        """
        for study in self.studies:
            if study.id == study_id:
                return study
        raise KeyError(f"no study {study_id!r} in {self.path}; known: "
                       f"{', '.join(s.id for s in self.studies)}")

    def points(self) -> list[tuple[str, int, int]]:
        """The (workload, batch size, step budget) points, in order of first appearance."""
        return list(dict.fromkeys(s.info.point for s in self.studies))

    def workloads(self) -> list[str]:
        """The workloads, in order of first appearance."""
        return list(dict.fromkeys(s.info.workload for s in self.studies))

    def optimizers(self) -> list[str]:
        """The optimizer labels in spec order (then any others in order of appearance)."""
        labels = [str(spec_get(o, "name")) for o in spec_get(self.spec, "optimizers", ())
                  if isinstance(o, Mapping)]
        labels += [s.info.optimizer for s in self.studies]
        return list(dict.fromkeys(labels))

    def at_point(self, workload: str, batch_size: int, step_budget: int) -> list[StudyResult]:
        """The studies of one (workload, batch size, step budget), in optimizer order.

        Args:
          workload: the workload name.
          batch_size: examples per step.
          step_budget: training steps.
        """
        order = {label: i for i, label in enumerate(self.optimizers())}
        found = [s for s in self.studies if s.info.point == (workload, batch_size, step_budget)]
        return sorted(found, key=lambda s: order[s.info.optimizer])

    def groups_at_point(self, workload: str, batch_size: int,
                        step_budget: int) -> list[StudyGroup]:
        """The optimizers of one point, each with its search replicates, in optimizer order.

        Args:
          workload: the workload name.
          batch_size: examples per step.
          step_budget: training steps.
        """
        groups: dict[str, list[StudyResult]] = {}
        for study in self.at_point(workload, batch_size, step_budget):
            groups.setdefault(study.info.optimizer, []).append(study)
        return [StudyGroup(label, tuple(sorted(found, key=lambda s: s.info.replicate)))
                for label, found in groups.items()]

    def replicates(self) -> int:
        """The most search replicates of any optimizer at any point (1 without replicates)."""
        return max((s.info.replicate + 1 for s in self.studies), default=1)

    def search_space(self, optimizer: str) -> SearchSpace | None:
        """The search space of an optimizer label from the stored spec (None if unreadable).

        Args:
          optimizer: the optimizer label.
        """
        for entry in spec_get(self.spec, "optimizers", ()):
            if isinstance(entry, Mapping) and spec_get(entry, "name") == optimizer:
                try:
                    return parse_search_space(_thaw(spec_get(entry, "search_space")))
                except SpecError as error:
                    log.warning("search space of %s unreadable: %s", optimizer, error)
                    return None
        return None

    def search_paths(self, optimizer: str) -> list[str]:
        """The tuned (non-fixed) search-space paths of an optimizer label, in spec order.

        Args:
          optimizer: the optimizer label.
        """
        space = self.search_space(optimizer)
        return [] if space is None else [p.path for p in space.parameters if p.tuned]

    def run_count(self) -> int:
        """Run files read, over every study."""
        return sum(len(s.runs) for s in self.studies)


# ----------------------------------------------------------------------------- parsing


def score_from_dict(data: Mapping[str, Any]) -> StudyScore:
    """Rebuild a StudyScore from its to_dict() form ("inf" strings, nulls for no data).

    Args:
      data: StudyScore.to_dict() output.

    Raises:
      KeyError, TypeError: a field is missing or has the wrong type.
    """
    def opt(value: Any) -> float | None:
        return None if value is None else _number(value)

    seeds = dict(data["seeds"])
    metric = dict(seeds.pop("metric"))
    for key in ("median", "q25", "q75", "min", "max"):
        metric[key] = opt(metric.get(key))
    summary = MetricSummary(**metric)
    for key in ("fraction_reaching_target", "median_steps_to_target"):
        seeds[key] = opt(seeds.get(key))
    seeds["values"] = tuple(_number(v) for v in seeds.get("values", ()))
    seeds["reached"] = tuple(bool(v) for v in seeds.get("reached", ()))
    seeds["steps"] = tuple(_steps(v) for v in seeds.get("steps", ()))
    seeds["diverged_mask"] = tuple(bool(v) for v in seeds.get("diverged_mask", ()))
    tuning = tuple(
        TuningTrial(trial_index=int(t["trial_index"]), value=_number(t["value"]),
                    diverged=bool(t["diverged"]), steps_to_target=_steps(t["steps_to_target"]),
                    counted=bool(t["counted"]))
        for t in data.get("tuning", ()))
    return StudyScore(
        study_id=str(data["study_id"]),
        workload=str(data["workload"]),
        optimizer=str(data["optimizer"]),
        batch_size=int(data["batch_size"]),
        step_budget=int(data["step_budget"]),
        target=dict(data["target"]),
        phase=str(data["phase"]),
        done=bool(data["done"]),
        best_trial=None if data.get("best_trial") is None else int(data["best_trial"]),
        best_hyperparameters=(None if data.get("best_hyperparameters") is None
                              else dict(data["best_hyperparameters"])),
        seeds=SeedSummary(**seeds, metric=summary),
        effort=Effort(**dict(data["effort"])),
        reason=str(data.get("reason", "")),
        group_id=str(data.get("group_id") or data["study_id"]),
        replicate=int(data.get("replicate") or 0),
        tuning=tuning,
    )


def _target(reader: _Reader, data: Any, field: str) -> Target:
    metric = reader.get(data, f"{field}.metric", str)
    value = reader.number(data, f"{field}.value")
    if not math.isfinite(value):
        raise reader.error(f"{field}.value", f"must be finite, got {value!r}")
    goal_raw = reader.get(data, f"{field}.goal", (str, int))
    try:
        goal = Goal[goal_raw.upper()] if isinstance(goal_raw, str) else Goal(goal_raw)
    except (KeyError, ValueError):
        raise reader.error(f"{field}.goal", f"must be one of {[g.name for g in Goal]}, "
                                            f"got {goal_raw!r}") from None
    reading_raw = reader.get(data, f"{field}.reading", str, optional=True,
                             default=TargetReading.FIRST_EVALUATION.name)
    try:
        reading = TargetReading[reading_raw]
    except KeyError:
        raise reader.error(f"{field}.reading", f"must be one of "
                           f"{[r.name for r in TargetReading]}, got {reading_raw!r}") from None
    margins = {}
    for key in ("equivalence_margin", "fraction_margin"):
        number = reader.number(data, f"{field}.{key}", optional=True)
        margins[key] = None if math.isnan(number) else number
    return Target(metric=metric, value=value, goal=goal, reading=reading, **margins)


def _study_info(reader: _Reader, data: Any, field: str) -> StudyInfo:
    if not isinstance(data, Mapping):
        raise reader.error(field, f"must be a mapping, got {data!r}")
    return StudyInfo(
        id=reader.get(data, f"{field}.id", str),
        workload=reader.get(data, f"{field}.workload", str),
        optimizer=reader.get(data, f"{field}.optimizer", str),
        optimizer_config=_freeze(reader.get(data, f"{field}.optimizer_config", Mapping)),
        batch_size=reader.get(data, f"{field}.batch_size", int),
        step_budget=reader.get(data, f"{field}.step_budget", int),
        eval_every_steps=reader.get(data, f"{field}.eval_every_steps", int, optional=True,
                                    default=0),
        target=_target(reader, reader.get(data, f"{field}.target", Mapping),
                       f"{field}.target"),
        group_id=reader.get(data, f"{field}.group_id", str, optional=True, default="")
        or reader.get(data, f"{field}.id", str),
        replicate=reader.get(data, f"{field}.replicate", int, optional=True, default=0),
        eval_every_examples=reader.get(data, f"{field}.eval_every_examples", int,
                                       optional=True, default=0),
    )


def _read_run(reader: _Reader, study_id: str) -> Run:
    data = reader.load()
    request = reader.get(data, "request", Mapping)
    result = reader.get(data, "result", Mapping, optional=True)
    stored_study = reader.get(request, "request.study_id", str)
    if stored_study != study_id:
        raise reader.error("request.study_id", f"is {stored_study!r} but the file is in the "
                                               f"folder of study {study_id!r}")
    kind = reader.get(request, "request.kind", str)
    if kind not in ("tuning", "rerun"):
        raise reader.error("request.kind", f"must be 'tuning' or 'rerun', got {kind!r}")
    outcome: Outcome | None = None
    curve: list[Mapping[str, float]] = []
    final: Mapping[str, float] = {}
    steps_to_target = math.inf
    steps_completed = 0
    diverged_step = error = None
    wall = throughput = math.nan
    if result is not None:
        raw = reader.get(result, "result.outcome", str)
        try:
            outcome = Outcome[raw.upper()]
        except KeyError:
            raise reader.error("result.outcome", f"must be one of "
                               f"{[o.name for o in Outcome]}, got {raw!r}") from None
        steps_completed = reader.get(result, "result.steps_completed", int, optional=True,
                                     default=0)
        for i, point in enumerate(reader.get(result, "result.curve", list, optional=True,
                                             default=[])):
            curve.append(_metrics(reader, point, f"result.curve[{i}]"))
        final = _metrics(reader, reader.get(result, "result.final_metrics", Mapping,
                                            optional=True, default={}), "result.final_metrics")
        try:
            steps_to_target = _steps(result.get("steps_to_target"))
        except TypeError as err:
            raise reader.error("result.steps_to_target", str(err)) from None
        diverged_step = reader.get(result, "result.diverged_step", int, optional=True)
        error = reader.get(result, "result.error", str, optional=True)
        wall = reader.number(result, "result.wall_time_s", optional=True)
        throughput = reader.number(result, "result.examples_per_second", optional=True)
    return Run(
        path=reader.path,
        study_id=study_id,
        kind=kind,
        trial_index=reader.get(request, "request.trial_index", int),
        replica=reader.get(request, "request.replica", int),
        seed=reader.get(request, "request.seed", int),
        attempt=reader.get(request, "request.attempt", int, optional=True, default=1),
        hyperparameters=_freeze(reader.get(request, "request.hyperparameters", Mapping,
                                           optional=True, default={})),
        outcome=outcome,
        steps_completed=steps_completed,
        curve=tuple(curve),
        steps_to_target=steps_to_target,
        diverged_step=diverged_step,
        error=error,
        final_metrics=MappingProxyType(final),
        wall_time_s=wall,
        examples_per_second=throughput,
        failure=(reader.get(result, "result.failure", str, optional=True)
                 if result is not None else None),
        counted=(reader.get(result, "result.counted", bool, optional=True, default=True)
                 if result is not None else True),
    )


def _metrics(reader: _Reader, data: Any, field: str) -> Mapping[str, float]:
    if not isinstance(data, Mapping):
        raise reader.error(field, f"must be a mapping of metric -> number, got {data!r}")
    out: dict[str, float] = {}
    for key, value in data.items():
        try:
            out[str(key)] = _number(value)
        except TypeError as error:
            raise reader.error(f"{field}.{key}", str(error)) from None
    return MappingProxyType(out)


def _run_order(path: Path) -> tuple[int, int, int, str]:
    match = _RUN_FILE.match(path.name)
    if match is None:
        return (1 << 62, 0, 0, path.name)
    trial, replica, attempt = (int(g) for g in match.groups())
    return (trial, replica, attempt, path.name)


def protocol_studies(spec: Mapping[str, Any]) -> dict[str, Study]:
    """The protocol's studies of a stored spec, by id (batchlab.search.expand_studies).

    The one place studies are rebuilt from a stored spec, so the seeds, Halton sequences and
    trial hyperparameters of stored runs are recognised exactly as the runner made them.

    Args:
      spec: the ExperimentSpec JSON mapping stored in experiment.json.

    Returns:
      Study by id; empty when the stored spec is not a valid spec (its studies are then shown
      as in progress, unscored).
    """
    from batchlab.search.spec import expand_studies  # protobuf, no JAX

    try:
        return {study.id: study for study in expand_studies(_thaw(spec))}
    except SpecError as error:
        log.warning("the stored spec is not a valid spec (%s); studies are not rescored",
                    str(error).splitlines()[0])
        return {}


def _provisional_score(study: Study | None, info: StudyInfo,
                       runs: Sequence[Run]) -> tuple[StudyScore | None, str]:
    if study is None:
        return None, "in progress (not scored: the stored spec does not describe this study)"
    try:
        records = [r.to_record() for r in runs if r.outcome is not None]
        score = score_study(study, records)
    except (ProtocolError, ValueError) as error:
        log.warning("study %s: cannot score from its run files (%s); shown as in progress",
                    info.id, error)
        return None, f"in progress (not scored: {error})"
    if score.done:
        return score, ("complete but no studies/<id>.json yet; scored from its run files "
                       f"({score.reason})")
    return score, f"in progress, scored from its run files so far ({score.reason})"


def load_results(results_dir: str | Path) -> Experiment:
    """Read an experiment's stored results into a read-only Experiment.

    Args:
      results_dir: the folder holding experiment.json, runs/ and studies/.

    Raises:
      FileNotFoundError: results_dir or its experiment.json is missing.
      ValueError: a file is not valid JSON or a field is missing or malformed; the message
        starts with the file's path and names the field (e.g. "studies[1].batch_size").
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such results folder")
    reader = _Reader(root / "experiment.json", root)
    data = reader.load()
    name = reader.get(data, "name", str)
    spec = _freeze(reader.get(data, "spec", Mapping, optional=True, default={}))
    status = reader.get(data, "status", str, optional=True, default="UNKNOWN")
    entries = reader.get(data, "studies", list)
    infos = [_study_info(reader, entry, f"studies[{i}]") for i, entry in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, info in enumerate(infos):
        if info.id in seen:
            raise reader.error(f"studies[{i}].id", f"{info.id!r} is also studies[{seen[info.id]}]")
        seen[info.id] = i
    known = set(seen)
    runs_root = root / "runs"
    if runs_root.is_dir():
        for folder in sorted(p for p in runs_root.iterdir() if p.is_dir()):
            if folder.name not in known:
                log.warning("%s: not a study of experiment.json; ignored", folder)

    studies: list[StudyResult] = []
    rebuilt = protocol_studies(spec) if spec else {}
    for info in infos:
        folder = runs_root / info.id
        files = sorted(folder.glob("t*_r*_a*.json"), key=_run_order) if folder.is_dir() else []
        runs = tuple(_read_run(_Reader(path, root), info.id) for path in files)
        study_path = root / "studies" / f"{info.id}.json"
        score: StudyScore | None
        if study_path.exists():
            score = _stored_score(_Reader(study_path, root), info)
            studies.append(StudyResult(info, runs, score, stored=True))
        else:
            score, note = _provisional_score(rebuilt.get(info.id), info, runs)
            studies.append(StudyResult(info, runs, score, stored=False, note=note))
    log.info("loaded %s: %d studies, %d run files", root, len(studies),
             sum(len(s.runs) for s in studies))
    return Experiment(
        path=root,
        name=name,
        spec=spec,
        status=status,
        started_at=reader.get(data, "started_at", str, optional=True),
        finished_at=reader.get(data, "finished_at", str, optional=True),
        command=reader.get(data, "command", str, optional=True, default=""),
        studies=tuple(studies),
        protocol=MappingProxyType(rebuilt),
        code=_freeze(reader.get(data, "code", Mapping, optional=True, default={})),
        sessions=_freeze(reader.get(data, "sessions", list, optional=True, default=[])),
    )


def _stored_score(reader: _Reader, info: StudyInfo) -> StudyScore:
    data = reader.load()
    stored = _study_info(reader, reader.get(data, "study", Mapping), "study")
    if stored.id != info.id:
        raise reader.error("study.id", f"is {stored.id!r}, expected {info.id!r}")
    raw = reader.get(data, "score", Mapping)
    try:
        score = score_from_dict(raw)
    except KeyError as error:
        raise reader.error(f"score.{error.args[0]}", "missing") from None
    except (TypeError, ValueError) as error:
        raise reader.error("score", f"malformed ({error})") from None
    best = reader.get(data, "best_trial", int, optional=True)
    if best is not None and best != score.best_trial:
        raise reader.error("best_trial", f"is {best} but score.best_trial is "
                                         f"{score.best_trial}")
    return score
