"""Run an experiment spec on this machine: every study's tuning trials, then seed reruns.

The study protocol (:mod:`batchlab.search.protocol`) decides what runs next from the
stored records alone, so stopping and rerunning the same command resumes where it
stopped: finished runs are read back, not repeated. Runs train in worker processes
(:mod:`batchlab.runner.workers`), several at once, sized to the machine
(:mod:`batchlab.runner.resources`).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from batchlab.runner.provenance import code_version, machine_kind
from batchlab.runner.resources import ExecutionPlan, available_cpus, plan_execution
from batchlab.runner.store import ResultStore
from batchlab.runner.workers import WorkerPool, cache_root_of, function_reference
from batchlab.search import (
    expand_studies,
    load_spec,
    next_runs,
    request_differences,
    score_study,
    spec_to_dict,
    unfilled_runs,
)
from batchlab.search.protocol import RunRecord, RunRequest, holds_runs
from batchlab.search.study import Study

__all__ = ["prepare_datasets", "run_experiment", "study_summary"]

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
        "eval_every_examples": study.eval_every_examples,
        "group_id": study.group_id,
        "replicate": study.replicate,
        "target": study.target.to_dict(),
    }


def _train(
    request: RunRequest, study: Study, data_dir: str | None, *, store: ResultStore | None = None
) -> dict[str, Any]:
    from batchlab.runner.warm_start import run_states
    from batchlab.train import RunConfig, train_and_evaluate

    # The warm start's source (if the workload names one) and whether this run's final state
    # is kept for later warm starts, both read from the spec stored in `store`.
    states = run_states(store, request, study)
    config = RunConfig.for_trial(
        study.workload,
        request.hyperparameters,
        batch_size=request.batch_size,
        step_budget=request.step_budget,
        eval_every_steps=request.eval_every_steps,
        seed=request.seed,
        target=study.target,
        stop_at_target=study.stop_at_target,
        data_dir=data_dir,
        init_checkpoint=states.init_checkpoint,
    )
    result = train_and_evaluate(config, return_state=states.keep_dir is not None)
    return states.finish(result)


def _train_run(request: RunRequest, study: Study, data_dir: str | None, *, out_dir: str) -> dict[str, Any]:
    """``_train`` in a worker process, which reads (never writes) the results folder's records."""
    return _train(request, study, data_dir, store=ResultStore(out_dir))


def run_experiment(
    spec: Any,
    out_dir: str | Path,
    *,
    data_dir: str | None = None,
    progress: bool = True,
    train_fn: Callable[[RunRequest, Study, str | None], dict[str, Any]] | None = None,
    write_report: bool = True,
    parallel: int | None = None,
    threads_per_run: int | None = None,
    in_process: bool = False,
) -> Path:
    """Run every study of ``spec`` and store results (and the report) under ``out_dir``.

    Runs train in worker processes, up to P at once, each with a fixed number T of XLA:CPU
    threads (:mod:`batchlab.runner.resources` says how P and T are chosen, and why T never
    depends on P: results are the same whether runs go one at a time or several at once).
    Runs of different studies run together; within a study the protocol decides what may start
    (tuning trials concurrently, reruns once tuning is complete). Only this process writes the
    results folder, one run file at a time as results arrive, so stopping at any moment and
    running the same command again resumes exactly: finished runs are read back, unfinished
    ones run again.

    Args:
      spec: a spec file path, its parsed mapping, or an ExperimentSpec message.
      out_dir: the results folder; an existing one for the same spec is resumed.
      data_dir: tfds data folder (default: batchlab.data.default_data_dir()).
      progress: show a progress bar on the terminal.
      train_fn: runs one request and returns a RunResult dict (default: the training loop).
        In worker processes it must be a module-level function (workers import it by name).
      write_report: build the report when every study is done.
      parallel: runs at once (default: sized to the machine and the model; 1: one at a time).
      threads_per_run: XLA:CPU threads of every run (default: from the model size). Changes
        results; a resumed folder keeps the count its runs used.
      in_process: train in this process, one run at a time, with whatever threads this
        process's JAX has (for fakes and debugging; nothing about threads is checked).

    Returns:
      ``out_dir``.

    Raises:
      batchlab.search.SpecError: for an invalid spec (naming the field path).
      ValueError: when ``out_dir`` holds the results of a different spec, or ``parallel`` /
        ``threads_per_run`` / ``train_fn`` are invalid (naming the argument).
    """
    from batchlab.train.workloads import workload_names

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
    _check_stored_requests(store, studies)
    execution = (previous or {}).get("execution")
    if in_process:
        if parallel not in (None, 1):
            raise ValueError(f"parallel: in_process runs one at a time, got {parallel}")
        plan = None
        train_ref = None
    else:
        plan = plan_execution(
            [s.workload for s in studies], parallel=parallel, threads_per_run=threads_per_run,
            stored_threads=_stored_threads(store, studies, execution),
        )
        execution = plan.to_dict()
        train_ref = function_reference(train_fn) if train_fn is not None else None
        log.info("execution: %s", plan.reason)
    experiment = {
        "name": spec.name,
        "spec": spec_dict,
        "studies": [study_summary(s) for s in studies],
        "status": "RUNNING",
        "started_at": (previous or {}).get("started_at") or _now(),
        "finished_at": None,
        "command": " ".join(sys.argv),
        "code": code_version(),
        "execution": execution,
        # Every start of this folder's runner, with its code and the run files already there:
        # a study resumed by other code says so (the report lists the sessions).
        "sessions": [*(previous or {}).get("sessions", []),
                     {"started_at": _now(), "code": code_version(), "machine_kind": machine_kind(),
                      "runs_before": store.count_runs()}],
    }
    # Each run file names the session (and code) that wrote it: files placed in the folder by
    # anything else record none, whenever they came.
    session = {k: experiment["sessions"][-1][k] for k in ("started_at", "code")}
    store.write_experiment(experiment)
    if train_fn is None:
        prepare_datasets((s.workload for s in studies), data_dir)
    if plan is None:
        if train_fn is None:
            from batchlab.train.compilation_cache import enable_compilation_cache

            enable_compilation_cache()
        runner: _InProcess | WorkerPool = _InProcess(
            train_fn or functools.partial(_train, store=store), studies, data_dir)
        width, threads_label = 1, "in process"
    else:
        runner = WorkerPool(
            plan.parallel, spec_dict, train_ref or f"{__name__}:_train_run",
            train_kwargs={} if train_ref else {"out_dir": str(Path(out_dir).resolve())},
            data_dir=data_dir, cache_root=_configured_cache_root(),
        )
        width = plan.parallel
        counts = "/".join(str(t) for t in sorted(set(plan.threads_per_run.values())))
        threads_label = f"{width} at once, {counts} XLA thread(s) per run"
    with runner, _progress(progress) as bar:
        task = bar.add_task(f"{spec.name} ({threads_label})", total=None)
        unfilled = _drive(studies, store, runner, plan, width, bar, task, session)
    # The services' rule (services/controller/scheduler.py): abandoned runs that leave a
    # study short of its budget fail the experiment; its results and report stay.
    experiment["status"] = "FAILED" if unfilled else "SUCCEEDED"
    if unfilled:
        experiment["error"] = ("runs were abandoned and the studies' budgets are not equal: "
                               f"missing {'; '.join(unfilled)}")
        log.error("%s FAILED: %s", spec.name, experiment["error"])
    experiment["finished_at"] = _now()
    store.write_experiment(experiment)
    if write_report:
        from batchlab.report import write_report as build_report

        build_report(out_dir)
    return Path(out_dir)


def _drive(studies: list[Study], store: ResultStore, runner: _InProcess | WorkerPool,
           plan: ExecutionPlan | None, width: int, bar: Progress, task: Any,
           session: dict[str, Any]) -> list[str]:
    """Launch what the protocol allows, up to ``width`` runs in flight, until every study is done.

    Returns the runs the studies budgeted but lack because runs were abandoned
    (batchlab.search.unfilled_runs; empty when none).

    Free slots go first to one run of each study that can launch one, in spec order, then
    to further runs in spec order (e.g. while a study waits for its last tuning trial before
    its reruns may start, the next study's runs fill its slots). Spreading the first runs over
    studies keeps workers from compiling the same programs at once: runs of one study share
    their programs through the compilation cache, so a second worker starting the same study
    at the same time compiles them a second time instead of loading them.
    """
    records = {s.id: store.records(s.id) for s in studies}
    flying: dict[str, list[RunRequest]] = {s.id: [] for s in studies}
    finished: set[str] = set()
    unfilled: list[str] = []
    planned = sum(s.trials_per_study + s.seeds_per_best for s in studies)
    while True:
        free = width - sum(len(v) for v in flying.values())
        launchable: list[tuple[Study, list[RunRequest]]] = []
        for study in studies:
            if study.id in finished:
                continue
            # Asked even with no free slot: whether the study is done does not wait for one.
            decision = next_runs(study, records[study.id], in_flight=flying[study.id],
                                 parallelism=len(flying[study.id]) + max(free, 1))
            if decision.done:
                _write_study(store, study, records[study.id], decision.best_trial)
                finished.add(study.id)
                unfilled += unfilled_runs(study, decision.state)
            else:
                launchable.append((study, list(decision.launch)))
        for spread in (True, False):  # one run of each study first, then the rest
            for study, launch in launchable:
                take = max(min(free, 1) if spread else free, 0)
                for request in launch[:take]:
                    runner.submit(request, threads=plan.threads_for(study.workload) if plan else 0)
                    flying[study.id].append(request)
                    free -= 1
                del launch[:take]
        done = sum(len(r) for r in records.values())
        running = sum(len(v) for v in flying.values())
        bar.update(task, completed=done, total=max(planned, done + running))
        if len(finished) == len(studies):
            return unfilled
        if running == 0:
            raise RuntimeError("the protocol launched nothing while studies are unfinished: "
                               f"{sorted(set(records) - finished)}")
        for request, result in runner.wait():
            store.write_run(request, result, written_by=session)
            flying[request.study_id].remove(request)
            records[request.study_id] = store.records(request.study_id)
            log.info("%s: %s", request.name, result["outcome"])


def _write_study(store: ResultStore, study: Study, records: list[RunRecord], best: int | None) -> None:
    score = score_study(study, records)
    store.write_study(
        study.id,
        {
            "study": study_summary(study),
            "best_trial": best,
            "best_hyperparameters": None if best is None else study.hyperparameters(best),
            "score": score.to_dict(),
        },
    )


def _check_stored_requests(store: ResultStore, studies: list[Study]) -> None:
    """Refuse a folder whose stored runs are not the runs this spec, with this code, asks for
    (batchlab.search.request_differences says why that matters). Nothing in the folder is
    changed when it is refused.

    Raises:
      ValueError: naming the run file and the fields that differ.
    """
    known = {study.id for study in studies}
    for folder in sorted((store.root / "runs").glob("*")):
        if folder.name not in known and holds_runs(folder):
            raise ValueError(f"out_dir: {folder} holds runs of a study this spec does not have "
                             f"({folder.name!r}); use a new folder, or remove it")
    for study in studies:
        for path, stored in store.requests(study.id):
            differing = request_differences(study, stored, file_name=path.name)
            if differing:
                raise ValueError(
                    f"out_dir: {path} is not the run this spec asks for with this code "
                    f"({'; '.join(differing[:3])}{'; ...' if len(differing) > 3 else ''}). "
                    "Its result would be mixed into the study's verdicts: use a new folder, or "
                    "delete the folder's runs made by the other spec or code")


def _stored_threads(store: ResultStore, studies: list[Study],
                    execution: dict[str, Any] | None) -> dict[str, int]:
    """The thread counts this folder's stored runs used, by workload (kept on resume).

    A folder from before worker processes ran everything in one process with all its CPUs.
    Run files with no experiment.json beside them (copied in from another folder) are assumed
    to be such runs too; the warning says so, since results depend on the thread count.
    """
    stored = dict((execution or {}).get("threads_per_run") or {})
    with_runs = {s.workload for s in studies if store.records(s.id)}
    legacy = sorted(w for w in with_runs if w not in stored)
    if legacy and not execution:
        log.warning("%s: run files without a recorded thread count (no experiment.json: made by an "
                    "older batchlab, which trained in one process on all its CPUs, or copied in); "
                    "assuming all CPUs, the remaining runs of %s use %d thread(s) too. Results depend "
                    "on the thread count: if the stored runs used another, start a new folder",
                    store.root, ", ".join(legacy), available_cpus())
        stored.update({w: available_cpus() for w in legacy})
    return {w: int(t) for w, t in stored.items()}


def prepare_datasets(workloads: Iterable[str], data_dir: str | os.PathLike[str] | None) -> None:
    """Build the offline datasets of ``workloads`` (names) once here, before workers would race
    to build them."""
    from batchlab import data as bdata
    from batchlab.train.workloads import get_workload

    for name in sorted(set(workloads)):
        workload = get_workload(name)
        if bdata.dataset_info(workload.dataset).offline:
            bdata.prepare(workload.dataset, data_dir, config=workload.dataset_config)


def _configured_cache_root() -> str | None:
    """The compilation cache root this process configured (workers use the same one)."""
    import jax

    # jax.config's options are dynamic attributes (pytype's _HAS_DYNAMIC_ATTRIBUTES): mypy
    # sees none of them.
    return cache_root_of(jax.config.jax_compilation_cache_dir)  # type: ignore[attr-defined]


def _progress(enabled: bool) -> Progress:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return Progress(*columns, disable=not enabled, transient=False)


class _InProcess:
    """Runs requests in this process, one at a time, with the same interface as WorkerPool."""

    def __init__(self, train: Callable[[RunRequest, Study, str | None], dict[str, Any]],
                 studies: list[Study], data_dir: str | None):
        self._train, self._data_dir = train, data_dir
        self._studies = {s.id: s for s in studies}
        self._queue: list[RunRequest] = []

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.clear()

    def submit(self, request: RunRequest, *, threads: int) -> None:
        del threads  # this process's own JAX threads
        self._queue.append(request)

    def wait(self) -> list[tuple[RunRequest, dict[str, Any]]]:
        request = self._queue.pop(0)
        return [(request, self._train(request, self._studies[request.study_id], self._data_dir))]
