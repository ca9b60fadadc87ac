"""Loading an experiment's stored results into the typed, read-only view of batchlab.report.views.

Reports are built only from what a runner stored, so any experiment (finished or still running)
can be reported again at any time:

    OUT/experiment.json                      name, spec, status, timestamps, command, studies
    OUT/runs/<study_id>/t{T}_r{R}_a{A}.json  one run attempt: {"request": ..., "result": ...}
    OUT/studies/<study_id>.json              a finished study: best trial and its StudyScore

A study without a studies/<id>.json (the experiment is still running) is scored from its run
files with `batchlab.search.scoring.score_study`, so the report shows how far it got; if even
that is impossible (a spec without the protocol settings) it is shown as in progress.

No JAX and no protobuf here: the controller service reports with numpy, matplotlib and json.

Example:
  >>> experiment = load_results("results/minimal")  # doctest: +SKIP
  >>> [s.id for s in experiment.studies]  # doctest: +SKIP
  ['mnist1d_resnet1d.nesterov.b128.s200', ...]
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from batchlab.report.reader import (
    Reader,
    ResultsFileError,
    freeze,
    spec_get,
    stored_number,
    stored_steps,
    thaw,
)
from batchlab.report.views import (
    Experiment,
    Run,
    StudyGroup,
    StudyInfo,
    StudyResult,
    train_metric_name,
)
from batchlab.search.protocol import RUN_FILE_PATTERN, ProtocolError, holds_runs
from batchlab.search.scoring import (
    Effort,
    MetricSummary,
    SeedSummary,
    StudyScore,
    TuningTrial,
    score_study,
)
from batchlab.search.space import SpecError
from batchlab.search.study import Study
from batchlab.targets import Goal, Outcome, Target, TargetReading

__all__ = [
    "Experiment",
    "ResultsFileError",
    "Run",
    "StudyGroup",
    "StudyInfo",
    "StudyResult",
    "load_results",
    "protocol_studies",
    "spec_get",
    "score_from_dict",
    "train_metric_name",
]

log = logging.getLogger(__name__)

_RUN_FILE = re.compile(r"^t(\d+)_r(\d+)_a(\d+)\.json$")


def score_from_dict(data: Mapping[str, Any]) -> StudyScore:
    """Rebuild a StudyScore from its to_dict() form ("inf" strings, nulls for no data).

    Args:
      data: StudyScore.to_dict() output.

    Raises:
      KeyError, TypeError: a field is missing or has the wrong type.
    """
    def opt(value: Any) -> float | None:
        return None if value is None else stored_number(value)

    seeds = dict(data["seeds"])
    metric = dict(seeds.pop("metric"))
    for key in ("median", "q25", "q75", "min", "max"):
        metric[key] = opt(metric.get(key))
    summary = MetricSummary(**metric)
    for key in ("fraction_reaching_target", "median_steps_to_target"):
        seeds[key] = opt(seeds.get(key))
    seeds["values"] = tuple(stored_number(v) for v in seeds.get("values", ()))
    seeds["reached"] = tuple(bool(v) for v in seeds.get("reached", ()))
    seeds["steps"] = tuple(stored_steps(v) for v in seeds.get("steps", ()))
    seeds["diverged_mask"] = tuple(bool(v) for v in seeds.get("diverged_mask", ()))
    tuning = tuple(
        TuningTrial(trial_index=int(t["trial_index"]), value=stored_number(t["value"]),
                    diverged=bool(t["diverged"]), steps_to_target=stored_steps(t["steps_to_target"]),
                    counted=bool(t["counted"]))
        for t in data.get("tuning", ()))
    return StudyScore(
        study_id=str(data["study_id"]),
        workload=str(data["workload"]),
        optimizer=str(data["optimizer"]),
        batch_size=int(data["batch_size"]),
        step_budget=int(data["step_budget"]),
        target=dict(data["target"]),
        phase=str(data["phase"]),
        done=bool(data["done"]),
        best_trial=None if data.get("best_trial") is None else int(data["best_trial"]),
        best_hyperparameters=(None if data.get("best_hyperparameters") is None
                              else dict(data["best_hyperparameters"])),
        seeds=SeedSummary(**seeds, metric=summary),
        effort=Effort(**dict(data["effort"])),
        reason=str(data.get("reason", "")),
        group_id=str(data.get("group_id") or data["study_id"]),
        replicate=int(data.get("replicate") or 0),
        tuning=tuning,
    )


def _target(reader: Reader, data: Any, field: str) -> Target:
    metric = reader.get(data, f"{field}.metric", str)
    value = reader.number(data, f"{field}.value")
    if not math.isfinite(value):
        raise reader.error(f"{field}.value", f"must be finite, got {value!r}")
    goal_raw = reader.get(data, f"{field}.goal", (str, int))
    try:
        goal = Goal[goal_raw.upper()] if isinstance(goal_raw, str) else Goal(goal_raw)
    except (KeyError, ValueError):
        raise reader.error(f"{field}.goal", f"must be one of {[g.name for g in Goal]}, "
                                            f"got {goal_raw!r}") from None
    reading_raw = reader.get(data, f"{field}.reading", str, optional=True,
                             default=TargetReading.FIRST_EVALUATION.name)
    try:
        reading = TargetReading[reading_raw]
    except KeyError:
        raise reader.error(f"{field}.reading", f"must be one of "
                           f"{[r.name for r in TargetReading]}, got {reading_raw!r}") from None
    margins = {}
    for key in ("equivalence_margin", "fraction_margin"):
        number = reader.number(data, f"{field}.{key}", optional=True)
        margins[key] = None if math.isnan(number) else number
    return Target(metric=metric, value=value, goal=goal, reading=reading, **margins)


def _study_info(reader: Reader, data: Any, field: str) -> StudyInfo:
    if not isinstance(data, Mapping):
        raise reader.error(field, f"must be a mapping, got {data!r}")
    return StudyInfo(
        id=reader.get(data, f"{field}.id", str),
        workload=reader.get(data, f"{field}.workload", str),
        optimizer=reader.get(data, f"{field}.optimizer", str),
        optimizer_config=freeze(reader.get(data, f"{field}.optimizer_config", Mapping)),
        batch_size=reader.get(data, f"{field}.batch_size", int),
        step_budget=reader.get(data, f"{field}.step_budget", int),
        eval_every_steps=reader.get(data, f"{field}.eval_every_steps", int, optional=True,
                                    default=0),
        target=_target(reader, reader.get(data, f"{field}.target", Mapping),
                       f"{field}.target"),
        group_id=reader.get(data, f"{field}.group_id", str, optional=True, default="")
        or reader.get(data, f"{field}.id", str),
        replicate=reader.get(data, f"{field}.replicate", int, optional=True, default=0),
        eval_every_examples=reader.get(data, f"{field}.eval_every_examples", int,
                                       optional=True, default=0),
    )


def _read_run(reader: Reader, study_id: str) -> Run:
    data = reader.load()
    request = reader.get(data, "request", Mapping)
    result = reader.get(data, "result", Mapping, optional=True)
    stored_study = reader.get(request, "request.study_id", str)
    if stored_study != study_id:
        raise reader.error("request.study_id", f"is {stored_study!r} but the file is in the "
                                               f"folder of study {study_id!r}")
    kind = reader.get(request, "request.kind", str)
    if kind not in ("tuning", "rerun"):
        raise reader.error("request.kind", f"must be 'tuning' or 'rerun', got {kind!r}")
    outcome: Outcome | None = None
    curve: list[Mapping[str, float]] = []
    final: Mapping[str, float] = {}
    steps_to_target = math.inf
    steps_completed = 0
    diverged_step = error = None
    wall = throughput = math.nan
    if result is not None:
        raw = reader.get(result, "result.outcome", str)
        try:
            outcome = Outcome[raw.upper()]
        except KeyError:
            raise reader.error("result.outcome", f"must be one of "
                               f"{[o.name for o in Outcome]}, got {raw!r}") from None
        steps_completed = reader.get(result, "result.steps_completed", int, optional=True,
                                     default=0)
        for i, point in enumerate(reader.get(result, "result.curve", list, optional=True,
                                             default=[])):
            curve.append(_metrics(reader, point, f"result.curve[{i}]"))
        final = _metrics(reader, reader.get(result, "result.final_metrics", Mapping,
                                            optional=True, default={}), "result.final_metrics")
        try:
            steps_to_target = stored_steps(result.get("steps_to_target"))
        except TypeError as err:
            raise reader.error("result.steps_to_target", str(err)) from None
        diverged_step = reader.get(result, "result.diverged_step", int, optional=True)
        error = reader.get(result, "result.error", str, optional=True)
        wall = reader.number(result, "result.wall_time_s", optional=True)
        throughput = reader.number(result, "result.examples_per_second", optional=True)
    return Run(
        path=reader.path,
        study_id=study_id,
        kind=kind,
        trial_index=reader.get(request, "request.trial_index", int),
        replica=reader.get(request, "request.replica", int),
        seed=reader.get(request, "request.seed", int),
        attempt=reader.get(request, "request.attempt", int, optional=True, default=1),
        hyperparameters=freeze(reader.get(request, "request.hyperparameters", Mapping,
                                           optional=True, default={})),
        outcome=outcome,
        steps_completed=steps_completed,
        curve=tuple(curve),
        steps_to_target=steps_to_target,
        diverged_step=diverged_step,
        error=error,
        final_metrics=MappingProxyType(final),
        wall_time_s=wall,
        examples_per_second=throughput,
        failure=(reader.get(result, "result.failure", str, optional=True)
                 if result is not None else None),
        counted=(reader.get(result, "result.counted", bool, optional=True, default=True)
                 if result is not None else True),
        written_by=_written_by(reader, data),
    )


def _written_by(reader: Reader, data: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The code recorded by the session that wrote a run file, or None if not recorded."""
    written = reader.get(data, "written_by", Mapping, optional=True)
    if written is None:
        return None
    code: Mapping[str, Any] = freeze(reader.get(written, "written_by.code", Mapping))
    return code


def _metrics(reader: Reader, data: Any, field: str) -> Mapping[str, float]:
    if not isinstance(data, Mapping):
        raise reader.error(field, f"must be a mapping of metric -> number, got {data!r}")
    out: dict[str, float] = {}
    for key, value in data.items():
        try:
            out[str(key)] = stored_number(value)
        except TypeError as error:
            raise reader.error(f"{field}.{key}", str(error)) from None
    return MappingProxyType(out)


def _run_order(path: Path) -> tuple[int, int, int, str]:
    match = _RUN_FILE.match(path.name)
    if match is None:
        return (1 << 62, 0, 0, path.name)
    trial, replica, attempt = (int(g) for g in match.groups())
    return (trial, replica, attempt, path.name)


def protocol_studies(spec: Mapping[str, Any]) -> dict[str, Study]:
    """The protocol's studies of a stored spec, by id (batchlab.search.expand_studies).

    The one place studies are rebuilt from a stored spec, so the seeds, Halton sequences and
    trial hyperparameters of stored runs are recognised exactly as the runner made them.

    Args:
      spec: the ExperimentSpec JSON mapping stored in experiment.json.

    Returns:
      Study by id; empty when the stored spec is not a valid spec (its studies are then shown
      as in progress, unscored).
    """
    from batchlab.search.spec import expand_studies  # protobuf, no JAX

    try:
        return {study.id: study for study in expand_studies(thaw(spec))}
    except SpecError as error:
        log.warning("the stored spec is not a valid spec (%s); studies are not rescored",
                    str(error).splitlines()[0])
        return {}


def _provisional_score(study: Study | None, info: StudyInfo,
                       runs: Sequence[Run]) -> tuple[StudyScore | None, str]:
    if study is None:
        return None, "in progress (not scored: the stored spec does not describe this study)"
    try:
        records = [r.to_record() for r in runs if r.outcome is not None]
        score = score_study(study, records)
    except (ProtocolError, ValueError) as error:
        log.warning("study %s: cannot score from its run files (%s); shown as in progress",
                    info.id, error)
        return None, f"in progress (not scored: {error})"
    if score.done:
        return score, ("complete but no studies/<id>.json yet; scored from its run files "
                       f"({score.reason})")
    return score, f"in progress, scored from its run files so far ({score.reason})"


def load_results(results_dir: str | Path) -> Experiment:
    """Read an experiment's stored results into a read-only Experiment.

    Args:
      results_dir: the folder holding experiment.json, runs/ and studies/.

    Raises:
      FileNotFoundError: results_dir or its experiment.json is missing.
      ValueError: a file is not valid JSON or a field is missing or malformed; the message
        starts with the file's path and names the field (e.g. "studies[1].batch_size").
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such results folder")
    reader = Reader(root / "experiment.json", root)
    data = reader.load()
    name = reader.get(data, "name", str)
    spec = freeze(reader.get(data, "spec", Mapping, optional=True, default={}))
    status = reader.get(data, "status", str, optional=True, default="UNKNOWN")
    entries = reader.get(data, "studies", list)
    infos = [_study_info(reader, entry, f"studies[{i}]") for i, entry in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, info in enumerate(infos):
        if info.id in seen:
            raise reader.error(f"studies[{i}].id", f"{info.id!r} is also studies[{seen[info.id]}]")
        seen[info.id] = i
    known = set(seen)
    runs_root = root / "runs"
    ignored = []
    if runs_root.is_dir():
        for folder in sorted(p for p in runs_root.iterdir() if p.is_dir()):
            if folder.name not in known and holds_runs(folder):
                log.warning("%s: not a study of experiment.json; ignored", folder)
                ignored.append(folder.name)

    studies: list[StudyResult] = []
    rebuilt = protocol_studies(spec) if spec else {}
    for info in infos:
        folder = runs_root / info.id
        files = sorted(folder.glob(RUN_FILE_PATTERN), key=_run_order) if folder.is_dir() else []
        runs = tuple(_read_run(Reader(path, root), info.id) for path in files)
        study_path = root / "studies" / f"{info.id}.json"
        score: StudyScore | None
        if study_path.exists():
            score = _stored_score(Reader(study_path, root), info)
            studies.append(StudyResult(info, runs, score, stored=True))
        else:
            score, note = _provisional_score(rebuilt.get(info.id), info, runs)
            studies.append(StudyResult(info, runs, score, stored=False, note=note))
    log.info("loaded %s: %d studies, %d run files", root, len(studies),
             sum(len(s.runs) for s in studies))
    return Experiment(
        path=root,
        name=name,
        spec=spec,
        status=status,
        started_at=reader.get(data, "started_at", str, optional=True),
        finished_at=reader.get(data, "finished_at", str, optional=True),
        command=reader.get(data, "command", str, optional=True, default=""),
        studies=tuple(studies),
        protocol=MappingProxyType(rebuilt),
        code=freeze(reader.get(data, "code", Mapping, optional=True, default={})),
        sessions=freeze(reader.get(data, "sessions", list, optional=True, default=[])),
        ignored=tuple(ignored),
    )


def _stored_score(reader: Reader, info: StudyInfo) -> StudyScore:
    data = reader.load()
    stored = _study_info(reader, reader.get(data, "study", Mapping), "study")
    if stored.id != info.id:
        raise reader.error("study.id", f"is {stored.id!r}, expected {info.id!r}")
    raw = reader.get(data, "score", Mapping)
    try:
        score = score_from_dict(raw)
    except KeyError as error:
        raise reader.error(f"score.{error.args[0]}", "missing") from None
    except (TypeError, ValueError) as error:
        raise reader.error("score", f"malformed ({error})") from None
    best = reader.get(data, "best_trial", int, optional=True)
    if best is not None and best != score.best_trial:
        raise reader.error("best_trial", f"is {best} but score.best_trial is "
                                         f"{score.best_trial}")
    return score
