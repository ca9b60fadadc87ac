"""Short, cautious answers to the paper's question at each (workload, batch size, budget).

The paper asks whether LARS and LAMB beat standard optimizers once those are tuned as well
(Nado et al. 2021, Sections 2-4). At each point the report compares the pairs the paper
compares, derived from the weights optimizer: Nesterov or heavy-ball momentum vs LARS, and
Adam vs LAMB. Two studies are called matched when the interquartile ranges of their target
metric over seeds overlap; otherwise the better median (per the target's goal) is said to be
ahead. With few seeds this is weak evidence, and the text says how many seeds each side has.
"""

from __future__ import annotations

from collections.abc import Iterable

from batchlab.report.results import Experiment, StudyResult
from batchlab.report.tables import format_metric, format_steps
from batchlab.search.study import Goal

__all__ = ["PAIR_FAMILIES", "answer_paragraph", "comparable_pairs"]

# (family A, family B): weights optimizers compared, as in the paper.
PAIR_FAMILIES: tuple[tuple[frozenset[str], frozenset[str]], ...] = (
    (frozenset({"nesterov", "heavy_ball"}), frozenset({"lars"})),
    (frozenset({"adam"}), frozenset({"lamb"})),
)
FEW_SEEDS = 5  # below this many seeds per side, the answer says the evidence is thin


def comparable_pairs(studies: Iterable[StudyResult]) -> list[tuple[StudyResult, StudyResult]]:
    """The (standard, layerwise) pairs among studies of one point, in study order.

    Args:
      studies: the studies of one (workload, batch size, step budget).

    Returns:
      Pairs (a, b) with a's weights optimizer in a standard family (Nesterov/heavy ball,
      Adam) and b's in its layerwise counterpart (LARS, LAMB).
    """
    studies = list(studies)
    pairs = []
    for standard, layerwise in PAIR_FAMILIES:
        for a in studies:
            if a.info.weights_optimizer not in standard:
                continue
            for b in studies:
                if b.info.weights_optimizer in layerwise:
                    pairs.append((a, b))
    return pairs


def _sentence(a: StudyResult, b: StudyResult) -> str:
    names = f"`{a.info.optimizer}` vs `{b.info.optimizer}`"
    missing = [s for s in (a, b) if s.score is None or s.score.seeds.metric.count == 0]
    if missing:
        which = ", ".join(f"`{s.info.optimizer}`" for s in missing)
        return f"{names}: cannot compare yet ({which} has no finished seed with a finite metric)."
    sa, sb = a.score.seeds, b.score.seeds  # type: ignore[union-attr]
    ma, mb = sa.metric, sb.metric
    metric = a.info.target.metric
    text = (f"{names}: median {metric} {format_metric(ma.median)} "
            f"[{format_metric(ma.q25)}, {format_metric(ma.q75)}] vs {format_metric(mb.median)} "
            f"[{format_metric(mb.q25)}, {format_metric(mb.q75)}] over {ma.count} and "
            f"{mb.count} seeds")
    overlap = max(ma.q25, mb.q25) <= min(ma.q75, mb.q75)  # type: ignore[type-var]
    if overlap:
        text += "; the interquartile ranges overlap, so the two look matched at this budget"
    else:
        maximize = a.info.target.goal is Goal.MAXIMIZE
        a_ahead = (ma.median > mb.median) == maximize  # type: ignore[operator]
        leader = a if a_ahead else b
        text += (f"; the interquartile ranges do not overlap, so `{leader.info.optimizer}` "
                 "looks ahead at this budget")
    text += (f". Seeds reaching the target: {sa.reached_target}/{sa.finished} vs "
             f"{sb.reached_target}/{sb.finished}; median steps to target "
             f"{format_steps(sa.median_steps_to_target)} vs "
             f"{format_steps(sb.median_steps_to_target)}.")
    cautions = []
    if min(ma.count, mb.count) < FEW_SEEDS:
        cautions.append("few seeds, so this is weak evidence")
    if not (a.done and b.done):
        cautions.append("not every study has finished, so this may change")
    if sa.diverged or sb.diverged:
        cautions.append(f"diverged seeds ({sa.diverged} vs {sb.diverged}) are left out of "
                        "the medians")
    if cautions:
        text += " Caution: " + "; ".join(cautions) + "."
    return text


def answer_paragraph(experiment: Experiment, workload: str, batch_size: int,
                     step_budget: int) -> str:
    """A short paragraph comparing the paper's optimizer pairs at one point.

    Args:
      experiment: the loaded results.
      workload: the workload name.
      batch_size: examples per step.
      step_budget: training steps.

    Returns:
      Markdown: one bullet per pair, or a sentence saying there is no pair to compare.
    """
    studies = experiment.at_point(workload, batch_size, step_budget)
    pairs = comparable_pairs(studies)
    head = (f"**Answer at batch size {batch_size:,}, {step_budget:,} steps** (target "
            f"{studies[0].info.target.metric} {_goal_sign(studies[0])} "
            f"{studies[0].info.target.value:g}; matched = interquartile ranges overlap):")
    if not pairs:
        return (head + " no Nesterov/heavy-ball vs LARS or Adam vs LAMB pair was run here; "
                "see the table.\n")
    return head + "\n\n" + "\n".join(f"- {_sentence(a, b)}" for a, b in pairs) + "\n"


def _goal_sign(study: StudyResult) -> str:
    return ">=" if study.info.target.goal is Goal.MAXIMIZE else "<="
