"""Search-space diagnostics: mistakes in a spec, and artefacts in a study's results.

A fair comparison can be defeated by its own search space. These checks catch the classes of
mistake that have misled optimizer comparisons, before anything runs and after a study ends:

Before running (`spec_diagnostics`, printed by `batchlab spec check`, `batchlab local run`,
Submit with validate_only, and echoed in every report):
  - tied-across-kinds: one searched value written to parameter groups whose optimizers are of
    different kinds, for a hyperparameter whose scale depends on the update rule (learning
    rate, weight decay, epsilon, trust coefficient). LARS on the weights wants a learning rate
    of order 10 where heavy ball on biases/BN works near 1 or below (Nado et al. 2021, Table 8:
    LARS eta in [10, 40]); a tied rate means no point of the search gets both right. Momentum
    and schedule shape (warmup steps, powers) mean the same thing for every kind and may be tied.
  - few-trials-per-dimension: fewer than MIN_TRIALS_PER_DIMENSION feasible trials per searched
    dimension (quasi-random search covers a d-dimensional box thinly below that).
  - few-seeds: fewer reruns of the best trial than a verdict needs (compare.MIN_SEEDS).
  - single-replicate: tuning luck is not replicated (search_replicates 1).
  - eval-resolution-differs: the points of a workload evaluate at different numbers of
    examples, so steps-to-target has a different resolution in examples at each batch size.

After a study (`study_diagnostics`, next to the verdicts they weaken):
  - best-at-edge: the best trial's value of a searched dimension lies in the outer
    EDGE_FRACTION of its range (measured on the scale it is searched on: log for a log range)
    or is the extreme choice of a numeric discrete list. An edge at 0 is a natural bound
    (warmup steps, label smoothing) and is not flagged.
  - mostly-diverged: more than half of the study's tuning trials diverged.
  - target-never-reached: no tuning trial reached the target (steps-to-target and the fraction
    reaching the target cannot separate optimizers at this budget).
  - best-not-reproduced: the median of the best trial's reruns falls short of its tuning run by
    more than NOT_REPRODUCED_MARGINS equivalence margins. Selection on one seed picked a
    configuration whose result does not survive new seeds (often one at the edge of stability,
    where some seeds collapse): the study's score is real, but its best point is fragile and
    another trial may have been the better choice. A study that selects by the fewest steps to
    the target is judged on steps: the reruns' median steps exceed the tuning run's by more
    than one evaluation period (the measurement's resolution), or they mostly never reach it.
    (Under stop_at_target the final metric is the metric at the stopping evaluation, which
    says nothing about the selection.)
  - margin-within-replicate-spread (from `replicate_spread_diagnostic`): the winner's margin is
    no larger than the spread of the arms' medians across search replicates.

References:
  Nado et al. 2021, Section 4 and Appendix D.3 (LARS with heavy ball on biases/BN, Table 8's
  ranges; a best point at a range's edge means the range was wrong); shared
  reference/protocol.md (Bousquet et al. 2017; AlgoPerf replicates; steps-to-target resolution).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchlab.paths import get_path
from batchlab.search.compare import MIN_SEEDS, PairVerdict, Verdict
from batchlab.search.scoring import StudyScore
from batchlab.search.space import (
    Scale,
    SearchParameter,
    SearchSpace,
    parse_search_space,
    plain_data,
)
from batchlab.search.study import Selection, Study, trial_point
from batchlab.targets import Goal

__all__ = [
    "EDGE_FRACTION",
    "MIN_TRIALS_PER_DIMENSION",
    "NOT_REPRODUCED_MARGINS",
    "Diagnostic",
    "EdgeFlag",
    "best_at_edges",
    "optimizer_kind",
    "replicate_spread_diagnostic",
    "spec_diagnostics",
    "study_diagnostics",
]

MIN_TRIALS_PER_DIMENSION = 4
EDGE_FRACTION = 0.10
NOT_REPRODUCED_MARGINS = 5

# Update rules whose hyperparameters share a scale. LARS and LAMB rescale each layer's step
# by a trust ratio, so their learning rates live on a different scale from plain momentum
# and Adam.
_KINDS = {
    "nesterov": "momentum", "heavy_ball": "momentum", "sgd": "momentum",
    "lars": "LARS", "lamb": "LAMB", "adam": "Adam",
}
# Hyperparameters (relative to a group) whose meaningful values depend on the update rule:
# the learning rate's magnitudes (not its schedule's shape: warmup steps, powers and decay
# factors mean the same for every rule), weight decay, epsilon and the trust coefficient.
_SCALE_DEPENDENT = ("weight_decay", "eps", "trust_coefficient")
_LEARNING_RATE_VALUES = ("peak_value", "init_value", "end_value", "value")


def _scale_dependent(inner: str) -> bool:
    parts = inner.split(".")
    if parts[0] == "learning_rate":
        return len(parts) == 1 or parts[1] in _LEARNING_RATE_VALUES
    return parts[0] in _SCALE_DEPENDENT


@dataclass(frozen=True)
class Diagnostic:
    """One finding.

    Args:
      code: a stable name, e.g. "tied-across-kinds".
      where: the spec field path, or the study id.
      message: what was found and what to do about it.
    """

    code: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.where}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"code": self.code, "where": self.where, "message": self.message}


def optimizer_kind(name: str) -> str:
    """The family an optimizer's hyperparameter scales belong to ("momentum", "LARS", ...).

    Args:
      name: an optimizer name of batchlab.optim.schema.
    """
    return _KINDS.get(name, name)


def _group_of(config: Mapping[str, Any], path: str) -> tuple[str, str] | None:
    """(group, path inside the group) of an "optimizer.<...>" path; None for other paths."""
    parts = path.split(".")
    if parts[0] != "optimizer" or len(parts) < 2:
        return None
    if parts[1] in config and isinstance(config[parts[1]], Mapping) and "optimizer" not in config:
        return parts[1], ".".join(parts[2:])
    return "", ".".join(parts[1:])


def _tied_across_kinds(j: int, config: Mapping[str, Any],
                       space: SearchSpace) -> list[Diagnostic]:
    found = []
    for p, parameter in enumerate(space.parameters):
        if not parameter.tuned or len(parameter.paths) < 2:
            continue
        kinds: dict[str, str] = {}
        scale_dependent = False
        for path in parameter.paths:
            located = _group_of(config, path)
            if located is None:
                continue
            group, inner = located
            name = get_path(config, f"{group}.optimizer" if group else "optimizer")
            if name is None:
                continue
            kinds[group or "(all parameters)"] = optimizer_kind(str(name))
            scale_dependent |= _scale_dependent(inner)
        if scale_dependent and len(set(kinds.values())) > 1:
            groups = ", ".join(f"{g} ({k})" for g, k in kinds.items())
            found.append(Diagnostic(
                "tied-across-kinds", f"optimizers[{j}].search_space.parameters[{p}]",
                f"one searched value of `{parameter.path}` is written to groups whose "
                f"optimizers are of different kinds: {groups}. Their good values can differ "
                f"by orders of magnitude, and then no trial gets both right; search the other "
                f"group's value as its own dimension (or fix it), e.g. drop the tie and add a "
                f"parameter for `{parameter.tied_paths[0]}`."))
    return found


def spec_diagnostics(spec: Any) -> list[Diagnostic]:
    """Warnings about a valid spec's design (see the module docstring), in spec order.

    Args:
      spec: a validated ExperimentSpec, or its protobuf JSON mapping.
    """
    data = _as_mapping(spec)
    found: list[Diagnostic] = []
    trials = int(data.get("trials_per_study") or 0)
    for j, optimizer in enumerate(data.get("optimizers") or ()):
        config = plain_data(optimizer.get("config") or {})
        space = parse_search_space(optimizer.get("search_space"),
                                   field_path=f"optimizers[{j}].search_space")
        found += _tied_across_kinds(j, config, space)
        dimension = space.dimension
        if dimension and trials < MIN_TRIALS_PER_DIMENSION * dimension:
            found.append(Diagnostic(
                "few-trials-per-dimension", f"optimizers[{j}].search_space",
                f"{trials} feasible trials for {dimension} searched dimensions "
                f"({trials / dimension:.1f} per dimension; at least "
                f"{MIN_TRIALS_PER_DIMENSION} per dimension, i.e. "
                f"{MIN_TRIALS_PER_DIMENSION * dimension} trials, cover the space): raise "
                f"trials_per_study or search fewer dimensions."))
    seeds = int(data.get("seeds_per_best") or 0)
    if seeds < MIN_SEEDS:
        found.append(Diagnostic(
            "few-seeds", "seeds_per_best",
            f"{seeds} reruns of each best trial; a verdict needs at least {MIN_SEEDS} finished "
            f"seeds per optimizer, so every comparison will read 'not enough evidence' unless "
            f"search replicates add seeds."))
    if int(data.get("search_replicates") or 1) < 2:
        found.append(Diagnostic(
            "single-replicate", "search_replicates",
            "tuning luck is not replicated (one search per study): reports cannot show how "
            "much a verdict depends on the search sequence; set search_replicates >= 2 for "
            "headline comparisons."))
    for i, workload in enumerate(data.get("workloads") or ()):
        resolutions = {}
        for point in workload.get("points") or ():
            steps = int(point.get("eval_every_steps") or 0)
            examples = int(point.get("eval_every_examples") or 0)
            if not steps and not examples:
                steps = int(workload.get("eval_every_steps") or 0)
                examples = int(workload.get("eval_every_examples") or 0)
            batch = int(point.get("batch_size") or 0)
            if examples:
                steps = -(-examples // max(batch, 1))
            resolutions[batch] = steps * batch
        if len(set(resolutions.values())) > 1:
            text = ", ".join(f"{v:,} at batch {b:,}" for b, v in sorted(resolutions.items()))
            found.append(Diagnostic(
                "eval-resolution-differs", f"workloads[{i}]",
                f"evaluations every {text} examples: steps-to-target has a different "
                f"resolution in examples at each batch size; give the period as "
                f"eval_every_examples to compare batch sizes at one resolution."))
    return found


def _as_mapping(spec: Any) -> Mapping[str, Any]:
    if hasattr(spec, "DESCRIPTOR"):
        from google.protobuf import json_format

        data: dict[str, Any] = json_format.MessageToDict(spec, preserving_proto_field_name=True)
        return data
    mapping: Mapping[str, Any] = spec
    return mapping


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


@dataclass(frozen=True)
class EdgeFlag:
    """A searched dimension whose best value lies at an edge of its range (best-at-edge).

    Args:
      parameter: the search parameter.
      side: "lower" or "upper" (of the searched quantity: 1 - value for ``one_minus``).
      value: the best trial's value (what the config holds).
      where: the edge in words, e.g. "in the lower 10% of [0.25, 4] (linear scale)".
    """

    parameter: SearchParameter
    side: str
    value: Any
    where: str


def best_at_edges(study: Study, best_trial: int) -> list[EdgeFlag]:
    """The searched dimensions of ``best_trial`` that lie in the outer ``EDGE_FRACTION`` of
    their range (on its scale), or at the extreme choice of a numeric discrete list; an edge at
    0 is a natural bound and is not flagged.

    Args:
      study: the study.
      best_trial: the index of its best trial.
    """
    found = []
    point = iter(trial_point(study, best_trial))
    hyperparameters = study.hyperparameters(best_trial)
    for parameter in study.search_space.parameters:
        if not parameter.tuned:
            continue
        u = next(point)
        value = get_path(hyperparameters, parameter.path)
        raw = 1.0 - value if parameter.one_minus else value
        if parameter.scale is Scale.DISCRETE:
            numeric = [v for v in parameter.values
                       if isinstance(v, int | float) and not isinstance(v, bool)]
            if len(numeric) != len(parameter.values) or len(numeric) < 2:
                continue
            edge = raw in (min(numeric), max(numeric)) and raw != 0
            side = "lower" if raw == min(numeric) else "upper"
            where = f"the {'smallest' if side == 'lower' else 'largest'} of {list(numeric)}"
        else:
            assert parameter.low is not None and parameter.high is not None
            low_edge, high_edge = u < EDGE_FRACTION, u >= 1.0 - EDGE_FRACTION
            edge = (low_edge and parameter.low != 0) or high_edge
            scale = "log" if parameter.scale is Scale.LOG else "linear"
            side = "lower" if low_edge else "upper"
            where = (f"in the {side} {EDGE_FRACTION:.0%} of [{parameter.low:g}, "
                     f"{parameter.high:g}] ({scale} scale)")
        if edge:
            found.append(EdgeFlag(parameter, side, value, where))
    return found


def _edges(study: Study, best_trial: int) -> list[Diagnostic]:
    found = []
    for flag in best_at_edges(study, best_trial):
        parameter, value = flag.parameter, flag.value
        raw = 1.0 - value if parameter.one_minus else value
        shown = _format(value) + (f" (searched as 1 - value = {_format(raw)})"
                                  if parameter.one_minus else "")
        found.append(Diagnostic(
            "best-at-edge", study.id,
            f"the best trial's `{parameter.path}` = {shown} lies {flag.where}: the optimum may "
            f"lie outside the range; widen or move it."))
    return found


def study_diagnostics(study: Study, score: StudyScore) -> list[Diagnostic]:
    """Flags on a scored study (see the module docstring).

    Args:
      study: the study.
      score: its score (`batchlab.search.scoring.score_study`).
    """
    found: list[Diagnostic] = []
    if score.best_trial is not None:
        found += _edges(study, score.best_trial)
    tuning = score.tuning
    diverged = sum(1 for t in tuning if t.diverged)
    if tuning and diverged * 2 > len(tuning):
        found.append(Diagnostic(
            "mostly-diverged", study.id,
            f"{diverged} of {len(tuning)} tuning trials diverged: the search space sits "
            f"largely where this optimizer is unstable; move it."))
    best = next((t for t in tuning if t.trial_index == score.best_trial), None)
    median = score.seeds.metric.median
    # A study selecting by steps whose tuning trials never reached the target picked its best
    # by the metric (the tie-break): judge that one on the metric.
    by_steps = (study.selection is Selection.FEWEST_STEPS_TO_TARGET and best is not None
                and math.isfinite(best.steps_to_target))
    if by_steps and best is not None and study.seeds_per_best > 0 and score.seeds.finished > 0:
        steps = score.seeds.median_steps_to_target
        if steps is not None and steps - best.steps_to_target > study.eval_every_steps:
            rerun = ("half or more of them never reached it" if math.isinf(steps) else
                     f"their median is {steps:g} steps, more than one evaluation period "
                     f"({study.eval_every_steps} steps) later")
            found.append(Diagnostic(
                "best-not-reproduced", study.id,
                f"the best trial ({best.trial_index}) reached the target in "
                f"{best.steps_to_target:g} steps in tuning but not in its "
                f"{score.seeds.finished} reruns: {rerun}; its tuning result was a lucky seed."))
    elif best is not None and median is not None and study.seeds_per_best > 0 \
            and score.seeds.finished > 0:
        sign = 1.0 if study.target.goal is Goal.MAXIMIZE else -1.0
        shortfall = sign * (best.value - median)
        if shortfall > NOT_REPRODUCED_MARGINS * study.target.metric_margin:
            found.append(Diagnostic(
                "best-not-reproduced", study.id,
                f"the best trial ({best.trial_index}) scored {best.value:.4g} in tuning but "
                f"{median:.4g} in the median of its {score.seeds.finished} reruns, "
                f"{shortfall:.4g} worse (more than {NOT_REPRODUCED_MARGINS} equivalence "
                f"margins): its tuning result was a lucky seed of a fragile configuration."))
    if tuning and not any(math.isfinite(t.steps_to_target) for t in tuning):
        found.append(Diagnostic(
            "target-never-reached", study.id,
            f"none of the {len(tuning)} tuning trials reached the target "
            f"({score.target.get('metric')} {score.target.get('value')}): at this budget the "
            f"fraction reaching the target and steps-to-target cannot separate optimizers."))
    return found


def replicate_spread_diagnostic(verdict: PairVerdict) -> Diagnostic | None:
    """Flag a winner whose margin is within the spread of tuning luck across replicates.

    Args:
      verdict: a pair's decision (with each arm's median per search replicate).

    Returns:
      The flag when one side is ahead and its median margin is no larger than the range of
      either arm's replicate medians; None otherwise (including single-replicate studies,
      where the spread is unknown: `spec_diagnostics` says so).
    """
    if verdict.verdict not in (Verdict.A_AHEAD, Verdict.B_AHEAD):
        return None
    spreads = [max(m) - min(m) for m in (verdict.replicate_medians_a,
                                         verdict.replicate_medians_b) if len(m) > 1]
    if not spreads:
        return None
    margin = abs(verdict.metric.estimate)
    spread = max(spreads)
    if margin <= spread:
        return Diagnostic(
            "margin-within-replicate-spread", f"{verdict.a} vs {verdict.b}",
            f"the winner's margin in median ({margin:.4g}) is no larger than the spread of "
            f"one optimizer's median across search replicates ({spread:.4g}): another search "
            f"sequence could change the verdict.")
    return None

