"""From the controller's storage to the results layout that batchlab.report reads.

The local runner writes an experiment's results as files (batchlab.runner.store):

    OUT/experiment.json                      the spec, its studies, status and timestamps
    OUT/runs/<study_id>/t{T}_r{R}_a{A}.json  one file per run attempt: request + result
    OUT/studies/<study_id>.json              the study's best trial and score, once finished

`write_results` writes the same layout from stored experiments, attempts and study scores,
so `batchlab.report.write_report` builds the controller's report (GetReport) exactly as it
builds the local runner's. Also the translation of stored data to protocol records.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from batchlab.runner.local import study_summary
from batchlab.runner.store import ResultStore
from batchlab.search import RunKind, RunRecord, RunRequest, Study
from services.controller.storage import (
    AttemptRecord,
    AttemptState,
    ExperimentRecord,
    StudyRecord,
)

__all__ = ["attempt_result", "run_record", "run_request", "write_results"]

def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


def run_request(attempt: AttemptRecord, study: Study) -> RunRequest:
    """The protocol's RunRequest of a stored attempt."""
    return RunRequest(
        study_id=study.id,
        kind=RunKind(attempt.kind),
        trial_index=attempt.trial.trial_index,
        replica=attempt.trial.replica,
        seed=attempt.seed,
        attempt=attempt.attempt,
        hyperparameters=dict(attempt.hyperparameters),
        batch_size=study.batch_size,
        step_budget=study.step_budget,
        eval_every_steps=study.eval_every_steps,
    )


def attempt_result(attempt: AttemptRecord) -> dict[str, Any]:
    """The RunResult dict of a completed attempt (a minimal one when none came back).

    A failed attempt says why ("failure": RUN, INFRASTRUCTURE, CONTROLLER or UNSCHEDULABLE)
    and whether it counts toward max_attempts ("counted"), so reports tell runs that failed
    by themselves from attempts lost to the infrastructure.
    """
    why = {"failure": attempt.failure or None, "counted": attempt.counted}
    if attempt.result is not None:
        result = dict(attempt.result)
        # The attempt's outcome is the truth (e.g. a result that arrived after a cancel).
        result["outcome"] = attempt.outcome or result.get("outcome")
        if attempt.error and not result.get("error"):
            result["error"] = attempt.error
        return result | why
    return {"outcome": attempt.outcome or "FAILED", "steps_completed": attempt.step,
            "curve": [], "final_metrics": {}, "steps_to_target": None,
            "error": attempt.error or None} | why


def run_record(attempt: AttemptRecord) -> RunRecord | None:
    """The protocol record of a completed attempt (None while it is queued or active)."""
    if attempt.state is not AttemptState.COMPLETED or attempt.outcome is None:
        return None
    return RunRecord.from_result(attempt.trial.trial_index, attempt.seed,
                                 attempt_result(attempt) | {"outcome": attempt.outcome})


def write_results(out_dir: str | Path, experiment: ExperimentRecord, studies: Sequence[Study],
                  attempts: Iterable[AttemptRecord],
                  study_records: Mapping[str, StudyRecord]) -> Path:
    """Write an experiment's results layout (experiment.json, runs/, studies/).

    Args:
      out_dir: the folder to write (created).
      experiment: the stored experiment.
      studies: its studies (batchlab.search.expand_studies of its spec).
      attempts: its stored attempts; queued and active ones are left out.
      study_records: stored study scores by id; only finished studies get studies/<id>.json.

    Returns:
      out_dir.
    """
    out = Path(out_dir)
    store = ResultStore(out)
    by_id = {s.id: s for s in studies}
    store.write_experiment({
        "name": experiment.spec.get("name", experiment.id),
        "spec": dict(experiment.spec),
        "studies": [study_summary(s) for s in studies],
        "status": str(experiment.state),
        "started_at": _iso(experiment.start_time or experiment.create_time),
        "finished_at": _iso(experiment.end_time),
        "command": f"batchlab controller ({experiment.name})",
    })
    for attempt in attempts:
        study = by_id.get(attempt.trial.study_id)
        if study is None or attempt.state is not AttemptState.COMPLETED:
            continue
        store.write_run(run_request(attempt, study), attempt_result(attempt))
    for study_id, record in study_records.items():
        study = by_id.get(study_id)
        if study is None or record.phase != "done":
            continue
        store.write_study(study_id, {
            "study": study_summary(study),
            "best_trial": record.best_trial,
            "best_hyperparameters": record.score.get("best_hyperparameters"),
            "score": dict(record.score),
        })
    return out
