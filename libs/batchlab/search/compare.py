"""Deciding a comparison: bootstrap intervals with a practical-equivalence margin.

Two optimizers are compared on the seed reruns of their best trials (all search replicates
pooled) by two statistics, each with a percentile-bootstrap confidence interval:

  - the difference in the median target metric, oriented so that a positive difference favours
    A (median(A) - median(B) for a maximised metric, median(B) - median(A) for a minimised one);
    a diverged seed is in the median at the target's worst value (scoring's convention);
  - the difference in the fraction of seeds reaching the target (A - B).

Each interval gives a verdict against its margin delta, fixed in the spec before the data is
seen (Target.equivalence_margin, Target.fraction_margin):

  - "matched" when the whole interval lies inside [-delta, +delta];
  - "A ahead" when it lies above 0 (and is not inside the margin), "B ahead" when below 0;
  - "not enough evidence" otherwise, and always when an arm has fewer than MIN_SEEDS finished
    seeds (a percentile bootstrap of a median is unreliable below that).

The pair's verdict is "matched" when both statistics are matched, "A ahead" when one says A is
ahead and neither says B is (and symmetrically), and "not enough evidence" otherwise.

Resampling is stratified by search replicate: each replicate's seeds are resampled with
replacement within the replicate, so every bootstrap sample keeps each replicate's weight; the
spread of tuning luck across replicates is shown next to the verdict and flagged by
batchlab.search.diagnostics when it is as large as the winner's margin. Indices come from
numpy's PCG64 raw stream (stable across numpy releases, unlike Generator methods; NEP 19)
seeded by a hash of the two arms' labels, so a report is the same every time it is built.

References:
  Efron and Tibshirani 1993, "An Introduction to the Bootstrap" (percentile intervals).
  Schuirmann 1987; Lakens 2017 (equivalence testing with a margin, two one-sided tests logic).
  Shared reference/protocol.md, "Deciding matched".
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass

import numpy as np

from batchlab.search.study import Goal

__all__ = [
    "BOOTSTRAP_SAMPLES",
    "CONFIDENCE",
    "MIN_SEEDS",
    "Arm",
    "Interval",
    "PairVerdict",
    "Verdict",
    "combine",
    "compare_arms",
    "decide",
    "rule_text",
]

BOOTSTRAP_SAMPLES = 10_000
CONFIDENCE = 0.95
MIN_SEEDS = 5


class Verdict(enum.StrEnum):
    """The outcome of one comparison."""

    MATCHED = "matched"
    A_AHEAD = "A ahead"
    B_AHEAD = "B ahead"
    NOT_ENOUGH_EVIDENCE = "not enough evidence"

    def named(self, a: str, b: str) -> str:
        """The verdict with the arms' labels ("`adam` ahead", "matched", ...).

        Args:
          a: A's label.
          b: B's label.
        """
        if self is Verdict.A_AHEAD:
            return f"`{a}` ahead"
        if self is Verdict.B_AHEAD:
            return f"`{b}` ahead"
        return self.value


@dataclass(frozen=True)
class Arm:
    """One side of a comparison: its finished seeds, grouped by search replicate.

    Args:
      label: the optimizer label.
      values: per replicate, each finished seed's final target metric (the worst value for a
        diverged seed).
      reached: per replicate, whether each of those seeds reached the target.
    """

    label: str
    values: tuple[tuple[float, ...], ...]
    reached: tuple[tuple[bool, ...], ...]

    def __post_init__(self) -> None:
        if len(self.values) != len(self.reached) or any(
                len(v) != len(r) for v, r in zip(self.values, self.reached, strict=True)):
            raise ValueError(f"arm {self.label!r}: values and reached differ in shape")
        if any(math.isnan(v) for group in self.values for v in group):
            raise ValueError(f"arm {self.label!r}: NaN metric (a diverged seed must be given "
                             "as the target's worst value)")

    @property
    def seeds(self) -> int:
        """Finished seeds over every replicate."""
        return sum(len(group) for group in self.values)

    @property
    def pooled(self) -> np.ndarray:
        """Every seed's value, replicates concatenated."""
        return np.array([v for group in self.values for v in group], dtype=np.float64)

    @property
    def pooled_reached(self) -> np.ndarray:
        """Every seed's reached flag, replicates concatenated."""
        return np.array([r for group in self.reached for r in group], dtype=np.float64)

    def replicate_medians(self) -> tuple[float, ...]:
        """The median of each non-empty replicate (the spread of tuning luck)."""
        return tuple(float(np.median(group)) for group in self.values if group)


@dataclass(frozen=True)
class Interval:
    """A statistic's estimate, its bootstrap interval and its verdict.

    Args:
      estimate: the observed difference, oriented so that positive favours A.
      low: the interval's lower end.
      high: the interval's upper end.
      margin: the practical-equivalence margin.
      verdict: what the interval says against the margin.
    """

    estimate: float
    low: float
    high: float
    margin: float
    verdict: Verdict


@dataclass(frozen=True)
class PairVerdict:
    """The decision on one pair.

    Args:
      a: A's label.
      b: B's label.
      seeds_a: A's finished seeds (all replicates).
      seeds_b: B's finished seeds.
      metric: the difference in median target metric.
      fraction: the difference in the fraction of seeds reaching the target.
      verdict: the pair's verdict (see `combine`).
      reason: why, in words (e.g. "too few seeds: 3 < 5").
      replicate_medians_a: A's median per search replicate.
      replicate_medians_b: B's median per search replicate.
    """

    a: str
    b: str
    seeds_a: int
    seeds_b: int
    metric: Interval
    fraction: Interval
    verdict: Verdict
    reason: str
    replicate_medians_a: tuple[float, ...]
    replicate_medians_b: tuple[float, ...]

    @property
    def named(self) -> str:
        """The verdict with labels, e.g. "`nesterov` ahead"."""
        return self.verdict.named(self.a, self.b)


def decide(low: float, high: float, margin: float) -> Verdict:
    """The verdict of one interval (positive favours A) against a margin.

    Args:
      low: the interval's lower end.
      high: the interval's upper end.
      margin: the practical-equivalence margin, > 0.

    Example:
      >>> decide(-0.002, 0.004, 0.01)
      <Verdict.MATCHED: 'matched'>
    """
    if -margin <= low and high <= margin:
        return Verdict.MATCHED
    if low > 0:
        return Verdict.A_AHEAD
    if high < 0:
        return Verdict.B_AHEAD
    return Verdict.NOT_ENOUGH_EVIDENCE


def combine(*verdicts: Verdict) -> Verdict:
    """The pair's verdict from its statistics' verdicts.

    Matched only if every statistic is; one side ahead if some statistic says so and none says
    the other side is; otherwise not enough evidence.

    Args:
      *verdicts: one verdict per statistic.
    """
    if all(v is Verdict.MATCHED for v in verdicts):
        return Verdict.MATCHED
    a = any(v is Verdict.A_AHEAD for v in verdicts)
    b = any(v is Verdict.B_AHEAD for v in verdicts)
    if a and not b:
        return Verdict.A_AHEAD
    if b and not a:
        return Verdict.B_AHEAD
    return Verdict.NOT_ENOUGH_EVIDENCE


def _generator(a: str, b: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"batchlab-bootstrap|{a}|{b}".encode(), digest_size=16).digest()
    words = [int.from_bytes(digest[i:i + 4], "big") for i in range(0, 16, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


def _resample(arm: Arm, generator: np.random.Generator,
              samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap samples of an arm: (samples, seeds) values and reached flags."""
    values, reached = [], []
    for group_values, group_reached in zip(arm.values, arm.reached, strict=True):
        n = len(group_values)
        if n == 0:
            continue
        # Raw 64-bit words modulo n: the bias is below n / 2**64, far below anything measurable.
        raw = generator.bit_generator.random_raw(samples * n).reshape(samples, n)
        index = (raw % np.uint64(n)).astype(np.int64)
        values.append(np.asarray(group_values, dtype=np.float64)[index])
        reached.append(np.asarray(group_reached, dtype=np.float64)[index])
    return np.concatenate(values, axis=1), np.concatenate(reached, axis=1)


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Equal values (the same infinity included) differ by 0, not NaN.
    with np.errstate(invalid="ignore"):
        return np.where(a == b, 0.0, a - b)


def _median(values: np.ndarray) -> np.ndarray:
    # np.median averages the two middle values; -inf with a finite value stays -inf.
    with np.errstate(invalid="ignore"):
        return np.median(values, axis=-1)


def compare_arms(a: Arm, b: Arm, *, goal: Goal, metric_margin: float,
                 fraction_margin: float, samples: int = BOOTSTRAP_SAMPLES,
                 confidence: float = CONFIDENCE, min_seeds: int = MIN_SEEDS) -> PairVerdict:
    """Decide whether A is matched, ahead or behind B (see the module docstring).

    Args:
      a: arm A.
      b: arm B.
      goal: whether the target metric is maximised or minimised.
      metric_margin: practical-equivalence margin for the median difference, > 0.
      fraction_margin: margin for the difference in the fraction reaching the target, > 0.
      samples: bootstrap resamples.
      confidence: the intervals' confidence level.
      min_seeds: fewer finished seeds than this in either arm gives "not enough evidence".

    Raises:
      ValueError: a margin is not positive, or confidence is not in (0, 1).

    Example:
      >>> x = Arm("x", ((0.90, 0.91, 0.92, 0.93, 0.94),), ((True,) * 5,))
      >>> compare_arms(x, x, goal=Goal.MAXIMIZE, metric_margin=0.01,
      ...              fraction_margin=0.2).verdict
      <Verdict.MATCHED: 'matched'>
    """
    if not (metric_margin > 0 and fraction_margin > 0):
        raise ValueError(f"margins must be > 0, got {metric_margin!r}, {fraction_margin!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    sign = 1.0 if goal is Goal.MAXIMIZE else -1.0
    medians = (a.replicate_medians(), b.replicate_medians())
    if min(a.seeds, b.seeds) < min_seeds:
        reason = (f"too few seeds: {a.seeds} and {b.seeds} finished, {min_seeds} needed "
                  "per arm")
        nan = math.nan
        empty = Verdict.NOT_ENOUGH_EVIDENCE
        observed = (_estimate(a, b, sign) if min(a.seeds, b.seeds) > 0 else (nan, nan))
        return PairVerdict(a.label, b.label, a.seeds, b.seeds,
                           Interval(observed[0], nan, nan, metric_margin, empty),
                           Interval(observed[1], nan, nan, fraction_margin, empty),
                           empty, reason, *medians)
    generator = _generator(a.label, b.label)
    values_a, reached_a = _resample(a, generator, samples)
    values_b, reached_b = _resample(b, generator, samples)
    metric_diffs = sign * _difference(_median(values_a), _median(values_b))
    fraction_diffs = reached_a.mean(axis=1) - reached_b.mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    estimate_metric, estimate_fraction = _estimate(a, b, sign)
    intervals = []
    for estimate, diffs, margin in ((estimate_metric, metric_diffs, metric_margin),
                                    (estimate_fraction, fraction_diffs, fraction_margin)):
        low, high = (float(x) for x in np.quantile(diffs, [tail, 1.0 - tail],
                                                   method="inverted_cdf"))
        intervals.append(Interval(estimate, low, high, margin, decide(low, high, margin)))
    metric, fraction = intervals
    verdict = combine(metric.verdict, fraction.verdict)
    reason = (f"median difference {metric.verdict.named(a.label, b.label)}, "
              f"reaching-target difference {fraction.verdict.named(a.label, b.label)}")
    return PairVerdict(a.label, b.label, a.seeds, b.seeds, metric, fraction, verdict, reason,
                       *medians)


def _estimate(a: Arm, b: Arm, sign: float) -> tuple[float, float]:
    metric = sign * float(_difference(_median(a.pooled), _median(b.pooled)))
    fraction = float(a.pooled_reached.mean() - b.pooled_reached.mean())
    return metric, fraction


def rule_text(metric_margin: float, fraction_margin: float, *,
              samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE,
              min_seeds: int = MIN_SEEDS) -> str:
    """The decision rule in words, as the report prints it.

    Args:
      metric_margin: the margin for the median difference.
      fraction_margin: the margin for the reaching-target difference.
      samples: bootstrap resamples.
      confidence: the confidence level.
      min_seeds: the fewest finished seeds per arm for any verdict but "not enough evidence".
    """
    return (
        f"Each pair is decided on the seed reruns of both best trials (search replicates "
        f"pooled; a diverged seed counts at the worst possible value and as not reaching the "
        f"target) by {confidence:.0%} percentile-bootstrap intervals ({samples:,} resamples, "
        f"seeds resampled within each replicate) of two differences, oriented so that a "
        f"positive difference favours the first optimizer: the median target metric "
        f"(margin ±{metric_margin:g}) and the fraction of seeds reaching the target (margin "
        f"±{fraction_margin:g}). A statistic is *matched* when its whole interval lies inside "
        f"its margin, *ahead* for one side when the interval excludes 0 on that side, and "
        f"*not enough evidence* otherwise. The pair is matched when both statistics are, "
        f"ahead when one statistic says so and the other does not say the opposite, and not "
        f"enough evidence otherwise, always so with fewer than {min_seeds} finished seeds "
        f"per optimizer. Margins are fixed in the spec before any run.")
