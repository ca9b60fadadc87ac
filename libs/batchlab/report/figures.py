"""Plots like the paper's figures, written as PNG files (matplotlib's Agg backend, no window).

`plot_schedules` draws schedules given as functions (the paper's Figure 1 from its configs);
the others draw an Experiment's stored results (batchlab.report.results): seed distributions
against the target (Figure 4), steps to the target across batch sizes, tuning effort, the best
trials' logged learning rates (Figure 1) and their validation and train curves (Table 2).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.colors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from batchlab.report.results import Experiment, Run, StudyGroup  # noqa: E402
from batchlab.search.scoring import expected_best  # noqa: E402
from batchlab.targets import Goal  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "optimizer_colors",
    "plot_expected_best",
    "plot_best_schedules",
    "plot_schedules",
    "plot_seed_distributions",
    "plot_steps_to_target",
    "plot_training_curves",
    "plot_tuning_effort",
]

log = logging.getLogger(__name__)


def plot_schedules(
    schedules: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    total_steps: int,
    path: str | Path,
    *,
    title: str = "Learning rate schedules",
    markers: Sequence[int] = (),
) -> Path:
    """Plot learning-rate schedules against the step, as in the paper's Figure 1.

    Args:
      schedules: label -> schedule (a function of an integer array of steps).
      total_steps: the last step plotted.
      path: the PNG file to write (parent folders are created).
      title: the figure title.
      markers: steps to mark with a vertical dotted line (e.g. the end of warmup).

    Returns:
      The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = np.arange(total_steps + 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, fn in schedules.items():
        ax.plot(steps, np.asarray(fn(steps), dtype=np.float64), label=label, linewidth=1.8)
    for step in markers:
        ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.set_xlim(0, total_steps)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    log.info("wrote %s", path)
    return path


# ------------------------------------------------------------- figures from stored results

_NEVER_FACTOR = 1.6  # "never reached" markers sit this far above the largest step budget
_FEASIBLE, _DIVERGED, _ABANDONED = "#4c9a2a", "#c0392b", "#9e9e9e"
_MARKERS = ("o", "s", "^", "D", "v", "P")  # one per search replicate


def optimizer_colors(experiment: Experiment) -> dict[str, str]:
    """A fixed colour per optimizer label (spec order), the same in every figure.

    Args:
      experiment: the loaded results.
    """
    cycle = plt.get_cmap("tab10")  # a listed colour map: cycle(i) is its i-th colour
    return {label: matplotlib.colors.to_hex(cycle(i % cycle.N))
            for i, label in enumerate(experiment.optimizers())}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    # No "Software" stamp: the same results give the same bytes across matplotlib patches.
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    log.info("wrote %s", path)
    return path


def _no_data(ax: Axes, text: str = "no finished runs yet") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey")


def _point_title(workload: str, batch_size: int, step_budget: int) -> str:
    return f"{workload}, batch size {batch_size:,}, {step_budget:,} steps"


def plot_seed_distributions(experiment: Experiment, workload: str, batch_size: int,
                            step_budget: int, path: str | Path) -> Path:
    """Box plots of each optimizer's final target metric over seeds, against the target.

    As the paper's Figure 4: the box spans the quartiles, the whiskers the min and max, every
    seed is a dot (one marker shape per search replicate), and a dotted red line marks the
    target. The seeds are the best trials' reruns of every replicate; a diverged seed is drawn
    at the target's worst value with an "x", as scoring counts it.

    Args:
      experiment: the loaded results.
      workload: the workload name.
      batch_size: examples per step.
      step_budget: training steps.
      path: the PNG file to write.

    Returns:
      The path written.

    References:
      Nado et al. 2021, Figure 4.
    """
    groups = experiment.groups_at_point(workload, batch_size, step_budget)
    colors = optimizer_colors(experiment)
    target = groups[0].info.target
    worst = target.worst_value()
    fig, ax = plt.subplots(figsize=(max(4.8, 1.5 * len(groups) + 2.0), 4.2), dpi=120)
    labels = []
    finite_values: list[float] = []
    for i, group in enumerate(groups):
        summaries = group.seed_summaries()
        values = np.asarray(group.pooled()[0], dtype=np.float64)
        diverged = sum(x.diverged for x in summaries)
        note = f"n={values.size}"
        if len(group.studies) > 1:
            note += f", {len(group.studies)} searches"
        if diverged:
            note += f", {diverged} diverged"
        labels.append(f"{group.label}\n({note})")
        shown = values[np.isfinite(values)]
        finite_values += list(shown)
        if shown.size == 0:
            continue
        color = colors[group.label]
        ax.boxplot([shown], positions=[i], widths=0.5, whis=(0, 100), showfliers=False,
                   patch_artist=True, boxprops={"facecolor": color, "alpha": 0.35},
                   medianprops={"color": "black"})
        for r, summary in enumerate(summaries):
            seeds = np.asarray(summary.values, dtype=np.float64)
            offsets = (np.linspace(-0.12, 0.12, seeds.size) if seeds.size > 1
                       else np.zeros(seeds.size)) + 0.05 * (r - (len(summaries) - 1) / 2)
            bad = np.asarray(summary.diverged_mask, dtype=bool)
            ok = np.isfinite(seeds) & ~bad
            ax.scatter(i + offsets[ok], seeds[ok], s=16, color=color, zorder=3,
                       edgecolors="black", linewidths=0.4, marker=_MARKERS[r % len(_MARKERS)])
            if bad.any() and math.isfinite(worst):
                ax.scatter(i + offsets[bad], seeds[bad], s=30, color=color, zorder=3,
                           marker="x")
    ax.axhline(target.value, color="red", linestyle=":", linewidth=1.5,
               label=f"target {target.value:g}")
    ax.set_xticks(range(len(groups)), labels)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(f"final {target.metric}")
    ax.set_title(_point_title(workload, batch_size, step_budget), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if not finite_values:
        _no_data(ax)
    return _save(fig, path)


def plot_steps_to_target(experiment: Experiment, workload: str, path: str | Path) -> Path:
    """Median steps to the target against batch size, one line per optimizer.

    The x axis is log2 (batch sizes), the y axis log. Small dots are the seeds, those that
    never reached the target on a "never" row above the largest step budget; a median of
    "never" (half the seeds or more never reached it) is an open circle on that row. A grey
    dashed line shows each point's step budget, the most steps a run could take; a dotted
    line in each optimizer's colour is perfect scaling from its smallest batch size (drawn only
    when that point's median reached the target), and a shaded bar below each median spans
    one evaluation period, the figure's resolution (ending in a downward marker when it reaches
    step 0). A median of "never" breaks the optimizer's line.

    Args:
      experiment: the loaded results.
      workload: the workload name.
      path: the PNG file to write.

    Returns:
      The path written.

    References:
      Shallue et al. 2019, "Measuring the Effects of Data Parallelism on Neural Network
      Training" (steps to result against batch size).
    """
    points = [p for p in experiment.points() if p[0] == workload]
    colors = optimizer_colors(experiment)
    budgets = sorted({(b, s) for _, b, s in points})
    never_y = _NEVER_FACTOR * max(s for _, s in budgets)
    labels = experiment.optimizers()
    spread = np.linspace(-0.04, 0.04, len(labels)) if len(labels) > 1 else np.zeros(1)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.plot([b for b, _ in budgets], [s for _, s in budgets], color="grey", linestyle="--",
            linewidth=1, label="step budget")
    ax.axhline(never_y, color="grey", linestyle=":", linewidth=0.8)
    plotted = False
    for k, label in enumerate(labels):
        # One entry per point with seeds: a NaN median (never) breaks the line there.
        xs: list[float] = []
        ys: list[float] = []
        never_xs = []
        for point in points:
            group = next((g for g in experiment.groups_at_point(*point) if g.label == label),
                         None)
            if group is None:
                continue
            steps = group.pooled()[2]
            if not steps:
                continue
            x = point[1] * 2.0 ** spread[k]
            # As scoring: a diverged seed never reaches the target (its steps are inf).
            seed_y = [s if math.isfinite(s) else never_y for s in steps]
            ax.scatter([x] * len(seed_y), seed_y, s=8, color=colors[label], alpha=0.35,
                       zorder=2)
            median = group.median_steps_to_target()
            xs.append(x)
            if median is not None and math.isfinite(median):
                ys.append(median)
                # The resolution: the target was met after the previous evaluation; when
                # that is step 0, the bar ends in a marker pointing down (open below).
                low = median - group.info.eval_every_steps
                ax.vlines(x, low if low > 0 else median / 4, median, color=colors[label],
                          linewidth=2.5, alpha=0.35, zorder=2)
                if low <= 0:
                    ax.scatter([x], [median / 4], marker="v", s=18, color=colors[label],
                               alpha=0.5, zorder=2)
            else:
                ys.append(math.nan)
                never_xs.append(x)
        finite = [y for y in ys if math.isfinite(y)]
        if finite:
            ax.plot(xs, ys, marker="o", color=colors[label], label=label, zorder=3)
            if len(finite) > 1 and math.isfinite(ys[0]):
                # Perfect scaling from the smallest batch size: twice the batch, half the steps.
                ax.plot(xs, [ys[0] * xs[0] / x for x in xs], color=colors[label],
                        linestyle=":", linewidth=1, alpha=0.7, zorder=2)
            plotted = True
        if never_xs:
            ax.scatter(never_xs, [never_y] * len(never_xs), s=60, facecolors="none",
                       edgecolors=colors[label], linewidths=1.5, zorder=3,
                       label=None if finite else label)
            plotted = True
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([b for b, _ in budgets], [f"{b:,}" for b, _ in budgets])
    ax.minorticks_off()
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.text(0.01, never_y, " never reached", transform=ax.get_yaxis_transform(),
            va="bottom", ha="left", fontsize=8, color="grey")
    ax.set_ylim(top=never_y * 1.5)
    ax.set_xlabel("batch size")
    ax.set_ylabel("median steps to target")
    first = experiment.at_point(*points[0])[0].info
    target = first.target
    resolutions = sorted({s.info.resolution_examples for p in points
                          for s in experiment.at_point(*p)})
    resolution = (f"resolution {resolutions[0]:,} examples" if len(resolutions) == 1 else
                  f"resolution {resolutions[0]:,}-{resolutions[-1]:,} examples")
    ax.set_title(f"{workload}: steps to {target.metric} {target.value:g}\n"
                 f"(dots: seeds, on the top row if never; open circles: a median of never;\n"
                 f"dotted: perfect scaling from the smallest batch; bars: {resolution})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    if not plotted:
        _no_data(ax)
    return _save(fig, path)


def plot_tuning_effort(experiment: Experiment, workload: str, path: str | Path) -> Path:
    """Tuning effort per study: trials split into feasible/diverged/abandoned, and steps.

    Args:
      experiment: the loaded results.
      workload: the workload name.
      path: the PNG file to write.

    Returns:
      The path written.

    References:
      Nado et al. 2021, Appendix D.3 (budgets counted in feasible trials).
    """
    studies = [s for p in experiment.points() if p[0] == workload
               for s in experiment.at_point(*p)]
    x = np.arange(len(studies))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(7.0, 0.9 * len(studies) + 3.0), 4.2),
                                      dpi=120)

    def effort(attribute: str) -> np.ndarray:
        return np.array([getattr(s.score.effort, attribute) if s.score is not None else 0
                         for s in studies], dtype=np.float64)

    feasible, diverged = effort("feasible_trials"), effort("diverged_trials")
    abandoned = effort("abandoned_trials")
    left.bar(x, feasible, color=_FEASIBLE, label="feasible")
    left.bar(x, diverged, bottom=feasible, color=_DIVERGED, label="diverged")
    left.bar(x, abandoned, bottom=feasible + diverged, color=_ABANDONED, label="abandoned")
    left.set_ylabel("tuning trials")
    left.set_title("trials per study", fontsize=10)
    tuning, reruns = effort("tuning_steps"), effort("rerun_steps")
    right.bar(x, tuning, color="#4477aa", label="tuning")
    right.bar(x, reruns, bottom=tuning, color="#88ccee", label="seed reruns")
    right.set_ylabel("training steps")
    right.set_title("steps per study", fontsize=10)
    left.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    names = [f"{s.info.optimizer}\nb{s.info.batch_size}"
             + (f" r{s.info.replicate}" if experiment.replicates() > 1 else "")
             for s in studies]
    for ax, top in ((left, feasible + diverged + abandoned), (right, tuning + reruns)):
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, max(float(top.max(initial=0.0)), 1.0) * 1.3)  # room for the legend
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.suptitle(f"{workload}: tuning effort", fontsize=11)
    return _save(fig, path)


def plot_expected_best(experiment: Experiment, workload: str, batch_size: int,
                       step_budget: int, path: str | Path) -> Path:
    """Expected best validation metric after k tuning trials, one curve per optimizer.

    For each study, E[best of k trials] and its standard deviation over the finished tuning
    trials that selection considered (a diverged trial at the target's worst value; where that
    is infinite, at the worst finite value seen at this point). A thin line per search
    replicate, a thick line for their mean with the mean +-1 std band (clipped to the range of the
    tuning results, which the best of k draws cannot leave). Crossing curves mean the
    verdict depends on the tuning budget.

    Args:
      experiment: the loaded results.
      workload: the workload name.
      batch_size: examples per step.
      step_budget: training steps.
      path: the PNG file to write.

    Returns:
      The path written.

    References:
      Dodge et al. 2019 (expected validation performance); Nado et al. 2021, Section 5.
    """
    groups = experiment.groups_at_point(workload, batch_size, step_budget)
    colors = optimizer_colors(experiment)
    target = groups[0].info.target
    floor = _finite_worst(groups)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    plotted = False
    for group in groups:
        curves, seen = [], []
        for study in group.studies:
            if study.score is None or not study.score.tuning:
                continue
            values = [t.value if math.isfinite(t.value) else floor for t in study.score.tuning]
            seen.extend(values)
            mean, std = expected_best(values, target.goal)
            curves.append((mean, std))
            k = np.arange(1, mean.size + 1)
            if len(group.studies) > 1:
                ax.plot(k, mean, color=colors[group.label], linewidth=0.8, alpha=0.5)
        if not curves:
            continue
        n = min(c[0].size for c in curves)
        mean = np.mean([c[0][:n] for c in curves], axis=0)
        std = np.mean([c[1][:n] for c in curves], axis=0)
        k = np.arange(1, n + 1)
        ax.plot(k, mean, color=colors[group.label], linewidth=2, label=group.label)
        # The best of k draws never leaves the range of the values drawn from: clip the band.
        low, high = min(seen), max(seen)
        ax.fill_between(k, np.clip(mean - std, low, high), np.clip(mean + std, low, high),
                        color=colors[group.label], alpha=0.12)
        plotted = True
    ax.axhline(target.value, color="red", linestyle=":", linewidth=1.2,
               label=f"target {target.value:g}")
    ax.set_xlabel("tuning trials k")
    ax.set_ylabel(f"expected best {target.metric}")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_title(f"{_point_title(workload, batch_size, step_budget)}: tuning effort",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if not plotted:
        _no_data(ax, "no finished tuning trials yet")
    return _save(fig, path)


def _finite_worst(groups: Sequence[StudyGroup]) -> float:
    """The worst finite tuning value at a point (stand-in for an infinite worst value)."""
    values = [t.value for g in groups for s in g.studies if s.score is not None
              for t in s.score.tuning if math.isfinite(t.value)]
    if not values:
        return 0.0
    goal = groups[0].info.target.goal
    return min(values) if goal is Goal.MAXIMIZE else max(values)


def _lr_keys(run: Run) -> list[str]:
    keys = dict.fromkeys(k for point in run.curve for k in point
                         if k == "learning_rate" or k.startswith("learning_rate/"))
    return sorted(keys)


def plot_best_schedules(experiment: Experiment, workload: str, batch_size: int,
                        step_budget: int, path: str | Path) -> Path:
    """Learning-rate schedules of each optimizer's best trial, from the stored curves.

    As the paper's Figure 1, but read from what the run logged ("learning_rate", and
    "learning_rate/<group>" keys if any), one panel per optimizer since the scales differ
    (LARS peaks near 10, Nesterov near 0.1).

    Args:
      experiment: the loaded results.
      workload: the workload name.
      batch_size: examples per step.
      step_budget: training steps.
      path: the PNG file to write.

    Returns:
      The path written.

    References:
      Nado et al. 2021, Figure 1.
    """
    studies = experiment.at_point(workload, batch_size, step_budget)
    colors = optimizer_colors(experiment)
    fig, axes = plt.subplots(len(studies), 1, figsize=(6.4, 1.9 * len(studies) + 0.8),
                             dpi=120, sharex=True, squeeze=False)
    for ax, study in zip(axes[:, 0], studies, strict=True):
        run = study.best_run()
        keys: list[str] = []
        if run is not None:
            keys = _lr_keys(run)
            for j, key in enumerate(keys):
                steps, values = run.series(key)
                ax.plot(steps, values, color=colors[study.info.optimizer],
                        linestyle="-" if j == 0 else "--", linewidth=1.6,
                        marker="." if len(steps) <= 60 else None, label=key)
        title = study.info.optimizer
        if run is not None:
            title += f" (best trial {study.best_trial})"
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylabel("learning rate", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
        if not keys:
            _no_data(ax, "no best trial yet" if run is None else "no learning_rate logged")
    axes[-1, 0].set_xlabel("training step")
    axes[-1, 0].set_xlim(0, step_budget)
    fig.suptitle(f"Learning rate of the best trials: "
                 f"{_point_title(workload, batch_size, step_budget)}", fontsize=10)
    return _save(fig, path)


def plot_training_curves(experiment: Experiment, workload: str, batch_size: int,
                         step_budget: int, path: str | Path) -> Path:
    """Validation and train curves of every scored seed, coloured by optimizer.

    Left: the target metric (with the target as a dotted red line); right: its train
    counterpart (Table 2 compares the two). One thin line per seed of the best trial; a
    diverged seed is dashed and ends in a cross.

    Args:
      experiment: the loaded results.
      workload: the workload name.
      batch_size: examples per step.
      step_budget: training steps.
      path: the PNG file to write.

    Returns:
      The path written.

    References:
      Nado et al. 2021, Table 2 (train vs test accuracy).
    """
    studies = experiment.at_point(workload, batch_size, step_budget)
    colors = optimizer_colors(experiment)
    target = studies[0].info.target
    train = studies[0].info.train_metric
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=120, sharex=True)
    drawn = {left: False, right: False}
    for study in studies:
        color = colors[study.info.optimizer]
        feasible = {r.path for r in study.feasible_scored_runs()}
        for i, run in enumerate(study.scored_runs()):
            for ax, metric in ((left, target.metric), (right, train)):
                if metric is None:
                    continue
                steps, values = run.series(metric)
                if not steps:
                    continue
                ok = run.path in feasible
                # A diverged seed: dashed, with a cross where its curve stops.
                ax.plot(steps, values, color=color, linewidth=1.0, alpha=0.7,
                        linestyle="-" if ok else "--",
                        label=study.info.optimizer if i == 0 else None)
                if not ok:
                    ax.plot(steps[-1:], values[-1:], marker="x", color=color)
                drawn[ax] = True
    left.axhline(target.value, color="red", linestyle=":", linewidth=1.5,
                 label=f"target {target.value:g}")
    left.set_ylabel(target.metric)
    right.set_ylabel(train or "train metric")
    for ax in (left, right):
        ax.set_xlabel("training step")
        ax.set_xlim(0, step_budget)
        ax.grid(alpha=0.3)
        if drawn[ax]:
            ax.legend(fontsize=8)
        else:
            _no_data(ax)
    fig.suptitle(f"Best trial's seeds: {_point_title(workload, batch_size, step_budget)}",
                 fontsize=10)
    return _save(fig, path)
