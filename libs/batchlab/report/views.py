"""The typed, read-only view of an experiment's stored results that tables and figures use:
Experiment, its StudyResults (studies), StudyGroups (search replicates of one study), Runs."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from batchlab.report.reader import spec_get, thaw
from batchlab.search.compare import Arm
from batchlab.search.protocol import RunRecord
from batchlab.search.scoring import (
    MetricSummary,
    SeedSummary,
    StudyScore,
    summarize_metric,
)
from batchlab.search.space import SearchSpace, SpecError, parse_search_space
from batchlab.search.study import Study
from batchlab.targets import Outcome, Target

log = logging.getLogger(__name__)

__all__ = ["Experiment", "Run", "StudyGroup", "StudyInfo", "StudyResult", "train_metric_name"]


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
      written_by: the code of the runner session that wrote the file ({"commit", "dirty",
        "version"}); None when the file does not record it (copied in, or older batchlab).
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
    written_by: Mapping[str, Any] | None = None

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
      ignored: folders under runs/ that hold run files but are not studies of
        experiment.json (another spec's runs, say): not read, and named in the report.
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
    ignored: tuple[str, ...] = ()

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
                    return parse_search_space(thaw(spec_get(entry, "search_space")))
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
