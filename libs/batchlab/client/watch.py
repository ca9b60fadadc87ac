"""A live terminal view of an experiment: trials by outcome, best so far, progress per study."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from batchlab.proto.v1 import controller_pb2

__all__ = ["render", "summary_line", "watch"]

_STATE = controller_pb2.Experiment.State


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "never" if math.isinf(x) else f"{x:.4g}"


def render(experiment: controller_pb2.Experiment, best: dict[str, float]) -> Group:
    """One frame: header, trial counts, why trials wait (if they do), studies with progress."""
    spec = experiment.spec
    counts = experiment.trial_counts
    head = Table.grid(padding=(0, 2))
    head.add_row(
        f"[bold]{experiment.name}[/bold] ({spec.name})",
        f"state [bold]{_STATE.Name(experiment.state)}[/bold]",
        f"queued {counts.pending}  running {counts.running}  succeeded {counts.succeeded}  "
        f"diverged {counts.diverged}  failed {counts.failed}  cancelled {counts.cancelled}",
    )
    table = Table(show_edge=False)
    for col in ("study", "phase", "progress", "best trial", "best so far", "median (seeds)", "reach"):
        table.add_column(col)
    planned = spec.trials_per_study + spec.seeds_per_best
    for study in experiment.studies:
        agg = study.aggregate
        done = agg.total_trials + (agg.seeds if study.phase in ("reruns", "done") else 0)
        frac = 1.0 if study.phase == "done" else min(done / max(planned, 1), 0.99)
        median = agg.median if agg.HasField("median") else None
        table.add_row(
            study.name.rsplit("/", 1)[-1],
            study.phase,
            ProgressBar(total=1.0, completed=frac, width=20),
            str(study.best_trial) if study.HasField("best_trial") else "-",
            _fmt(best.get(study.name)),
            _fmt(median),
            f"{agg.fraction_reaching_target:.0%}" if agg.seeds else "-",
        )
    lines = []
    if experiment.pending_reason:
        lines.append(Text.assemble(("waits: ", "yellow"), experiment.pending_reason))
    if experiment.error:
        lines.append(Text.assemble(("error: ", "red"), experiment.error))
    return Group(head, *lines, table)


def summary_line(experiment: controller_pb2.Experiment, best: Mapping[str, float] | None = None) -> str:
    """One plain line for logs and pipes: state, trial counts, studies done, the best target
    metric so far per study (from ``best``, by study name), why runs wait."""
    counts = experiment.trial_counts
    done = sum(1 for study in experiment.studies if study.phase == "done")
    line = (f"{experiment.name} {_STATE.Name(experiment.state)}: queued {counts.pending} "
            f"running {counts.running} succeeded {counts.succeeded} diverged {counts.diverged} "
            f"failed {counts.failed} cancelled {counts.cancelled}; studies done {done} of "
            f"{len(experiment.studies)}")
    shown = [f"{study.name.rsplit('/', 1)[-1]} {_fmt(best[study.name])}"
             for study in experiment.studies if best and study.name in best]
    if shown:
        line += "; best so far: " + ", ".join(shown)
    if experiment.pending_reason:
        line += f"; waits: {experiment.pending_reason}"
    if experiment.error:
        line += f"; error: {experiment.error}"
    return line


def watch(stream: Iterable[controller_pb2.WatchExperimentResponse], *,
          console: Console | None = None) -> controller_pb2.Experiment | None:
    """Render the stream until it ends; return the last experiment seen.

    On a terminal the view is redrawn in place. Elsewhere (a pipe, a log file, CI) a live view
    would print nothing until the stream ends, so each change is one plain line instead.
    """
    console = console or Console()
    best: dict[str, float] = {}
    last = None
    live = Live(console=console, refresh_per_second=4, transient=False) if console.is_terminal else None
    printed = ""
    with live or contextlib.nullcontext():
        for message in stream:
            if message.HasField("experiment"):
                last = message.experiment
            metric_of = {s.name: (s.target.metric, s.target.goal) for s in (last.studies if last else [])}
            for point in message.points:
                study = point.trial.split("/trials/")[0]
                metric, goal = metric_of.get(study, ("validation/accuracy", 1))
                if metric in point.values:
                    value = point.values[metric]
                    old = best.get(study)
                    better = old is None or (value > old if goal != 2 else value < old)
                    if better and not math.isnan(value):
                        best[study] = value
            if last is None:
                continue
            if live is not None:
                live.update(render(last, best))
            elif (line := summary_line(last, best)) != printed:
                console.print(line, highlight=False, markup=False, soft_wrap=True)
                printed = line
    return last
