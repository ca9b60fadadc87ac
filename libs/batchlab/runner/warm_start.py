"""Warm starts in ``batchlab local run``: find the stored run a spec names; keep final states.

A workload's ``warm_start`` names a study of another experiment (see
:mod:`batchlab.search.warm_start`). Locally, that experiment's results folder is a sibling of
this experiment's results folder (``--out results/bert-phase1`` then ``--out
results/bert-phase2``), recognised by the name in its ``experiment.json``. The run that
initialises the warm-started runs is the tuning run of the source study's best trial (or of the
trial the spec names), whose final parameters and batch statistics the source kept under
``states/`` because its workload sets ``keep_final_state``.

Every run of the warm-started workload (tuning trials and reruns, every seed) starts from that
one state, with a fresh optimizer state at step 0, as the paper's phase 2 starts from phase 1's
checkpoint (Nado et al. 2021, Appendix B.2).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from batchlab.runner.store import ResultStore
from batchlab.search.protocol import RunKind, RunRequest
from batchlab.search.spec import ExperimentSpec
from batchlab.search.study import Study
from batchlab.search.warm_start import WarmStartRef, warm_start_of
from batchlab.targets import Outcome

if TYPE_CHECKING:  # the runner imports JAX (train) only where a run needs it
    from batchlab.train.loop import RunResult

__all__ = ["RunStates", "find_experiment", "run_states", "source_state_dir"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunStates:
    """What one run reads before training and keeps after it.

    Attributes:
      init_checkpoint: the kept final state that initialises the run, or None.
      source: that state named independently of where results folders live
        ("<experiment>: <study id> trial <T>"), or None.
      keep_dir: where to keep the run's final state, or None.
      metadata: stored with the kept state (which run it is).
    """

    init_checkpoint: str | None = None
    source: str | None = None
    keep_dir: Path | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def finish(self, result: RunResult) -> dict[str, Any]:
        """Keep the run's final state if it is kept; the result as stored in the run file.

        The stored ``initialised_from`` names the source run, not its folder, so two executions
        of the same experiments in other folders store the same result.

        Args:
          result: the run's RunResult (with ``final_state`` when ``keep_dir`` is set).
        """
        self._keep(result)
        out = result.to_dict()
        if self.source is not None and out.get("initialised_from") is not None:
            out["initialised_from"] = self.source
        return out

    def _keep(self, result: RunResult) -> None:
        if self.keep_dir is None or result.outcome is not Outcome.SUCCEEDED:
            return
        from batchlab.train.checkpoint import save_final_variables

        state = result.final_state
        metadata = {**self.metadata, "steps_completed": result.steps_completed,
                    "final_metrics": result.final_metrics, "initialised_from": result.initialised_from}
        save_final_variables(
            self.keep_dir, result.steps_completed,
            {"params": state.params, "batch_stats": state.batch_stats}, metadata,
        )
        log.info("kept the final state of %s in %s", metadata.get("study_id"), self.keep_dir)


def _workload_entry(spec: ExperimentSpec, workload: str) -> tuple[int, Any]:
    for i, entry in enumerate(spec.workloads):
        if entry.workload == workload:
            return i, entry
    raise ValueError(f"workloads: no entry for workload {workload!r} in experiment {spec.name!r}")


def _spec_of(experiment: dict[str, Any]) -> ExperimentSpec:
    spec = ExperimentSpec()
    json_format.ParseDict(experiment["spec"], spec)
    return spec


def run_states(store: ResultStore | None, request: RunRequest, study: Study) -> RunStates:
    """What a run of ``study`` reads (its warm start) and keeps (its final state).

    Args:
      store: this experiment's results (None: a run outside an experiment folder, which
        neither warm starts nor keeps anything).
      request: the run.
      study: its study.

    Raises:
      ValueError: the warm start's source cannot be found, has not finished, or kept no final
        state; the message names the spec field.
    """
    if store is None:
        return RunStates()
    experiment = store.read_experiment()
    if experiment is None:
        raise ValueError(f"{store.root}: no experiment.json; run the experiment through run_experiment")
    spec = _spec_of(experiment)
    index, entry = _workload_entry(spec, study.workload)
    ref = warm_start_of(entry)
    init = source = None
    if ref is not None:
        path, source = source_state_dir(store, ref, study, f"workloads[{index}].warm_start")
        init = str(path)
    keep = entry.keep_final_state and request.kind is RunKind.TUNING
    return RunStates(
        init_checkpoint=init,
        source=source,
        keep_dir=store.state_dir(request.study_id, request.trial_index) if keep else None,
        metadata={
            "experiment": study.experiment,
            "study_id": request.study_id,
            "trial_index": request.trial_index,
            "seed": request.seed,
            "workload": study.workload,
            "hyperparameters": request.hyperparameters,
        },
    )


def find_experiment(results_root: Path, name: str, *, field: str = "experiment") -> ResultStore:
    """The results of experiment ``name`` among the siblings of ``results_root``.

    Args:
      results_root: this experiment's results folder.
      name: the source experiment's name.
      field: the field named in errors.

    Raises:
      ValueError: no sibling folder, or more than one, holds that experiment.
    """
    here = Path(results_root).resolve()
    found = []
    for folder in sorted(here.parent.iterdir()):
        if folder == here or not (folder / "experiment.json").is_file():
            continue
        if (ResultStore(folder).read_experiment() or {}).get("name") == name:
            found.append(folder)
    if not found:
        raise ValueError(
            f"{field}: no results of experiment {name!r} next to {here} (looked for "
            f"*/experiment.json in {here.parent}); run it first with `batchlab local run SPEC "
            f"--out {here.parent}/<folder>`"
        )
    if len(found) > 1:
        raise ValueError(f"{field}: several results folders hold experiment {name!r}: "
                         f"{', '.join(str(f) for f in found)}; keep one")
    return ResultStore(found[0])


def _source_study(experiment: dict[str, Any], ref: WarmStartRef, study: Study, where: str) -> str:
    label = ref.optimizer_for(study.optimizer)
    studies = experiment.get("studies") or []
    candidates = [
        s for s in studies
        if s["workload"] == ref.workload and s["optimizer"] == label
        and (ref.batch_size is None or (s["batch_size"], s["step_budget"]) == (ref.batch_size, ref.step_budget))
    ]
    if not candidates:
        if not any(s["workload"] == ref.workload for s in studies):
            field = "workload"
        elif not any(s["workload"] == ref.workload and s["optimizer"] == label for s in studies):
            field = "optimizer"
        else:
            field = "batch_size"
        raise ValueError(
            f"{where}.{field}: experiment {ref.experiment!r} has no study of workload "
            f"{ref.workload!r}, optimizer {label!r}"
            + ("" if ref.batch_size is None else f" at batch {ref.batch_size}, {ref.step_budget} steps")
            + f"; its studies: {', '.join(s['id'] for s in studies) or 'none'}"
        )
    points = sorted({(s["batch_size"], s["step_budget"]) for s in candidates})
    if len(points) > 1:
        raise ValueError(f"{where}.batch_size: the source workload has several points {points}; "
                         "give batch_size and step_budget")
    by_replicate: dict[int, str] = {int(s.get("replicate", 0)): s["id"] for s in candidates}
    if len(by_replicate) == 1:
        return next(iter(by_replicate.values()))
    if study.replicate not in by_replicate:
        raise ValueError(f"{where}.experiment: experiment {ref.experiment!r} has search replicates "
                         f"{sorted(by_replicate)}, none for this study's replicate {study.replicate}")
    # Replicate k continues the source's replicate k: tuning luck stays independent.
    return by_replicate[study.replicate]


def source_state_dir(store: ResultStore, ref: WarmStartRef, study: Study, where: str) -> tuple[Path, str]:
    """The kept final state that initialises the runs of ``study``, and its name.

    Args:
      store: this experiment's results.
      ref: the workload's warm start.
      study: the study being run.
      where: the warm start's field path, for errors.

    Returns:
      The state's folder, and "<experiment>: <study id> trial <T>".

    Raises:
      ValueError: naming the field, when the source experiment, study, trial or state is
        missing or the source does not keep final states.
    """
    source = find_experiment(store.root, ref.experiment, field=f"{where}.experiment")
    experiment = source.read_experiment() or {}
    spec = _spec_of(experiment)
    try:
        _, entry = _workload_entry(spec, ref.workload)
    except ValueError:
        raise ValueError(f"{where}.workload: experiment {ref.experiment!r} has no workload "
                         f"{ref.workload!r}") from None
    if not entry.keep_final_state:
        raise ValueError(
            f"{where}.experiment: experiment {ref.experiment!r} does not keep final states for "
            f"workload {ref.workload!r}; set keep_final_state: true on that workload in its "
            "spec and run it again (in a new results folder)"
        )
    study_id = _source_study(experiment, ref, study, where)
    trial = ref.trial
    if trial is None:
        summary = source.read_study(study_id)
        if summary is None:
            raise ValueError(f"{where}.experiment: study {study_id} of experiment "
                             f"{ref.experiment!r} has not finished (no best trial yet); finish it first")
        trial = summary.get("best_trial")
        if trial is None:
            raise ValueError(f"{where}.experiment: study {study_id} of experiment "
                             f"{ref.experiment!r} has no feasible trial to start from")
    state = source.state_dir(study_id, int(trial))
    if not state.is_dir():
        raise ValueError(
            f"{where}.{'trial' if ref.trial is not None else 'experiment'}: no kept final state "
            f"for trial {trial} of study {study_id} in {source.root} (its tuning run did not "
            "succeed, or has not run)"
        )
    return state, f"{ref.experiment}: {study_id} trial {trial}"
