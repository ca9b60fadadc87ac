"""Markdown tables like the paper's, built from an Experiment (batchlab.report.results).

Four tables:
  - `comparison_table`: one (workload, batch size, step budget), one row per optimizer label,
    as Table 4 (weights and bias/BN optimizers, median validation metric over seeds) with the
    train metric beside it as in Table 2 (right), the seeds reaching the target, the median
    steps to the target and the tuning effort behind each row.
  - `effort_table`: trials (feasible, diverged, abandoned), runs, steps and examples of each
    study, to show the budgets compared are equal.
  - `best_hyperparameters_table`: the best trial's value of every tuned search-space path.
  - `scaling_table`: median steps to the target against batch size per optimizer, with the
    speed-up over the smallest batch size and the scaling efficiency of each step up in batch
    size (Shallue et al. 2019: perfect scaling, diminishing returns, maximal data parallelism).

Conventions: metric values to 4 decimals, the median with [q25, q75] (numpy's linear
percentiles, as batchlab.search.scoring), "never" for a median steps-to-target of infinity
(half the seeds or more never reached the target), "—" where there is nothing to show.

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check", Tables 2 and 4, Appendix D.3.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from batchlab.paths import get_path
from batchlab.report.results import Experiment, StudyResult
from batchlab.search.scoring import MetricSummary

__all__ = [
    "DASH",
    "best_hyperparameters_table",
    "comparison_table",
    "display_optimizer",
    "effort_table",
    "format_metric",
    "format_steps",
    "format_summary",
    "markdown_table",
    "scaling_efficiency",
    "scaling_table",
]

DASH = "—"
_DISPLAY = {"nesterov": "Nesterov", "heavy_ball": "Momentum", "sgd": "SGD", "lars": "LARS",
            "lamb": "LAMB", "adam": "Adam"}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; '|' inside cells is escaped.

    Args:
      header: the column titles.
      rows: the cells, one sequence per row, as many as the header.
      align: per column "l" or "r" (default: first column left, the others right).

    Returns:
      The table, one line per row, ending with a newline.
    """
    align = align or ["l"] + ["r"] * (len(header) - 1)
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells, the header {len(header)}")

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)]) + "\n"


def format_metric(value: float | None) -> str:
    """A metric value to 4 decimals; "—" for None or NaN.

    Args:
      value: the value.
    """
    if value is None or math.isnan(value):
        return DASH
    return f"{value:.4f}"


def format_steps(value: float | None) -> str:
    """A steps-to-target: an integer with separators, "never" for inf, "—" for None.

    Args:
      value: steps, math.inf (never reached) or None (no finished seed).
    """
    if value is None or math.isnan(value):
        return DASH
    if math.isinf(value):
        return "never"
    return f"{round(value):,}"


def format_summary(summary: MetricSummary | None) -> str:
    """A metric summary as "median [q25, q75]" ("—" without data).

    Args:
      summary: the summary over seeds.
    """
    if summary is None or summary.count == 0:
        return DASH
    return (f"{format_metric(summary.median)} [{format_metric(summary.q25)}, "
            f"{format_metric(summary.q75)}]")


def _format_range(summary: MetricSummary | None) -> str:
    if summary is None or summary.count == 0:
        return DASH
    return f"{format_metric(summary.min)}–{format_metric(summary.max)}"


def _format_value(value: Any) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def display_optimizer(config: Mapping[str, Any], group: str) -> str:
    """A readable optimizer name of one parameter group, e.g. "LARS" or "Adam (eps=1e-06)".

    Args:
      config: the optimizer config: one group ({"optimizer": NAME, ...}) or
        {"weights": group, "bias_bn": group}.
      group: "weights" or "bias_bn" (ignored for a single group).
    """
    part = config if "optimizer" in config else config.get(group)
    if not isinstance(part, Mapping) or "optimizer" not in part:
        return "?"
    name = str(part["optimizer"])
    text = _DISPLAY.get(name, name)
    if name in ("adam", "lamb") and "eps" in part:
        text += f" (eps={_format_value(float(part['eps']))})"
    return text


def _label(study: StudyResult) -> str:
    label = study.info.optimizer
    if study.info.id != study.info.group_id:
        label += f" (search {study.info.replicate})"
    if study.done:
        return label
    return f"{label} (in progress)"


def _seeds(study: StudyResult) -> str:
    if study.score is None:
        return DASH
    seeds = study.score.seeds
    text = f"{seeds.finished}/{seeds.planned}"
    extras = []
    if seeds.diverged:
        extras.append(f"{seeds.diverged} diverged")
    if seeds.abandoned:
        extras.append(f"{seeds.abandoned} abandoned")
    return f"{text} ({', '.join(extras)})" if extras else text


def _reaching(study: StudyResult) -> str:
    if study.score is None or study.score.seeds.finished == 0:
        return DASH
    seeds = study.score.seeds
    fraction = seeds.fraction_reaching_target or 0.0
    return f"{seeds.reached_target}/{seeds.finished} ({fraction:.0%})"


def _trials(study: StudyResult) -> str:
    if study.score is None:
        return DASH
    effort = study.score.effort
    text = f"{effort.feasible_trials} / {effort.diverged_trials} / {effort.total_trials}"
    if effort.abandoned_trials:
        text += f" ({effort.abandoned_trials} abandoned)"
    return text


def comparison_table(experiment: Experiment, workload: str, batch_size: int,
                     step_budget: int) -> str:
    """Table 4 (with Table 2's train column) for one (workload, batch size, step budget).

    One row per study (an optimizer label, and its search replicate when there are several):
    weights and bias/BN optimizers, the target metric's median over the best trial's seeds with
    [q25, q75] and min–max (a diverged seed at the worst value), the train metric's median
    beside it (non-diverged seeds), the seeds finished (and diverged), the seeds reaching the
    target, the median steps to the target, the tuning trials (feasible / diverged / total) and
    every step spent. A study still running is marked "(in progress)" and explained under the
    table.

    Args:
      experiment: the loaded results.
      workload: the workload name.
      batch_size: examples per step.
      step_budget: training steps.

    Returns:
      Markdown (the table, then notes on unfinished studies, if any).

    References:
      Nado et al. 2021, Table 4 (median over 5 seeds of the best setting), Table 2 (median
      train and test accuracy), Figure 4 (quartiles, min and max).
    """
    studies = experiment.at_point(workload, batch_size, step_budget)
    if not studies:
        raise KeyError(f"no studies at {workload}, batch {batch_size}, {step_budget} steps")
    target = studies[0].info.target
    metric, train = target.metric, studies[0].info.train_metric
    header = [
        "optimizer", "weights optimizer", "bias/BN optimizer",
        f"{metric} median [q25, q75]", f"{metric} min–max",
        f"{train} median [q25, q75]" if train else "train metric",
        "seeds finished", f"seeds reaching {target.value:g}", "median steps to target",
        "trials feasible / diverged / total", "steps spent (tuning + reruns)",
    ]
    rows = []
    notes = []
    for study in studies:
        score = study.score
        metric_summary = score.seeds.metric if score is not None else None
        rows.append([
            _label(study),
            display_optimizer(study.info.optimizer_config, "weights"),
            display_optimizer(study.info.optimizer_config, "bias_bn"),
            format_summary(metric_summary),
            _format_range(metric_summary),
            format_summary(study.train_summary()),
            _seeds(study),
            _reaching(study),
            format_steps(score.seeds.median_steps_to_target) if score is not None else DASH,
            _trials(study),
            f"{score.effort.total_steps:,}" if score is not None else DASH,
        ])
        if not study.stored:
            notes.append(f"- `{study.id}`: {study.note}")
    table = markdown_table(header, rows, ["l", "l", "l"] + ["r"] * (len(header) - 3))
    periods = sorted({(s.info.eval_every_steps, s.info.resolution_examples) for s in studies})
    table += "\nSteps to target are measured at evaluations every " + " or ".join(
        f"{steps:,} steps ({examples:,} examples)" for steps, examples in periods) + \
        ": that is their resolution.\n"
    if notes:
        table += "\n" + "\n".join(notes) + "\n"
    return table


def effort_table(experiment: Experiment) -> str:
    """Tuning effort of every study: trials, runs, steps and examples, grouped by point.

    Budgets are fair when the trial counts (feasible trials) and steps match across the
    optimizers of one (workload, batch size, step budget); diverged trials come on top, as in
    Appendix D.3 (67 LAMB trials for 25 feasible ones).

    Args:
      experiment: the loaded results.

    Returns:
      The markdown table.

    References:
      Nado et al. 2021, Appendix D.3 (feasible trials as the tuning budget).
    """
    header = ["workload", "batch size", "step budget", "optimizer", "trials", "feasible",
              "diverged", "abandoned", "runs", "failed attempts (why)", "tuning steps",
              "rerun steps", "total steps", "examples"]
    rows = []
    for point in experiment.points():
        for study in experiment.at_point(*point):
            if study.score is None:
                rows.append([*_point_cells(point), _label(study)] + [DASH] * 10)
                continue
            e = study.score.effort
            rows.append([*_point_cells(point), _label(study), str(e.total_trials),
                         str(e.feasible_trials), str(e.diverged_trials), str(e.abandoned_trials),
                         str(e.runs), _failures(study, e.failed_attempts), f"{e.tuning_steps:,}",
                         f"{e.rerun_steps:,}", f"{e.total_steps:,}", f"{e.total_examples:,}"])
    return markdown_table(header, rows, ["l", "r", "r", "l"] + ["r"] * 10)


def scaling_efficiency(smaller: tuple[int, float, int], larger: tuple[int, float, int]
                       ) -> tuple[float, float, float]:
    """The scaling efficiency between two batch sizes, with its range from the resolution.

    Efficiency = (steps at the smaller batch / steps at the larger) / (larger / smaller batch):
    1 is perfect scaling (twice the batch, half the steps), 1 / (batch ratio) is no gain at
    all. A steps-to-target figure s measured at evaluations every r steps means the target was
    first met after step s - r and by step s, and so is the median of such figures; the range
    is the efficiency over those bounds. That assumes the metric does not cross the target and
    fall back between two evaluations (in the reproduction's scaling study 12% of runs did).

    Args:
      smaller: (batch size, median steps to target, evaluation period in steps).
      larger: the same at the larger batch size.

    Returns:
      (efficiency, lowest, highest); highest is inf when the larger batch's median is within
      one evaluation period of step 0.

    Raises:
      ValueError: a median that is not a positive finite number, or batch sizes not increasing.
    """
    (b0, s0, r0), (b1, s1, r1) = smaller, larger
    if not b1 > b0 > 0:
        raise ValueError(f"batch sizes must increase; got {b0} then {b1}")
    for name, steps in (("smaller", s0), ("larger", s1)):
        if not (math.isfinite(steps) and steps > 0):
            raise ValueError(f"{name}: median steps must be positive and finite; got {steps}")
    ideal = b1 / b0
    low = max(s0 - r0, 0.0) / s1 / ideal
    high = s0 / (s1 - r1) / ideal if s1 > r1 else math.inf
    return s0 / s1 / ideal, low, high


def _range_text(value: float, low: float, high: float, unit: str = "") -> str:
    """ "value<unit> [low, high]" to 2 decimals, the top as ∞ when unbounded."""
    return f"{value:.2f}{unit} [{low:.2f}, {'∞' if math.isinf(high) else f'{high:.2f}'}]"


def _scaling_reading(low: float, high: float, ideal: float) -> str:
    """What an efficiency range (open at both ends) allows, with the same rule on both sides.

    Perfect scaling (efficiency 1) is possible only when the top is above 1; no gain (the same
    steps at the larger batch, efficiency 1 / ideal) only when the bottom is below 1 / ideal.
    """
    perfect, none = high > 1.0, low < 1.0 / ideal
    if perfect and none:
        return "undetermined"
    if perfect:
        return "better than perfect" if low > 1.0 else "consistent with perfect scaling"
    if none:
        return "consistent with no gain"
    return "diminishing returns"


def scaling_table(experiment: Experiment, workload: str) -> str:
    """Steps to the target against batch size, one block of rows per optimizer.

    Each row is one (batch size, step budget) point: the median steps to the target over every
    rerun seed of every search replicate (a seed that never reached it counts as never), the
    seeds reaching it with their min–max steps, the same median in examples, the speed-up over
    the optimizer's smallest batch size beside the ideal one, and the scaling efficiency from
    the previous smaller batch size with its range from the evaluation period. The reading of
    each efficiency: see `_scaling_reading`. The ranges cover the measurement's resolution
    only, not seed noise (see min–max) or tuning luck.

    Args:
      experiment: the loaded results.
      workload: the workload name.

    Returns:
      The markdown table, then the rule.

    References:
      Shallue et al. 2019, "Measuring the Effects of Data Parallelism on Neural Network
      Training" (steps to result against batch size; the three regimes); Nado et al. 2021,
      Sections 1 and 6 (perfect scaling and its end).
    """
    points = sorted((p for p in experiment.points() if p[0] == workload),
                    key=lambda p: (p[1], p[2]))
    header = ["optimizer", "batch size", "step budget", "median steps to target (resolution)",
              "seeds reaching", "min–max steps of those", "median examples to target",
              "speed-up over the smallest batch (ideal)", "efficiency from the previous batch",
              "reading"]
    rows = []
    for label in experiment.optimizers():
        # (batch, median, period); the median is NaN without finished seeds, inf for never.
        smallest: tuple[int, float, int] | None = None
        previous: tuple[int, float, int] | None = None  # the point just below, whatever it is
        for point in points:
            group = next((g for g in experiment.groups_at_point(*point) if g.label == label),
                         None)
            if group is None:
                continue
            batch, period = point[1], group.info.eval_every_steps
            steps = group.pooled()[2]
            stored = group.median_steps_to_target()
            median = math.nan if stored is None else stored
            reached = sorted(s for s in steps if math.isfinite(s))
            finite = math.isfinite(median)
            here = (batch, median, period)
            speedup = efficiency = reading = DASH
            # Against the optimizer's smallest batch size and the next smaller one only when
            # those reached the target: never a silent jump over a point that did not, or that
            # has no finished seeds yet.
            if finite and smallest is not None and batch > smallest[0] \
                    and math.isfinite(smallest[1]):
                # The speed-up is the efficiency times the batch ratio, its range too.
                value, low, high = scaling_efficiency(smallest, here)
                ratio = batch / smallest[0]
                speedup = (_range_text(value * ratio, low * ratio, high * ratio, "x")
                           + f" ({ratio:g}x)")
            if finite and previous is not None and batch > previous[0] \
                    and math.isfinite(previous[1]):
                value, low, high = scaling_efficiency(previous, here)
                efficiency = _range_text(value, low, high)
                reading = _scaling_reading(low, high, batch / previous[0])
            rows.append([
                label, f"{batch:,}", f"{point[2]:,}",
                f"{format_steps(stored)} ({period:,})",
                f"{len(reached)} / {len(steps)}",
                f"{round(reached[0]):,}–{round(reached[-1]):,}" if reached else DASH,
                f"{round(median * batch):,}" if finite else format_steps(stored),
                speedup, efficiency, reading,
            ])
            smallest = smallest or here
            previous = here
    table = markdown_table(header, rows, ["l", "r", "r", "r", "r", "r", "r", "r", "r", "l"])
    return table + (
        "\nEfficiency = (median steps at the previous batch size / median steps here) / (batch "
        "ratio): 1 is perfect scaling, 1 / (batch ratio) no gain. Speed-up and efficiency ranges "
        "follow from the evaluation period: a figure s means the target was first met after "
        "s − period and by s (assuming the metric does not cross the target and fall back "
        "between evaluations), and so does the median of such figures; the ranges are open and "
        "do not cover seed noise or tuning luck. Reading: consistent with perfect scaling when "
        "the range's top is above 1; consistent with no gain when its bottom is below 1 / "
        "(batch ratio); undetermined when both; diminishing returns when neither. A point whose "
        "median is never (or not known yet) gets no figures, nor an efficiency at the next batch "
        "size; with such a point at the smallest batch size there are no speed-ups.\n")


def _failures(study: StudyResult, count: int) -> str:
    """Failed attempts, with their causes when the runner recorded them (the controller does:
    a run that failed by itself vs attempts lost to the infrastructure, which may not count
    toward max_attempts)."""
    causes: dict[str, int] = {}
    for run in study.runs:
        if run.outcome is not None and not run.has_result and run.failure:
            key = run.failure.lower() + ("" if run.counted else ", not counted")
            causes[key] = causes.get(key, 0) + 1
    if not causes:
        return str(count)
    return f"{count} (" + "; ".join(f"{n} {why}" for why, n in sorted(causes.items())) + ")"


def _point_cells(point: tuple[str, int, int]) -> list[str]:
    workload, batch_size, step_budget = point
    return [workload, f"{batch_size:,}", f"{step_budget:,}"]


def best_hyperparameters_table(experiment: Experiment, optimizer: str) -> str:
    """The best trial's tuned hyperparameters of one optimizer label, one row per point.

    Columns are the label's tuned search-space paths (tied paths get the same value and are
    not repeated; fixed parameters are constants and left out), read from the stored best
    hyperparameters with dotted keys.

    Args:
      experiment: the loaded results.
      optimizer: the optimizer label.

    Returns:
      The markdown table ("" when the label has no studies).
    """
    paths = experiment.search_paths(optimizer)
    header = ["workload", "batch size", "step budget", "search", "best trial",
              *(p.removeprefix("optimizer.") for p in paths)]
    rows = []
    for study in experiment.studies:
        if study.info.optimizer != optimizer:
            continue
        best = study.score.best_hyperparameters if study.score is not None else None
        trial = DASH if study.best_trial is None else str(study.best_trial)
        if best is None:
            values = [DASH] * len(paths)
            if not study.done:
                trial = "in progress"
        else:
            values = [_format_value(get_path(best, p)) for p in paths]
        rows.append([*_point_cells(study.info.point), str(study.info.replicate), trial, *values])
    if not rows:
        return ""
    return markdown_table(header, rows, ["l", "r", "r", "r", "r"] + ["r"] * len(paths))
