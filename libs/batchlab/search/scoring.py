"""Scoring: steps-to-target of a run, and a study's score over the seed reruns of its best trial.

Conventions, stated once (the report prints them):
  - A run's steps-to-target is the first evaluation step whose metric meets the target, and
    math.inf if none does. NaN never meets a target (NaN >= x is False, but so is NaN <= x:
    nothing is left to chance by comparison order).
  - Whether a seed "reaches the target" follows the target's reading: FIRST_EVALUATION (the
    default; MLPerf, AlgoPerf) when some evaluation met it; END_OF_BUDGET (the paper's Tables 2
    and 3) when the final evaluation meets it, steps-to-target then being the first evaluation
    from which every later one meets the target.
  - A diverged seed (outcome DIVERGED, or a NaN/inf final metric) never reaches the target and
    counts in the metric statistics as the worst possible value (`Target.worst_value`: 0 for an
    accuracy, -inf for another maximised metric, +inf for a minimised one), so an optimizer that
    sometimes diverges is not favoured by dropping its failures. Infrastructure failures that
    were abandoned are excluded from everything and counted separately.
  - Quartiles are linear-interpolation percentiles 25 and 75 (numpy's default), computed so that
    an infinite worst value gives an infinite quartile rather than NaN.
  - The median steps-to-target is over every finished seed with inf for those that did not
    reach the target, so it is finite only when more than half of them reached it.
  - In to_dict() output, infinity is the string "inf" (JSON has no infinity; float("inf")
    reads it back) and a statistic with no data is null.

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check", Section 2 (median over 50 seeds,
  fraction of seeds reaching the target) and Appendix D.3 (feasible trials).
  MLCommons AlgoPerf scoring (steps-to-target, infinity when never reached).
  Shared reference/protocol.md ("a diverged seed must be counted as the worst value").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchlab.search.protocol import (
    Phase,
    RunRecord,
    RunStatus,
    reading_steps,
    study_state,
)
from batchlab.search.study import Study
from batchlab.targets import Goal, Outcome, steps_to_target

INF_JSON = "inf"


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
        # The mixin is only mixed into dataclasses, which mypy cannot see from here.
        data: dict[str, Any] = _json(dataclasses.asdict(self))  # type: ignore[call-overload]
        return data


def quantile(sorted_values: Sequence[float] | np.ndarray, q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of sorted values, safe with infinities.

    numpy interpolates a + (b - a) * t, which is NaN when a or b is infinite; here a weight of
    0 or 1 takes the neighbour itself and an infinite neighbour gives that infinity.

    Args:
      sorted_values: ascending values, at least one (-inf and +inf allowed, no NaN).
      q: the quantile in [0, 1].
    """
    n = len(sorted_values)
    position = q * (n - 1)
    lower = int(math.floor(position))
    upper = min(lower + 1, n - 1)
    weight = position - lower
    a, b = float(sorted_values[lower]), float(sorted_values[upper])
    if weight == 0.0 or a == b:
        return a
    if math.isinf(a) or math.isinf(b):
        return a if math.isinf(a) else b
    return a + (b - a) * weight


@dataclass(frozen=True)
class MetricSummary(_ToDict):
    """Distribution of a metric over seeds.

    Args:
      count: seeds summarised (diverged ones included at the worst value).
      worst: seeds counted at the worst possible value because they diverged.
      median: median (None when count is 0).
      q25: 25th percentile (linear interpolation).
      q75: 75th percentile.
      min: smallest value.
      max: largest value.
    """

    count: int
    worst: int
    median: float | None
    q25: float | None
    q75: float | None
    min: float | None
    max: float | None


def summarize_metric(values: Iterable[float | None], *, worst: int = 0) -> MetricSummary:
    """Median, quartiles, min and max of the values (NaN and None are not allowed here).

    Args:
      values: one metric value per seed; a diverged seed is passed as the target's worst value.
      worst: how many of the values are such stand-ins (reported, not recomputed).

    Raises:
      ValueError: a value is None or NaN (a missing metric is the caller's to resolve).

    References:
      Nado et al. 2021, Figure 4 (min, max and quartiles over 50 runs).
    """
    array = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    if np.isnan(array).any():
        raise ValueError("metric values must not be None or NaN; pass a diverged seed as the "
                         "target's worst value")
    if array.size == 0:
        return MetricSummary(0, worst, None, None, None, None, None)
    ordered = np.sort(array)
    q25, median, q75 = (quantile(ordered, q) for q in (0.25, 0.5, 0.75))
    return MetricSummary(int(array.size), worst, median, q25, q75,
                         float(ordered[0]), float(ordered[-1]))


@dataclass(frozen=True)
class SeedSummary(_ToDict):
    """A study's result over the seed reruns of its best trial.

    Args:
      planned: reruns asked for (seeds_per_best; 1 when scored on the best tuning run).
      finished: reruns with a result (succeeded + diverged).
      succeeded: reruns that finished with a finite metric.
      diverged: reruns that diverged (in `metric` at the worst value, never reaching the target).
      abandoned: reruns given up after infrastructure failures (excluded from everything).
      reached_target: finished reruns that reached the target under the target's reading.
      fraction_reaching_target: reached_target / finished (None when nothing finished).
      median_steps_to_target: median over finished reruns with inf for those that did not
        reach the target (inf unless more than half reached it; None when nothing finished).
      metric: the target metric over the finished reruns, diverged ones at the worst value.
      values: each finished rerun's metric (worst value for a diverged one), in replica order.
      reached: whether each finished rerun reached the target, in the same order.
      steps: each finished rerun's steps-to-target under the reading (inf: not reached).
      diverged_mask: whether each finished rerun diverged, in the same order.
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
    values: tuple[float, ...] = ()
    reached: tuple[bool, ...] = ()
    steps: tuple[float, ...] = ()
    diverged_mask: tuple[bool, ...] = ()


def summarize_seeds(metric_values: Sequence[float | None], steps: Sequence[float],
                    diverged: Sequence[bool], *, worst_value: float,
                    abandoned: int = 0, planned: int | None = None) -> SeedSummary:
    """Summarise finished seeds: metric statistics, divergence and reaching the target.

    Args:
      metric_values: the final target metric of each finished seed (ignored when diverged).
      steps: each seed's steps-to-target under the target's reading (inf when it did not reach
        the target; forced to inf when diverged).
      diverged: whether each seed diverged; a non-finite or missing metric also counts as
        diverged.
      worst_value: what a diverged seed counts as in the metric statistics
        (`Target.worst_value()`).
      abandoned: seeds abandoned after infrastructure failures.
      planned: seeds asked for (defaults to finished + abandoned).

    References:
      Nado et al. 2021, Section 2 (median over seeds, seeds reaching the target); shared
      reference/protocol.md (a diverged seed counts as the worst value).
    """
    if not len(metric_values) == len(steps) == len(diverged):
        raise ValueError("metric_values, steps and diverged must have the same length")
    metrics: list[float] = []
    seed_steps: list[float] = []
    mask: list[bool] = []
    diverged_count = 0
    for value, step, bad in zip(metric_values, steps, diverged, strict=True):
        if bad or value is None or not math.isfinite(value):
            mask.append(True)
            diverged_count += 1
            seed_steps.append(math.inf)
            metrics.append(float(worst_value))
        else:
            mask.append(False)
            metrics.append(float(value))
            seed_steps.append(math.inf if step is None or math.isnan(step) else float(step))
    finished = len(seed_steps)
    reached = tuple(math.isfinite(s) for s in seed_steps)
    return SeedSummary(
        planned=finished + abandoned if planned is None else planned,
        finished=finished,
        succeeded=finished - diverged_count,
        diverged=diverged_count,
        abandoned=abandoned,
        reached_target=sum(reached),
        fraction_reaching_target=sum(reached) / finished if finished else None,
        median_steps_to_target=float(np.median(seed_steps)) if finished else None,
        metric=summarize_metric(metrics, worst=diverged_count),
        values=tuple(metrics),
        reached=reached,
        steps=tuple(seed_steps),
        diverged_mask=tuple(mask),
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
class TuningTrial(_ToDict):
    """One finished tuning trial, as the effort curves and diagnostics read it.

    Args:
      trial_index: the trial.
      value: its final target metric; the target's worst value when it diverged.
      diverged: whether it diverged.
      steps_to_target: its steps-to-target under the target's reading (inf: not reached).
      counted: whether selection considered it (one of the first trials_per_study feasible
        trials); a diverged trial before the last counted one is part of the same budget.
    """

    trial_index: int
    value: float
    diverged: bool
    steps_to_target: float
    counted: bool


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
      group_id: the id shared by the study's search replicates.
      replicate: the study's search replicate.
      tuning: the finished tuning trials in index order, up to the last one selection
        considered (the budget the best trial was chosen from).
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
    group_id: str = ""
    replicate: int = 0
    tuning: tuple[TuningTrial, ...] = ()


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
        [reading_steps(study.target, r) for r in results],
        [s.status is RunStatus.DIVERGED for s in scored if s.result is not None],
        worst_value=study.target.worst_value(),
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
    counted = set(state.counted_trials)
    last = max(counted) if counted else max(state.tuning, default=-1)
    tuning = tuple(
        TuningTrial(
            trial_index=index,
            value=(float(run.result.final_metrics[metric])
                   if run.status is RunStatus.SUCCEEDED else study.target.worst_value()),
            diverged=run.status is RunStatus.DIVERGED,
            steps_to_target=(reading_steps(study.target, run.result)
                             if run.status is RunStatus.SUCCEEDED else math.inf),
            counted=index in counted,
        )
        for index, run in state.tuning.items()
        if index <= last and run.result is not None
        and run.status in (RunStatus.SUCCEEDED, RunStatus.DIVERGED))
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
        group_id=study.group_id,
        replicate=study.replicate,
        tuning=tuning,
    )


def expected_best(values: Sequence[float], goal: Goal) -> tuple[np.ndarray, np.ndarray]:
    """Expected best result after k tuning trials, k = 1..n, and its standard deviation.

    With the n results sorted from worst to best, v(1) .. v(n), the best of k trials drawn with
    replacement is v(i) with probability (i/n)^k - ((i-1)/n)^k, so
    E[best_k] = sum_i v(i) ((i/n)^k - ((i-1)/n)^k), and the same weights give E[best_k^2].

    Args:
      values: one result per trial (a diverged trial at a finite worst value).
      goal: MAXIMIZE (best = max) or MINIMIZE (best = min).

    Returns:
      (expected, std), each of length n.

    Raises:
      ValueError: no values, or a non-finite one.

    References:
      Dodge et al. 2019, "Show Your Work: Improved Reporting of Experimental Results",
      Section 3 (expected validation performance).
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0 or not np.isfinite(array).all():
        raise ValueError("expected_best needs at least one value, all finite")
    n = array.size
    ordered = np.sort(array) if goal is Goal.MAXIMIZE else np.sort(array)[::-1]
    i = np.arange(1, n + 1, dtype=np.float64)
    k = np.arange(1, n + 1, dtype=np.float64)[:, None]
    weights = (i / n) ** k - ((i - 1) / n) ** k
    mean = weights @ ordered
    second = weights @ ordered**2
    std = np.sqrt(np.maximum(second - mean**2, 0.0))
    return mean, std


__all__ = [
    "INF_JSON",
    "Effort",
    "MetricSummary",
    "SeedSummary",
    "StudyScore",
    "TuningTrial",
    "expected_best",
    "quantile",
    "score_study",
    "steps_to_target",
    "summarize_metric",
    "summarize_seeds",
]
