"""A run's target and how a run ended: the facts training and the study protocol share.

A run trains towards a target (a metric, a value and whether larger or smaller is better) and
ends with an outcome (succeeded, diverged, failed, cancelled). The training loop records both;
the study protocol (:mod:`batchlab.search`) scores runs by them. They live here, below both and
importable without JAX, so that the loop does not import the protocol above it.

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check", Section 2 (targets, steps to
  target); shared reference/optimizers.md section 8; AlgoPerf scoring.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_ABSOLUTE_MARGIN",
    "DEFAULT_FRACTION_MARGIN",
    "DEFAULT_MARGIN_FRACTION",
    "Goal",
    "Outcome",
    "Target",
    "TargetReading",
    "steps_to_target",
]

# Default practical-equivalence margins (protocol.md: a stated margin, fixed before the data).
DEFAULT_MARGIN_FRACTION = 0.01  # of |target value|: 0.009 for an accuracy target of 0.9
DEFAULT_ABSOLUTE_MARGIN = 0.01  # when the target value is 0
DEFAULT_FRACTION_MARGIN = 0.25  # difference in the fraction of seeds reaching the target


class Goal(enum.IntEnum):
    """Whether larger or smaller metric values are better (numbers as batchlab.v1.Goal)."""

    MAXIMIZE = 1
    MINIMIZE = 2


class TargetReading(enum.IntEnum):
    """When a run counts as having reached its target (numbers as batchlab.v1.TargetReading).

    FIRST_EVALUATION: at the first evaluation whose metric meets the target (MLPerf, AlgoPerf).
    END_OF_BUDGET: only if the metric still meets it at the end of the budget (the paper's
    Tables 2 and 3 read the final value); steps-to-target is then the first evaluation from
    which every later evaluation meets the target.
    """

    FIRST_EVALUATION = 1
    END_OF_BUDGET = 2


class Outcome(enum.IntEnum):
    """How a run attempt ended (numbers as batchlab.v1.Outcome)."""

    SUCCEEDED = 1
    DIVERGED = 2
    FAILED = 3
    CANCELLED = 4


@dataclass(frozen=True)
class Target:
    """The metric a study is measured by and the value that counts as reaching the goal.

    Args:
      metric: the metric name, e.g. "validation/accuracy".
      value: the target value (0.759 for ResNet-50 top-1 in Section 2).
      goal: MAXIMIZE (met when metric >= value) or MINIMIZE (met when metric <= value).
    """

    metric: str
    value: float
    goal: Goal
    reading: TargetReading = TargetReading.FIRST_EVALUATION
    equivalence_margin: float | None = None
    fraction_margin: float | None = None

    @property
    def metric_margin(self) -> float:
        """The practical-equivalence margin for differences in the metric (default 1% of |value|)."""
        if self.equivalence_margin is not None:
            return float(self.equivalence_margin)
        return DEFAULT_MARGIN_FRACTION * abs(self.value) if self.value else DEFAULT_ABSOLUTE_MARGIN

    @property
    def reaching_margin(self) -> float:
        """The practical-equivalence margin for differences in the fraction reaching the target."""
        if self.fraction_margin is not None:
            return float(self.fraction_margin)
        return DEFAULT_FRACTION_MARGIN

    def worst_value(self) -> float:
        """The value a diverged run counts as in metric statistics: the worst possible one.

        0 for a maximised metric that cannot be negative (accuracies: the name ends in
        "accuracy"), -inf for any other maximised metric, +inf for a minimised one (a loss).
        Counting divergence as the worst value keeps an optimizer that sometimes diverges from
        being favoured by dropping its failures.
        """
        if self.goal is Goal.MINIMIZE:
            return math.inf
        return 0.0 if self.metric.endswith("accuracy") else -math.inf

    def is_met(self, metric_value: float) -> bool:
        """Whether a metric value meets the target; NaN never does.

        Args:
          metric_value: one evaluation of the metric.
        """
        if metric_value is None or math.isnan(metric_value):
            return False
        if self.goal is Goal.MAXIMIZE:
            return metric_value >= self.value
        return metric_value <= self.value

    def rank_key(self, metric_value: float | None) -> float:
        """A key that sorts better metric values first; NaN and None sort last.

        Args:
          metric_value: a final metric value.
        """
        if metric_value is None or math.isnan(metric_value):
            return math.inf
        return -metric_value if self.goal is Goal.MAXIMIZE else metric_value

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, with the goal and reading by name and the margins in use."""
        return {"metric": self.metric, "value": self.value, "goal": self.goal.name,
                "reading": self.reading.name, "equivalence_margin": self.metric_margin,
                "fraction_margin": self.reaching_margin}


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
