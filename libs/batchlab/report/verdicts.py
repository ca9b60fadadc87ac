"""Verdicts at each (workload, batch size, step budget): decided pairs and the flags that weaken them.

The pairs compared are the spec's pre-registered `comparisons` or, when it names none, the
paper's pairs read from the weights optimizers (Nesterov or heavy-ball momentum vs LARS, Adam
vs LAMB; Nado et al. 2021, Sections 2-4). Each pair is decided by
`batchlab.search.compare.compare_arms` over the seeds of every search replicate, and every
diagnostic of the studies behind it (`batchlab.search.diagnostics`) is printed next to it: a
verdict built on a flagged study says so in words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from batchlab.report.results import Experiment, StudyGroup, spec_get
from batchlab.report.tables import DASH, format_metric, markdown_table
from batchlab.search.compare import MIN_SEEDS, PairVerdict, Verdict, compare_arms, rule_text
from batchlab.search.diagnostics import (
    Diagnostic,
    replicate_spread_diagnostic,
    study_diagnostics,
)
from batchlab.targets import Goal

__all__ = [
    "PAIR_FAMILIES",
    "DecidedPair",
    "comparison_pairs",
    "decide_point",
    "rule_paragraph",
    "study_flags",
    "verdict_section",
]

# (family A, family B): weights optimizers compared when the spec names no comparisons.
PAIR_FAMILIES: tuple[tuple[frozenset[str], frozenset[str]], ...] = (
    (frozenset({"nesterov", "heavy_ball"}), frozenset({"lars"})),
    (frozenset({"adam"}), frozenset({"lamb"})),
)


@dataclass(frozen=True)
class DecidedPair:
    """A decided comparison with the flags of the studies behind it.

    Args:
      a: arm A's group.
      b: arm B's group.
      verdict: the decision.
      flags: every diagnostic of both arms' studies, and the replicate-spread flag.
      train: the same comparison of the final train metric (informational: is a difference
        in validation also one in training, or regularization?); None without a train metric.
    """

    a: StudyGroup
    b: StudyGroup
    verdict: PairVerdict
    flags: tuple[Diagnostic, ...]
    train: PairVerdict | None = None


def comparison_pairs(experiment: Experiment,
                     groups: Sequence[StudyGroup]) -> list[tuple[StudyGroup, StudyGroup]]:
    """The pairs to decide among one point's groups (see the module docstring).

    Args:
      experiment: the loaded results (its spec names the comparisons).
      groups: the groups of one point.
    """
    by_label = {g.label: g for g in groups}
    named = [c for c in spec_get(experiment.spec, "comparisons", ()) or ()
             if isinstance(c, Mapping)]
    if named:
        return [(by_label[str(c.get("a"))], by_label[str(c.get("b"))]) for c in named
                if str(c.get("a")) in by_label and str(c.get("b")) in by_label]
    pairs = []
    for standard, layerwise in PAIR_FAMILIES:
        for a in groups:
            if a.info.weights_optimizer in standard:
                pairs += [(a, b) for b in groups if b.info.weights_optimizer in layerwise]
    return pairs


def study_flags(experiment: Experiment, group: StudyGroup) -> list[Diagnostic]:
    """The diagnostics of every scored study of a group.

    Args:
      experiment: the loaded results.
      group: one optimizer at one point.
    """
    found: list[Diagnostic] = []
    for study in group.studies:
        protocol = experiment.protocol.get(study.id)
        if protocol is not None and study.score is not None and study.score.done:
            found += study_diagnostics(protocol, study.score)
    return found


def decide_point(experiment: Experiment, workload: str, batch_size: int,
                 step_budget: int) -> list[DecidedPair]:
    """Decide every comparison at one point.

    Args:
      experiment: the loaded results.
      workload: the workload name.
      batch_size: examples per step.
      step_budget: training steps.
    """
    decided = []
    groups = experiment.groups_at_point(workload, batch_size, step_budget)
    context = f"{workload}|b{batch_size}|s{step_budget}"
    for a, b in comparison_pairs(experiment, groups):
        target = a.info.target
        if stops_at_target(experiment):
            # The metric at the stopping step says nothing: compare steps-to-target, matched
            # within one evaluation period (the measurement's resolution).
            verdict = compare_arms(a.arm(steps=True), b.arm(steps=True), goal=Goal.MINIMIZE,
                                   metric_margin=float(a.info.eval_every_steps),
                                   fraction_margin=target.reaching_margin,
                                   context=context, worst=math.inf)
        else:
            verdict = compare_arms(a.arm(), b.arm(), goal=target.goal,
                                   metric_margin=target.metric_margin,
                                   fraction_margin=target.reaching_margin,
                                   context=context, worst=target.worst_value())
        flags = study_flags(experiment, a) + study_flags(experiment, b)
        spread = replicate_spread_diagnostic(verdict)
        if spread is not None:
            flags.append(spread)
        train_a, train_b = a.train_arm(), b.train_arm()
        train = None
        if train_a is not None and train_b is not None and train_a.seeds and train_b.seeds:
            train = compare_arms(train_a, train_b, goal=target.goal,
                                 metric_margin=target.metric_margin,
                                 fraction_margin=target.reaching_margin,
                                 context=f"{context}|train", worst=target.worst_value())
        decided.append(DecidedPair(a, b, verdict, tuple(flags), train))
    return decided


def stops_at_target(experiment: Experiment) -> bool:
    """Whether the experiment's runs stop at the target (the spec's stop_at_target)."""
    return bool(spec_get(experiment.spec, "stop_at_target", False))


def rule_paragraph(experiment: Experiment) -> str:
    """The decision rule as the report prints it, with the margins of every workload."""
    margins = {}
    for study in experiment.studies:
        target = study.info.target
        margins[study.info.workload] = (target.metric_margin, target.reaching_margin,
                                        target.reading.name)
    lines = []
    for workload, (metric_margin, fraction_margin, reading) in margins.items():
        lines.append(f"- `{workload}`: " + rule_text(metric_margin, fraction_margin)
                     + f" A seed reaches the target by the {reading} reading.")
    if stops_at_target(experiment):
        lines.append("- Runs stop at the first evaluation that meets the target, so the "
                     "compared statistic is the median steps-to-target (a seed that never "
                     "reached it counts as infinitely many steps; lower is better), matched "
                     "within one evaluation period, the resolution of the measurement, in "
                     "place of the median metric.")
    return "\n".join(lines) + "\n"


def _interval(low: float, high: float, digits: int) -> str:
    if low != low:  # NaN: no interval (too few seeds)
        return DASH
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def _medians(values: Sequence[float]) -> str:
    return ", ".join(format_metric(v) for v in values) or DASH


def verdict_section(experiment: Experiment, workload: str, batch_size: int,
                    step_budget: int) -> str:
    """Markdown: the verdict table of one point, then each flag next to the verdict it weakens.

    Args:
      experiment: the loaded results.
      workload: the workload name.
      batch_size: examples per step.
      step_budget: training steps.
    """
    decided = decide_point(experiment, workload, batch_size, step_budget)
    if not decided:
        return ("No comparison is named for this point (no `comparisons` in the spec and no "
                "Nesterov/heavy-ball vs LARS or Adam vs LAMB pair); see the table.\n")
    statistic = "Δ median steps" if stops_at_target(experiment) else "Δ median"
    digits = 0 if stops_at_target(experiment) else 4
    header = ["comparison (A vs B)", "verdict", f"{statistic} (A better +) [95% CI]",
              "Δ fraction reaching [95% CI]", "Δ train median [95% CI]", "seeds A / B",
              "median per replicate A | B", "flags"]
    rows = []
    notes = []
    for pair in decided:
        v = pair.verdict
        name = f"`{v.a}` vs `{v.b}`"
        verdict = v.named
        if not (pair.a.done and pair.b.done):
            verdict += " (in progress)"
        rows.append([
            name, f"**{verdict}**",
            f"{v.metric.estimate:+.{digits}f} {_interval(v.metric.low, v.metric.high, digits)} "
            f"(±{v.metric.margin:g})",
            f"{v.fraction.estimate:+.2f} {_interval(v.fraction.low, v.fraction.high, 2)} "
            f"(±{v.fraction.margin:g})",
            DASH if pair.train is None else
            f"{pair.train.metric.estimate:+.4f} "
            f"{_interval(pair.train.metric.low, pair.train.metric.high, 4)}",
            f"{v.seeds_a} / {v.seeds_b}",
            f"{_medians(v.replicate_medians_a)} | {_medians(v.replicate_medians_b)}",
            str(len(pair.flags)) if pair.flags else "none",
        ])
        if v.verdict is Verdict.NOT_ENOUGH_EVIDENCE and min(v.seeds_a, v.seeds_b) < MIN_SEEDS:
            notes.append(f"- {name}: {v.reason}.")
        if pair.flags:
            notes.append(f"- {name} ({verdict}) rests on flagged studies; it holds only as far "
                         "as these do not matter:")
            notes += [f"  - {flag}" for flag in pair.flags]
    text = markdown_table(header, rows, ["l", "l", "r", "r", "r", "r", "r", "r"])
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    return text
