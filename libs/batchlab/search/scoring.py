"""Scoring: steps-to-target of a run, and a study's score over the seed reruns of its best trial.

Conventions, stated once:
  - A run's steps-to-target is the first evaluation step whose metric meets the target, and
    math.inf if none does. NaN never meets a target (NaN >= x is False, but so is NaN <= x:
    nothing is left to chance by comparison order).
  - A seed "reaches the target" when its steps-to-target is finite (the target was met at some
    evaluation, as MLPerf counts it), even if a later evaluation fell below it.
  - A diverged seed (outcome DIVERGED, or a NaN/inf final metric) has steps-to-target inf, is
    excluded from the metric statistics, and is reported in its own count. Infrastructure
    failures that were abandoned are excluded from everything and counted separately.
  - Non-finite values are dropped with an explicit np.isfinite mask (AlgoPerf's scoring used
    `x != np.nan`, which is always True and drops nothing).
  - Quartiles are numpy's default (linear interpolation) percentiles 25 and 75.
  - The median steps-to-target is over every finished seed with inf for those that did not
    reach the target, so it is finite only when more than half of them reached it.
  - In to_dict() output, infinity is the string "inf" (JSON has no infinity; float("inf")
    reads it back) and a statistic with no data is null.

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check", Section 2 (median over 50 seeds,
  fraction of seeds reaching the target) and Appendix D.3 (feasible trials).
  MLCommons AlgoPerf scoring (steps-to-target, infinity when never reached).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchlab.search.protocol import (
    Outcome,
    Phase,
    RunRecord,
    RunStatus,
    study_state,
)
from batchlab.search.study import Goal, Study, Target

INF_JSON = "inf"


def _goal(goal: Goal | int | str) -> Goal:
    if isinstance(goal, str):
        return Goal[goal.upper()]
    return Goal(goal)


def steps_to_target(eval_steps: Sequence[int], metric_values: Sequence[float], target: float,
                    goal: Goal | int | str) -> int | float:
    """The first evaluation step whose metric meets the target; math.inf if none does.

    Args:
      eval_steps: the steps at which the metric was evaluated, non-decreasing.
      metric_values: the metric at those steps (NaN allowed: it never meets the target).
      target: the target value.
      goal: Goal.MAXIMIZE (met when value >= target) or Goal.MINIMIZE (value <= target), or
        its name or number.

    Example:
      >>> steps_to_target([100, 200, 300], [0.5, 0.8, 0.9], 0.75, Goal.MAXIMIZE)
      200

    References:
      Shared reference/optimizers.md section 8; AlgoPerf scoring.
    """
    if len(eval_steps) != len(metric_values):
        raise ValueError(f"eval_steps ({len(eval_steps)}) and metric_values "
                         f"({len(metric_values)}) differ in length")
    if any(b < a for a, b in zip(eval_steps, eval_steps[1:], strict=False)):
        raise ValueError("eval_steps must be non-decreasing")
    rule = Target(metric="", value=float(target), goal=_goal(goal))
    for step, value in zip(eval_steps, metric_values, strict=True):
        if rule.is_met(float(value)):
            return int(step)
    return math.inf


def _json(value: Any) -> Any:
    if isinstance(value, float):
        if math.isinf(value):
            return INF_JSON if value > 0 else "-" + INF_JSON
        if math.isnan(value):
            return None
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    return value


class _ToDict:
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: inf as "inf", missing statistics as null."""
        return _json(dataclasses.asdict(self))  # type: ignore[call-overload]


@dataclass(frozen=True)
class MetricSummary(_ToDict):
    """Distribution of a metric over seeds, finite values only.

    Args:
      count: finite values summarised.
      dropped: non-finite values left out (NaN, inf).
      median: median (None when count is 0).
      q25: 25th percentile (numpy linear interpolation).
      q75: 75th percentile.
      min: smallest value.
      max: largest value.
    """

    count: int
    dropped: int
    median: float | None
    q25: float | None
    q75: float | None
    min: float | None
    max: float | None


def summarize_metric(values: Iterable[float | None]) -> MetricSummary:
    """Median, quartiles, min and max of the finite values; non-finite ones are counted apart.

    Args:
      values: one metric value per seed (None, NaN and inf are dropped and counted).

    References:
      Nado et al. 2021, Figure 4 (min, max and quartiles over 50 runs).
    """
    array = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    finite = array[np.isfinite(array)]
    dropped = int(array.size - finite.size)
    if finite.size == 0:
        return MetricSummary(0, dropped, None, None, None, None, None)
    q25, median, q75 = (float(x) for x in np.percentile(finite, [25, 50, 75]))
    return MetricSummary(int(finite.size), dropped, median, q25, q75,
                         float(finite.min()), float(finite.max()))


@dataclass(frozen=True)
class SeedSummary(_ToDict):
    """A study's result over the seed reruns of its best trial.

    Args:
      planned: reruns asked for (seeds_per_best; 1 when scored on the best tuning run).
      finished: reruns with a result (succeeded + diverged).
      succeeded: reruns that finished with a finite metric.
      diverged: reruns that diverged (excluded from `metric`).
      abandoned: reruns given up after infrastructure failures (excluded from everything).
      reached_target: finished reruns whose steps-to-target is finite.
      fraction_reaching_target: reached_target / finished (None when nothing finished).
      median_steps_to_target: median over finished reruns with inf for those that did not
        reach the target (inf unless more than half reached it; None when nothing finished).
      metric: the target metric over the succeeded reruns.
    """

    planned: int
    finished: int
    succeeded: int
    diverged: int
    abandoned: int
    reached_target: int
    fraction_reaching_target: float | None
    median_steps_to_target: float | None
    metric: MetricSummary


def summarize_seeds(metric_values: Sequence[float | None], steps: Sequence[float],
                    diverged: Sequence[bool], *, abandoned: int = 0,
                    planned: int | None = None) -> SeedSummary:
    """Summarise finished seeds: metric statistics, divergence and reaching the target.

    Args:
      metric_values: the final target metric of each finished seed (ignored when diverged).
      steps: each seed's steps-to-target (inf when never reached; forced to inf when diverged).
      diverged: whether each seed diverged; a non-finite metric also counts as diverged.
      abandoned: seeds abandoned after infrastructure failures.
      planned: seeds asked for (defaults to finished + abandoned).

    References:
      Nado et al. 2021, Section 2 (median over seeds, seeds reaching the target).
    """
    if not len(metric_values) == len(steps) == len(diverged):
        raise ValueError("metric_values, steps and diverged must have the same length")
    metrics: list[float | None] = []
    seed_steps: list[float] = []
    diverged_count = 0
    for value, step, bad in zip(metric_values, steps, diverged, strict=True):
        if bad or value is None or not math.isfinite(value):
            diverged_count += 1
            seed_steps.append(math.inf)
        else:
            metrics.append(value)
            seed_steps.append(math.inf if step is None or math.isnan(step) else float(step))
    finished = len(seed_steps)
    reached = sum(1 for s in seed_steps if math.isfinite(s))
    return SeedSummary(
        planned=finished + abandoned if planned is None else planned,
        finished=finished,
        succeeded=finished - diverged_count,
        diverged=diverged_count,
        abandoned=abandoned,
        reached_target=reached,
        fraction_reaching_target=reached / finished if finished else None,
        median_steps_to_target=float(np.median(seed_steps)) if finished else None,
        metric=summarize_metric(metrics),
    )


@dataclass(frozen=True)
class Effort(_ToDict):
    """What a study spent: trials, runs and steps in tuning and reruns.

    Args:
      total_trials: tuning trials with a final status (feasible + diverged + abandoned).
      feasible_trials: tuning trials that finished without diverging.
      diverged_trials: tuning trials that diverged.
      abandoned_trials: tuning trials given up after infrastructure failures.
      runs: run attempts recorded, retries and reruns included.
      failed_attempts: attempts that ended FAILED or CANCELLED.
      tuning_steps: training steps of every tuning attempt.
      rerun_steps: training steps of every rerun attempt.
      total_steps: tuning_steps + rerun_steps.
      total_examples: total_steps x batch size (compares effort across batch sizes).
    """

    total_trials: int
    feasible_trials: int
    diverged_trials: int
    abandoned_trials: int
    runs: int
    failed_attempts: int
    tuning_steps: int
    rerun_steps: int
    total_steps: int
    total_examples: int


@dataclass(frozen=True)
class StudyScore(_ToDict):
    """A study's score: its best trial, the seed summary and the tuning effort.

    Args:
      study_id: the study.
      workload: the workload name.
      optimizer: the optimizer label.
      batch_size: examples per step.
      step_budget: training steps per run.
      target: the target (metric, value, goal name).
      phase: "tuning", "reruns" or "done".
      done: whether the study needs no more runs (the score is final).
      best_trial: the selected trial (None before tuning is complete or with no feasible trial).
      best_hyperparameters: that trial's hyperparameters.
      seeds: the summary over the best trial's reruns (over its tuning run when
        seeds_per_best is 0), so far.
      effort: the tuning effort.
      reason: the protocol's explanation of the phase.
    """

    study_id: str
    workload: str
    optimizer: str
    batch_size: int
    step_budget: int
    target: dict[str, Any]
    phase: str
    done: bool
    best_trial: int | None
    best_hyperparameters: dict[str, Any] | None
    seeds: SeedSummary
    effort: Effort
    reason: str


def score_study(study: Study, records: Iterable[RunRecord]) -> StudyScore:
    """Score a study from its records (final once the protocol says it is done).

    The score is over the reruns of the best trial, not its tuning run, which selection has
    favoured; with seeds_per_best = 0 it is the best tuning run alone.

    Args:
      study: the study.
      records: every run attempt recorded for it.

    References:
      Nado et al. 2021, Sections 2 and 4 (median over the seeds of the best trial).
    """
    records = list(records)
    state = study_state(study, records)
    metric = study.target.metric
    if state.best_trial is not None and study.seeds_per_best == 0:
        scored = [state.tuning[state.best_trial]]
    else:
        scored = list(state.reruns)
    results = [s.result for s in scored if s.result is not None]
    seeds = summarize_seeds(
        [r.final_metrics.get(metric) for r in results],
        [r.steps_to_target for r in results],
        [s.status is RunStatus.DIVERGED for s in scored if s.result is not None],
        abandoned=sum(1 for s in scored if s.status is RunStatus.ABANDONED),
        planned=(1 if study.seeds_per_best == 0 else study.seeds_per_best)
        if state.best_trial is not None else 0,
    )
    tuning_keys = {s.key for s in state.tuning.values()}
    tuning_steps = sum(r.steps_run for r in records if r.key in tuning_keys)
    rerun_steps = sum(r.steps_run for r in records if r.key not in tuning_keys)
    effort = Effort(
        total_trials=sum(1 for s in state.tuning.values() if s.status.terminal),
        feasible_trials=state.feasible_trials,
        diverged_trials=state.diverged_trials,
        abandoned_trials=state.abandoned_trials,
        runs=len(records),
        failed_attempts=sum(1 for r in records
                            if r.outcome in (Outcome.FAILED, Outcome.CANCELLED)),
        tuning_steps=tuning_steps,
        rerun_steps=rerun_steps,
        total_steps=tuning_steps + rerun_steps,
        total_examples=(tuning_steps + rerun_steps) * study.batch_size,
    )
    best_hyperparameters = (study.hyperparameters(state.best_trial)
                            if state.best_trial is not None else None)
    return StudyScore(
        study_id=study.id,
        workload=study.workload,
        optimizer=study.optimizer,
        batch_size=study.batch_size,
        step_budget=study.step_budget,
        target=study.target.to_dict(),
        phase=state.phase.value,
        done=state.phase is Phase.DONE,
        best_trial=state.best_trial,
        best_hyperparameters=best_hyperparameters,
        seeds=seeds,
        effort=effort,
        reason=state.reason,
    )


__all__ = [
    "INF_JSON",
    "Effort",
    "MetricSummary",
    "SeedSummary",
    "StudyScore",
    "score_study",
    "steps_to_target",
    "summarize_metric",
    "summarize_seeds",
]
