"""report.md: the sections of an experiment's report (spec, provenance, spec check, verdicts,
tables, figures) built from its stored results, and the function that writes it."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batchlab.files import atomic_write
from batchlab.report import figures
from batchlab.report.reader import thaw
from batchlab.report.results import Experiment, load_results, spec_get
from batchlab.report.tables import (
    DASH,
    best_hyperparameters_table,
    comparison_table,
    display_optimizer,
    effort_table,
    markdown_table,
    scaling_table,
)
from batchlab.report.verdicts import decide_point, rule_paragraph, study_flags, verdict_section
from batchlab.report.views import Run
from batchlab.search.diagnostics import spec_diagnostics
from batchlab.search.protocol import request_differences
from batchlab.search.space import SearchParameter, SpecError

__all__ = ["FIGURES", "REPORT_NAME", "build_markdown", "write_report"]

log = logging.getLogger(__name__)

REPORT_NAME = "report.md"
FIGURES = "figures"


def _parameter_text(parameter: SearchParameter) -> str:
    if parameter.scale.value in ("linear", "log"):
        text = f"`{parameter.path}` {parameter.scale.value} [{parameter.low:g}, {parameter.high:g}]"
    elif parameter.scale.value == "discrete":
        text = f"`{parameter.path}` one of {list(parameter.values)}"
    else:
        text = f"`{parameter.path}` fixed {parameter.value!r}"
    if parameter.one_minus:
        text += " (as 1 − value)"
    if parameter.integer:
        text += " (integer)"
    if parameter.tied_paths:
        text += " (also " + ", ".join(f"`{p}`" for p in parameter.tied_paths) + ")"
    return text


def _spec_section(experiment: Experiment) -> list[str]:
    spec = experiment.spec
    lines = ["## Spec", ""]
    if not spec:
        return lines + ["experiment.json stores no spec.", ""]
    selection = spec_get(spec, "selection", DASH)
    lines += [
        f"- Search seed {spec_get(spec, 'search_seed', 0)}; each study draws "
        + ("the same Halton points as the other studies of its search replicate"
           if spec_get(spec, "share_search_points", False) else "its own Halton sequence")
        + f"; {spec_get(spec, 'search_replicates', 0) or 1} independent search replicate(s) "
        f"per study; tuning stops at "
        f"{spec_get(spec, 'trials_per_study', DASH)} feasible trials per study "
        f"(at most {spec_get(spec, 'max_total_trials', DASH)} trials, diverged ones included); "
        f"the best trial by {selection} is rerun with {spec_get(spec, 'seeds_per_best', 0)} "
        f"fresh seeds; infrastructure failures are retried up to "
        f"{spec_get(spec, 'max_attempts', 0) or 3} attempts.",
        "",
    ]
    rows = []
    for workload in spec_get(spec, "workloads", ()):
        target = spec_get(workload, "target", {})
        goal = ">=" if str(spec_get(target, "goal", "MAXIMIZE")) in ("MAXIMIZE", "1") else "<="
        points = ", ".join(
            f"{spec_get(p, 'batch_size', 0):,} × {spec_get(p, 'step_budget', 0):,} steps"
            + _point_cadence(p) for p in spec_get(workload, "points", ()))
        hyper = spec_get(workload, "hyperparameters", {}) or {}
        every = spec_get(workload, "eval_every_steps", 0)
        every_examples = spec_get(workload, "eval_every_examples", 0)
        rows.append([
            f"`{spec_get(workload, 'workload', '?')}`",
            f"{spec_get(target, 'metric', '?')} {goal} {spec_get(target, 'value', '?')}",
            (f"{every} steps" if every else f"{every_examples:,} examples" if every_examples
             else "per point"),
            points,
            ", ".join(f"{k}={v}" for k, v in sorted(hyper.items())) or DASH,
        ])
    lines += [markdown_table(["workload", "target", "eval every", "batch size × step budget",
                              "workload hyperparameters"], rows, ["l"] * 5)]
    rows = []
    for optimizer in spec_get(spec, "optimizers", ()):
        config = spec_get(optimizer, "config", {}) or {}
        space = experiment.search_space(str(spec_get(optimizer, "name", "")))
        searched = ("unreadable" if space is None
                    else "; ".join(_parameter_text(p) for p in space.parameters) or DASH)
        rows.append([f"`{spec_get(optimizer, 'name', '?')}`", display_optimizer(config, "weights"),
                     display_optimizer(config, "bias_bn"), searched])
    lines += [markdown_table(["optimizer", "weights optimizer", "bias/BN optimizer",
                              "search space"], rows, ["l"] * 4)]
    return lines


def _point_cadence(point: Any) -> str:
    """A point's own evaluation period, where it overrides the workload's."""
    steps = spec_get(point, "eval_every_steps", 0)
    examples = spec_get(point, "eval_every_examples", 0)
    if steps:
        return f" (eval every {steps} steps)"
    return f" (eval every {examples:,} examples)" if examples else ""


def _provenance(experiment: Experiment) -> list[str]:
    stored = sum(1 for s in experiment.studies if s.stored)
    provisional = [s for s in experiment.studies if not s.stored]
    lines = [
        "## How this report was produced", "",
        f"- Built by `batchlab.report.write_report` from the stored results only: "
        f"`experiment.json`, {experiment.run_count()} run files under `runs/` and {stored} "
        f"study scores under `studies/` (of {len(experiment.studies)} studies). Rebuild it "
        "with `batchlab report RESULTS_DIR`; the same stored results give the same report.",
        f"- Results produced by: `{experiment.command or DASH}`.",
        "- Each study tunes by quasi-random search, picks its best trial and reruns it with "
        "fresh seeds; a row is the median over those seeds (linear-interpolation quartiles in "
        "brackets). A diverged seed counts at the worst possible value of the metric (0 for an "
        "accuracy, +inf for a loss) and as not reaching the target. A median steps-to-target "
        "of \"never\" means half the seeds or more never reached the target; every "
        "steps-to-target figure has the resolution of its evaluation period, given in examples "
        "in the spec section.",
    ]
    code = experiment.code
    versions = {_code_text(session.get("code") or {}) for session in experiment.sessions}
    unrecorded = experiment.sessions[0].get("runs_before", 0) if experiment.sessions else 0
    runs = [run for study in experiment.studies for run in study.runs]
    foreign = _foreign_runs(experiment)
    if foreign:
        lines.append(f"- **{len(foreign)} run files are not the runs this spec asks for** (the "
                     "runner refuses such a folder; its numbers below include them): "
                     + "; ".join(foreign[:5]) + ("; ..." if len(foreign) > 5 else "") + ".")
    if experiment.ignored:
        names = ", ".join(f"`runs/{name}`" for name in experiment.ignored)
        lines.append(f"- **Not read: {len(experiment.ignored)} folder(s) of run files that are not "
                     f"studies of this experiment** ({names}); nothing below includes them.")
    if any(run.written_by is not None for run in runs):
        lines.append(_written_by_text(runs))
    elif unrecorded:
        # Run files placed in the folder before the runner first ran on it (copied from another
        # experiment whose studies are the same, say): this folder does not say which code made them.
        lines.append(f"- The first {unrecorded} run files were in the folder before the runner's first "
                     "recorded session here: which code produced them is not recorded in this folder. "
                     + _sessions_text(experiment.sessions, "From") + ".")
    elif len(versions) > 1:
        lines.append("- Results produced by more than one version of the code (the runner was "
                     "started again on this folder): " + _sessions_text(experiment.sessions, "from") + ".")
    elif code:
        lines.append(f"- Results produced by the code at {_code_text(code)}.")
    if provisional:
        lines.append(f"- {len(provisional)} studies have no stored score yet; their rows are "
                     "provisional, scored from their run files so far.")
    return lines + [""]


def _foreign_runs(experiment: Experiment) -> list[str]:
    """Run files whose request differs from what the stored spec's study makes for its trial
    and replica (batchlab.search.request_differences), or whose name is another run's."""
    found = []
    for study in experiment.studies:
        protocol = experiment.protocol.get(study.info.id)
        if protocol is None:
            continue
        for run in study.runs:
            stored = {"trial_index": run.trial_index, "replica": run.replica,
                      "attempt": run.attempt, "seed": run.seed, "kind": run.kind,
                      "hyperparameters": thaw(run.hyperparameters)}
            differing = request_differences(protocol, stored,
                                            fields=("seed", "kind", "hyperparameters"),
                                            file_name=run.path.name)
            if differing:
                found.append(f"`{study.info.id}/{run.path.name}` ({differing[0]})")
    return found


def _written_by_text(runs: Sequence[Run]) -> str:
    """Which code wrote the run files, counted from what each file records."""
    by_code = Counter(_code_text(run.written_by) for run in runs if run.written_by is not None)
    missing = sum(1 for run in runs if run.written_by is None)
    if len(by_code) == 1 and not missing:
        return f"- Results produced by the code at {next(iter(by_code))} (every run file says so)."
    counted = "; ".join(f"{n} by {code}" for code, n in by_code.most_common())
    text = f"- Run files by the code that wrote them, as each file records it: {counted}"
    if missing:
        text += (f"; {missing} record no code (placed in the folder by something other than "
                 "the runner, or written before batchlab recorded it in each file): which "
                 "code produced them is not known")
    return text + "."


def _sessions_text(sessions: Sequence[Mapping[str, Any]], lead: str) -> str:
    """Each runner session on the folder: from which run file on, which code, when it started."""
    return "; ".join(f"{lead} run file {session.get('runs_before', 0) + 1} on, "
                     f"{_code_text(session.get('code') or {})} (started {session.get('started_at', '?')})"
                     for session in sessions)


def _code_text(code: Mapping[str, Any]) -> str:
    return (f"commit `{code.get('commit', '?')}`"
            + (" with uncommitted changes" if code.get("dirty") else "")
            + f" (batchlab {code.get('version', '?')})")


def _spec_check(experiment: Experiment) -> list[str]:
    lines = ["## Spec check", ""]
    if not experiment.spec:
        return lines + ["experiment.json stores no spec.", ""]
    try:
        found = spec_diagnostics(experiment.spec)
    except SpecError as error:
        return lines + [f"The stored spec could not be checked: {error}", ""]
    if not found:
        return lines + ["`batchlab spec check` finds nothing to warn about in this spec.", ""]
    lines += ["`batchlab spec check` warned about this spec before it ran:", ""]
    lines += [f"- {d}" for d in found]
    return lines + [""]


def _figure(out_dir: Path, name: str) -> Path:
    return out_dir / FIGURES / name


def _link(caption: str, name: str) -> str:
    return f"![{caption}]({FIGURES}/{name})"


def _other_flags(experiment: Experiment, point: tuple[str, int, int]) -> list[str]:
    """Flags on studies of a point that no comparison rests on (those are under the verdicts)."""
    compared = {g.label for pair in decide_point(experiment, *point) for g in (pair.a, pair.b)}
    flags = [flag for group in experiment.groups_at_point(*point)
             if group.label not in compared for flag in study_flags(experiment, group)]
    if not flags:
        return []
    return ["Flags on the other studies of this point:", ""] + [f"- {f}" for f in flags] + [""]


def build_markdown(experiment: Experiment, out_dir: Path) -> str:
    """Write the figures of an experiment under out_dir/figures and return the report text.

    Args:
      experiment: the loaded results.
      out_dir: the report folder (figures go in its figures/ subfolder).

    Returns:
      The markdown of report.md.
    """
    spec_description = spec_get(experiment.spec, "description", "") if experiment.spec else ""
    lines = [f"# Optimizer comparison: `{experiment.name}`", ""]
    if spec_description:
        lines += [spec_description, ""]
    lines += [
        f"Status **{experiment.status}**; started {experiment.started_at or DASH}, finished "
        f"{experiment.finished_at or DASH} (as stored in experiment.json).", "",
    ]
    lines += _provenance(experiment)
    lines += _spec_section(experiment)
    lines += _spec_check(experiment)
    lines += ["## How verdicts are decided", "", rule_paragraph(experiment)]
    lines += ["## Results by workload, batch size and step budget", ""]
    for workload in experiment.workloads():
        for point in [p for p in experiment.points() if p[0] == workload]:
            _, batch_size, step_budget = point
            stem = f"{workload}_b{batch_size}_s{step_budget}"
            lines += [f"### {workload}: batch size {batch_size:,}, {step_budget:,} steps", ""]
            lines += ["**Verdicts**", "", verdict_section(experiment, *point)]
            lines += _other_flags(experiment, point)
            lines += [comparison_table(experiment, *point)]
            names = {
                "seeds": f"seeds_{stem}.png",
                "curves": f"curves_{stem}.png",
                "schedules": f"lr_{stem}.png",
                "effort": f"expected_best_{stem}.png",
            }
            figures.plot_expected_best(experiment, *point, _figure(out_dir, names["effort"]))
            figures.plot_seed_distributions(experiment, *point,
                                            _figure(out_dir, names["seeds"]))
            figures.plot_training_curves(experiment, *point, _figure(out_dir, names["curves"]))
            figures.plot_best_schedules(experiment, *point,
                                        _figure(out_dir, names["schedules"]))
            lines += [
                _link("final metric of each seed against the target", names["seeds"]), "",
                _link("validation and train curves of the best trial's seeds",
                      names["curves"]), "",
                _link("learning rate of each best trial", names["schedules"]), "",
                _link("expected best validation metric after k tuning trials",
                      names["effort"]), "",
            ]
        name = f"steps_to_target_{workload}.png"
        figures.plot_steps_to_target(experiment, workload, _figure(out_dir, name))
        lines += [f"### {workload}: steps to target across batch sizes", "",
                  _link("median steps to target against batch size", name), ""]
        if len({p[1] for p in experiment.points() if p[0] == workload}) > 1:
            lines += [scaling_table(experiment, workload)]
    lines += ["## Tuning effort", "",
              "Budgets are fair when every optimizer at a point has the same number of "
              "feasible trials and reruns; diverged trials come on top of them.", "",
              effort_table(experiment)]
    for workload in experiment.workloads():
        name = f"effort_{workload}.png"
        figures.plot_tuning_effort(experiment, workload, _figure(out_dir, name))
        lines += [_link(f"tuning effort on {workload}", name), ""]
    lines += ["## Best hyperparameters", "",
              "The best trial's value of each tuned search-space path (dotted keys under "
              "`optimizer.` are shown without that prefix).", ""]
    for label in experiment.optimizers():
        table = best_hyperparameters_table(experiment, label)
        if table:
            lines += [f"### `{label}`", "", table]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(results_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.md and its PNG figures from an experiment's stored results.

    Args:
      results_dir: the folder holding experiment.json, runs/ and studies/.
      out_dir: where to write (default results_dir/report); created if missing.

    Returns:
      The path of report.md.

    Raises:
      FileNotFoundError: results_dir or experiment.json is missing.
      ValueError: a stored file is malformed (the message names the file and the field).

    Example:
      >>> write_report("results/minimal")  # doctest: +SKIP
      PosixPath('results/minimal/report/report.md')
    """
    experiment = load_results(results_dir)
    out = Path(out_dir) if out_dir is not None else Path(results_dir) / "report"
    (out / FIGURES).mkdir(parents=True, exist_ok=True)
    text = build_markdown(experiment, out)
    path = out / REPORT_NAME
    atomic_write(path, text)
    log.info("wrote %s (%d studies)", path, len(experiment.studies))
    return path
