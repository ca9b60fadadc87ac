"""Deciding a comparison: bootstrap intervals with a practical-equivalence margin.

Two optimizers are compared on the seed reruns of their best trials (all search replicates
pooled) by two statistics, each with a percentile-bootstrap confidence interval:

  - the difference in the median target metric, oriented so that a positive difference favours
    A (median(A) - median(B) for a maximised metric, median(B) - median(A) for a minimised one);
    a diverged seed is in the median at the target's worst value (scoring's convention);
  - the difference in the fraction of seeds reaching the target (A - B).

Each interval is a (1 - alpha/2) interval for a family level 1 - alpha (Bonferroni over the two
statistics: a pair is called "ahead" when either statistic says so, so each is tested at half
the error rate; CONFIDENCE is the family's level). Each gives a verdict against its margin delta,
fixed in the spec before the data is seen (Target.equivalence_margin, Target.fraction_margin):

  - "matched" when the whole interval lies inside [-delta, +delta];
  - "A ahead" when it lies above 0 (and is not inside the margin), "B ahead" when below 0;
  - "not enough evidence" otherwise, and always when an arm has fewer than MIN_SEEDS finished
    seeds (a percentile bootstrap of a median is unreliable below that), or when every seed of
    both arms sits at the worst value (all diverged, or none reached the target where steps
    are compared: nothing was compared).

The pair's verdict is "matched" when both statistics are matched, "A ahead" when one says A is
ahead and neither says B is (and symmetrically), and "not enough evidence" otherwise.

Resampling is two-stage (hierarchical), because search replicates are the units of tuning
luck: each bootstrap sample draws an arm's replicates with replacement, then each drawn
replicate's seeds with replacement. Resampling seeds only within fixed replicates would leave
the replicate-to-replicate spread out of the interval, and two identical optimizers with
different tuning luck would often be called "ahead" (measured: most of 300 simulated pairs at 2
replicates x 7 seeds). With one replicate the first stage is void and the interval covers seed
noise only (spec diagnostics warn about single-replicate studies). Even so, resampling 2 or 3
replicates understates their spread, so with at least 2 replicates per arm each interval is
widened to cover Welch's t interval over the replicates' own statistics (median, fraction
reaching the target), whose few degrees of freedom say how little 2 replicates know about
tuning luck. Simulated here (seed sd 0.002-0.005, margin 0.005, 2,000 resamples): of 150
identical pairs at 2 replicates x 7 seeds with tuning-luck sd 0.01, 33% were called "ahead" by
the two-stage bootstrap alone, 0% with the Welch cover (2% at tuning sd 0.003; 3% at 3 x 5);
the price is power: a true gap of 0.015 at tuning sd 0.003 is called in 13% of 100 pairs with
2 replicates and 80% with 3. tests/search/test_compare.py keeps the false rate in check. The
spread across replicates is also shown next to the verdict and flagged by
batchlab.search.diagnostics. Indices come from
numpy's PCG64 raw stream (stable across numpy releases, unlike Generator methods; NEP 19) seeded
by a hash of the two arms' labels and the comparison's context (workload and point), so a report
is the same every time it is built and different points do not share resampling indices.

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

from batchlab.targets import Goal

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


def _generator(a: str, b: str, context: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"batchlab-bootstrap|{a}|{b}|{context}".encode(),
                             digest_size=16).digest()
    words = [int.from_bytes(digest[i:i + 4], "big") for i in range(0, 16, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


def _indices(generator: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    # Raw 64-bit words modulo n: the bias is below n / 2**64, far below anything measurable.
    raw = generator.bit_generator.random_raw(shape[0] * shape[1]).reshape(shape)
    return (raw % np.uint64(n)).astype(np.int64)


def _resample(arm: Arm, generator: np.random.Generator,
              samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-stage bootstrap samples of an arm: (samples, slots) values and reached flags.

    Stage 1 draws as many replicates as the arm has (non-empty), with replacement; stage 2
    draws each drawn replicate's seeds with replacement. A slot is one seed position of one
    drawn replicate; replicates with fewer seeds than the largest leave NaN slots, which the
    NaN-aware median and mean skip, so each sample has exactly the drawn replicates' seeds.
    """
    groups = [(np.asarray(v, dtype=np.float64), np.asarray(r, dtype=np.float64))
              for v, r in zip(arm.values, arm.reached, strict=True) if len(v)]
    width = max(len(v) for v, _ in groups)
    chosen = _indices(generator, (samples, len(groups)), len(groups))
    values = np.full((samples, len(groups), width), np.nan)
    reached = np.full((samples, len(groups), width), np.nan)
    for k, (group_values, group_reached) in enumerate(groups):
        n = len(group_values)
        seeds = _indices(generator, (samples, len(groups) * n), n).reshape(
            samples, len(groups), n)
        mask = chosen == k
        values[:, :, :n] = np.where(mask[..., None], group_values[seeds], values[:, :, :n])
        reached[:, :, :n] = np.where(mask[..., None], group_reached[seeds], reached[:, :, :n])
    return values.reshape(samples, -1), reached.reshape(samples, -1)


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Equal values (the same infinity included) differ by 0, not NaN.
    with np.errstate(invalid="ignore"):
        return np.where(a == b, 0.0, a - b)


def _median(values: np.ndarray) -> np.ndarray:
    # The median averages the two middle values; -inf with a finite value stays -inf. NaN marks
    # an empty slot of a two-stage sample (see _resample), never a metric.
    with np.errstate(invalid="ignore"):
        median: np.ndarray = np.nanmedian(values, axis=-1)
    return median


def compare_arms(a: Arm, b: Arm, *, goal: Goal, metric_margin: float,
                 fraction_margin: float, samples: int = BOOTSTRAP_SAMPLES,
                 confidence: float = CONFIDENCE, min_seeds: int = MIN_SEEDS,
                 context: str = "", worst: float | None = None) -> PairVerdict:
    """Decide whether A is matched, ahead or behind B (see the module docstring).

    Args:
      a: arm A.
      b: arm B.
      goal: whether the target metric is maximised or minimised.
      metric_margin: practical-equivalence margin for the median difference, > 0.
      fraction_margin: margin for the difference in the fraction reaching the target, > 0.
      samples: bootstrap resamples.
      confidence: the family's confidence level (each of the two intervals is at
        1 - (1 - confidence) / 2).
      min_seeds: fewer finished seeds than this in either arm gives "not enough evidence".
      context: what is compared, e.g. "mnist1d_resnet1d|b128|s240": part of the bootstrap's
        seed, so that different points draw independent resamples.
      worst: the metric's worst value (where diverged seeds sit); when every seed of both arms
        is there, the verdict is "not enough evidence" rather than a vacuous "matched".

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
        observed = (_estimate(a, b, sign) if min(a.seeds, b.seeds) > 0
                    else (math.nan, math.nan))
        return _undecided(a, b, observed, (metric_margin, fraction_margin), reason, medians)
    if worst is not None and all(v == worst for arm in (a, b) for v in arm.pooled):
        return _undecided(a, b, (0.0, 0.0), (metric_margin, fraction_margin),
                          "every seed of both optimizers is at the worst value (diverged, or "
                          "never reached the target where steps are compared): nothing to "
                          "compare", medians)
    generator = _generator(a.label, b.label, context)
    values_a, reached_a = _resample(a, generator, samples)
    values_b, reached_b = _resample(b, generator, samples)
    metric_diffs = sign * _difference(_median(values_a), _median(values_b))
    fraction_diffs = np.nanmean(reached_a, axis=1) - np.nanmean(reached_b, axis=1)
    tail = (1.0 - confidence) / 4.0  # two statistics: each interval at 1 - alpha/2
    estimate_metric, estimate_fraction = _estimate(a, b, sign)
    per_replicate = (
        (sign * np.array(a.replicate_medians()), sign * np.array(b.replicate_medians())),
        (np.array([np.mean(r) for r in a.reached if r]),
         np.array([np.mean(r) for r in b.reached if r])))
    pa, pb = sign * a.pooled, sign * b.pooled
    with np.errstate(invalid="ignore"):
        metric_bounds = (float(pa.min() - pb.max()), float(pa.max() - pb.min()))
    intervals = []
    for estimate, diffs, margin, (rep_a, rep_b), bounds in (
            (estimate_metric, metric_diffs, metric_margin, per_replicate[0], metric_bounds),
            (estimate_fraction, fraction_diffs, fraction_margin, per_replicate[1], (-1.0, 1.0))):
        low, high = (float(x) for x in np.quantile(diffs, [tail, 1.0 - tail],
                                                   method="inverted_cdf"))
        welch = _welch_interval(rep_a, rep_b, 1.0 - 2.0 * tail)
        if welch is not None:
            # A difference of medians (or fractions) cannot leave the range that the observed
            # values allow; a t interval with 2 degrees of freedom easily would.
            floor, ceiling = bounds
            low = max(min(low, welch[0]), floor)
            high = min(max(high, welch[1]), ceiling)
        intervals.append(Interval(estimate, low, high, margin, decide(low, high, margin)))
    metric, fraction = intervals
    verdict = combine(metric.verdict, fraction.verdict)
    reason = (f"median difference {metric.verdict.named(a.label, b.label)}, "
              f"reaching-target difference {fraction.verdict.named(a.label, b.label)}")
    return PairVerdict(a.label, b.label, a.seeds, b.seeds, metric, fraction, verdict, reason,
                       *medians)


def _welch_interval(a: np.ndarray, b: np.ndarray,
                    level: float) -> tuple[float, float] | None:
    """Welch's t interval of mean(a) - mean(b) over search replicates, or None.

    The two-stage bootstrap understates the spread of tuning luck when there are few
    replicates (resampling 2 replicates reproduces only half their variance, with no allowance
    for estimating it), so with at least 2 finite replicate statistics per arm the reported
    interval also covers this one. With 2 replicates per arm it has about 2 degrees of
    freedom: only a gap large against the replicates' spread is called.
    """
    if len(a) < 2 or len(b) < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    center = float(np.mean(a) - np.mean(b))
    if va + vb == 0:
        return center, center
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    import scipy.stats  # here: it costs the controller's start about 0.7 s of CPU

    half = float(scipy.stats.t.ppf(0.5 + level / 2.0, df) * math.sqrt(va + vb))
    return center - half, center + half


def _undecided(a: Arm, b: Arm, observed: tuple[float, float], margins: tuple[float, float],
               reason: str, medians: tuple[tuple[float, ...], tuple[float, ...]]) -> PairVerdict:
    """"Not enough evidence" without a bootstrap: the observed differences, no intervals."""
    empty = Verdict.NOT_ENOUGH_EVIDENCE
    metric, fraction = (Interval(estimate, math.nan, math.nan, margin, empty)
                        for estimate, margin in zip(observed, margins, strict=True))
    return PairVerdict(a.label, b.label, a.seeds, b.seeds, metric, fraction, empty, reason,
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
        f"target) by percentile-bootstrap intervals ({samples:,} two-stage resamples: "
        f"search replicates with replacement, then each drawn replicate's seeds) of two "
        f"differences, each at {1 - (1 - confidence) / 2:.1%} so that the pair's verdict is "
        f"at {confidence:.0%} (Bonferroni over the two), oriented so that a "
        f"positive difference favours the first optimizer: the median target metric "
        f"(margin ±{metric_margin:g}) and the fraction of seeds reaching the target (margin "
        f"±{fraction_margin:g}). A statistic is *matched* when its whole interval lies inside "
        f"its margin, *ahead* for one side when the interval excludes 0 on that side, and "
        f"*not enough evidence* otherwise. The pair is matched when both statistics are, "
        f"ahead when one statistic says so and the other does not say the opposite, and not "
        f"enough evidence otherwise, always so with fewer than {min_seeds} finished seeds "
        f"per optimizer or when every seed of both diverged. Margins are fixed in the spec "
        f"before any run.")
