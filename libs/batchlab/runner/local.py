"""Run an experiment spec in this process: every study's tuning trials, then seed reruns.

The study protocol (:mod:`batchlab.search.protocol`) decides what runs next from the
stored records alone, so stopping and rerunning the same command resumes where it
stopped: finished runs are read back, not repeated.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from batchlab.runner.store import ResultStore
from batchlab.search import expand_studies, load_spec, next_runs, score_study, spec_to_dict
from batchlab.search.protocol import RunRequest
from batchlab.search.study import Study

__all__ = ["run_experiment", "study_summary"]

log = logging.getLogger(__name__)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def study_summary(study: Study) -> dict[str, Any]:
    """The study's description as stored in experiment.json and studies/<id>.json."""
    return {
        "id": study.id,
        "workload": study.workload,
        "optimizer": study.optimizer,
        "optimizer_config": dict(study.optimizer_config),
        "batch_size": study.batch_size,
        "step_budget": study.step_budget,
        "eval_every_steps": study.eval_every_steps,
        "target": {
            "metric": study.target.metric,
            "value": study.target.value,
            "goal": study.target.goal.name,
        },
    }


def _train(request: RunRequest, study: Study, data_dir: str | None) -> dict[str, Any]:
    from batchlab.train import RunConfig, train_and_evaluate

    config = RunConfig.for_trial(
        study.workload,
        request.hyperparameters,
        batch_size=request.batch_size,
        step_budget=request.step_budget,
        eval_every_steps=request.eval_every_steps,
        seed=request.seed,
        target=study.target,
        data_dir=data_dir,
    )
    return train_and_evaluate(config).to_dict()


def run_experiment(
    spec: Any,
    out_dir: str | Path,
    *,
    data_dir: str | None = None,
    progress: bool = True,
    train_fn: Callable[[RunRequest, Study, str | None], dict[str, Any]] | None = None,
    write_report: bool = True,
) -> Path:
    """Run every study of ``spec`` and store results (and the report) under ``out_dir``.

    Args:
      spec: a spec file path, its parsed mapping, or an ExperimentSpec message.
      out_dir: the results folder; an existing one for the same spec is resumed.
      data_dir: tfds data folder (default: batchlab.data.default_data_dir()).
      progress: show a progress bar on the terminal.
      train_fn: runs one request and returns a RunResult dict (default: the training loop);
        tests pass a fake.
      write_report: build the report when every study is done.

    Returns:
      ``out_dir``.

    Raises:
      batchlab.search.SpecError: for an invalid spec (naming the field path).
      ValueError: when ``out_dir`` holds the results of a different spec.
    """
    from batchlab.train.compilation_cache import enable_compilation_cache
    from batchlab.train.workloads import workload_names

    if train_fn is None:
        enable_compilation_cache()
    spec = load_spec(spec, known_workloads=set(workload_names()))
    store = ResultStore(out_dir)
    studies = expand_studies(spec)
    spec_dict = spec_to_dict(spec)
    previous = store.read_experiment()
    if previous is not None and previous.get("spec") != spec_dict:
        raise ValueError(
            f"out_dir: {out_dir} holds results of a different spec ({previous.get('name')!r}); "
            "use a new folder"
        )
    experiment = {
        "name": spec.name,
        "spec": spec_dict,
        "studies": [study_summary(s) for s in studies],
        "status": "RUNNING",
        "started_at": (previous or {}).get("started_at") or _now(),
        "finished_at": None,
        "command": " ".join(sys.argv),
    }
    store.write_experiment(experiment)
    train = train_fn or _train
    planned = sum(s.trials_per_study + s.seeds_per_best for s in studies)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(f"{spec.name}", total=planned)
        for study in studies:
            while True:
                records = store.records(study.id)
                decision = next_runs(study, records, parallelism=1)
                bar.update(task, completed=_finished_runs(store, studies), total=max(planned, _finished_runs(store, studies)))
                if decision.done:
                    score = score_study(study, records)
                    best = decision.best_trial
                    store.write_study(
                        study.id,
                        {
                            "study": study_summary(study),
                            "best_trial": best,
                            "best_hyperparameters": None if best is None else study.hyperparameters(best),
                            "score": score.to_dict(),
                        },
                    )
                    break
                for request in decision.launch:
                    bar.update(task, description=f"{study.id} {request.kind} t{request.trial_index} r{request.replica}")
                    result = train(request, study, data_dir)
                    store.write_run(request, result)
                    log.info("%s: %s", request.name, result["outcome"])
    experiment["status"] = "SUCCEEDED"
    experiment["finished_at"] = _now()
    store.write_experiment(experiment)
    if write_report:
        from batchlab.report import write_report as build_report

        build_report(out_dir)
    return Path(out_dir)


def _finished_runs(store: ResultStore, studies: list[Study]) -> int:
    return sum(len(store.records(s.id)) for s in studies)
