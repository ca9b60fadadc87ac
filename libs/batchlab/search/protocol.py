"""The study protocol as a pure state machine: given the results so far, what runs next.

Both the local runner and the controller service drive a study the same way: they record one
RunRecord per finished run attempt, call `next_runs(study, records, in_flight=..., parallelism=
...)`, launch what it returns, and repeat until `done`. Nothing is stored here and nothing is
random at call time, so the same records always give the same decision and a study resumes
where it stopped after any crash.

The protocol (Nado et al. 2021, Section 2, Section 4 and Appendix D.3):
  1. Tuning. Trial i runs Halton point i of the search space with its own seed. A DIVERGED
     trial is a result (infeasible) and does not count toward `trials_per_study`; tuning ends
     when that many trials are feasible, or when `max_total_trials` trials (diverged ones
     included) have finished. A FAILED or CANCELLED run is not a result: the same run (same
     trial, seed and hyperparameters) is retried, up to `max_attempts` attempts, after which
     it is abandoned (reported, never counted as feasible or diverged).
  2. Selection. Among the first `trials_per_study` feasible trials (by trial index, so a fair
     budget even when more finished), the best by `selection`: BEST_VALIDATION_METRIC takes the
     best final target metric; FEWEST_STEPS_TO_TARGET takes the fewest steps to the target, the
     final metric breaking ties (so when no trial reaches the target it is the best metric).
     Remaining ties go to the lower trial index.
  3. Reruns. The best trial is rerun `seeds_per_best` times with seeds distinct from its tuning
     seed; the study is scored on those reruns (batchlab.search.scoring).

A run is identified by RunKey(trial_index, seed): the tuning run of trial i has
`study.tuning_seed(i)`, its reruns `study.rerun_seeds(i)`.

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check", Sections 2 and 4, Appendix D.3.
  Bousquet et al. 2017, "Critical Hyper-Parameters: No Random, No Cry".
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from batchlab.search.study import Selection, Study, run_seeds
from batchlab.targets import Outcome, Target, TargetReading


class RunKind(enum.StrEnum):
    """Whether a run tunes (one run of a new trial) or reruns the best trial with a new seed."""

    TUNING = "tuning"
    RERUN = "rerun"


class Phase(enum.StrEnum):
    """Where a study is: tuning, rerunning its best trial, or finished."""

    TUNING = "tuning"
    RERUNS = "reruns"
    DONE = "done"


class RunStatus(enum.StrEnum):
    """The state of one run (all its attempts together)."""

    NOT_STARTED = "not_started"
    RUNNING = "running"
    RETRY = "retry"  # the last attempt failed and attempts are left
    SUCCEEDED = "succeeded"  # feasible: finished with a finite target metric
    DIVERGED = "diverged"  # a DIVERGED outcome, or a non-finite target metric
    ABANDONED = "abandoned"  # every attempt failed

    @property
    def terminal(self) -> bool:
        """Whether the run will not be launched again."""
        return self in (RunStatus.SUCCEEDED, RunStatus.DIVERGED, RunStatus.ABANDONED)


class ProtocolError(ValueError):
    """Records that cannot come from this study (unknown seed, two results for one run)."""


@dataclass(frozen=True, order=True)
class RunKey:
    """Identifies a run of a study: the trial whose hyperparameters it uses and its seed.

    Args:
      trial_index: the tuning trial.
      seed: the run seed.
    """

    trial_index: int
    seed: int


@dataclass(frozen=True)
class RunRecord:
    """The result of one run attempt, as the runner reports it.

    Args:
      trial_index: the tuning trial whose hyperparameters the run used.
      seed: the run seed.
      outcome: how the attempt ended (an Outcome or its proto number).
      final_metrics: metrics at the end of training; a SUCCEEDED record must carry the
        study's target metric.
      steps_to_target: first evaluation step meeting the target, math.inf (or None) if never.
      steps_run: training steps the attempt used (for the tuning effort).
      curve: the evaluations in step order, each a mapping of metric -> value with "step";
        needed for the END_OF_BUDGET reading (empty when the runner did not keep it).
    """

    trial_index: int
    seed: int
    outcome: Outcome
    final_metrics: Mapping[str, float] = field(default_factory=dict)
    steps_to_target: float = math.inf
    steps_run: int = 0
    curve: tuple[Mapping[str, float], ...] = ()

    def __post_init__(self) -> None:
        try:
            outcome = Outcome(self.outcome)
        except ValueError:
            raise ValueError(f"outcome must be one of {[o.name for o in Outcome]}, "
                             f"got {self.outcome!r}") from None
        object.__setattr__(self, "outcome", outcome)
        steps = math.inf if self.steps_to_target is None else float(self.steps_to_target)
        if math.isnan(steps) or steps < 0:
            raise ValueError(f"steps_to_target must be >= 0 or inf, got {self.steps_to_target!r}")
        object.__setattr__(self, "steps_to_target", steps)
        if self.steps_run < 0:
            raise ValueError(f"steps_run must be >= 0, got {self.steps_run}")
        curve = tuple(MappingProxyType({str(k): math.nan if v is None else float(v)
                                        for k, v in point.items()}) for point in self.curve)
        curve_steps = [point.get("step", math.nan) for point in curve]
        if any(math.isnan(x) for x in curve_steps) or any(
            b < a for a, b in zip(curve_steps, curve_steps[1:], strict=False)
        ):
            raise ValueError("curve points must each have a step, in step order")
        object.__setattr__(self, "curve", curve)

    @classmethod
    def from_result(cls, trial_index: int, seed: int, result: Mapping[str, Any]) -> RunRecord:
        """A record from a RunResult dict (batchlab.train.RunResult.to_dict, as runners store it).

        Args:
          trial_index: the trial the run belongs to.
          seed: the run seed.
          result: {"outcome": name, "final_metrics": ..., "steps_to_target": int or None,
            "steps_completed": int, "curve": [...]}; nulls in metrics read as NaN.

        Raises:
          KeyError, ValueError, TypeError: a malformed result.
        """
        steps = result.get("steps_to_target")
        return cls(
            trial_index=int(trial_index),
            seed=int(seed),
            outcome=Outcome[result["outcome"]],
            final_metrics={k: (math.nan if v is None else float(v))
                           for k, v in (result.get("final_metrics") or {}).items()},
            steps_to_target=math.inf if steps is None else float(steps),
            steps_run=int(result.get("steps_completed") or 0),
            curve=tuple(result.get("curve") or ()),
        )

    @property
    def key(self) -> RunKey:
        """The run this attempt belongs to."""
        return RunKey(self.trial_index, self.seed)


@dataclass(frozen=True)
class RunRequest:
    """A run the driver should launch now.

    Args:
      study_id: the study.
      kind: TUNING or RERUN.
      trial_index: the trial whose hyperparameters to use.
      replica: 0 for the tuning run, 1..seeds_per_best for reruns.
      seed: the run seed.
      attempt: 1 for the first attempt, 2.. for retries after infrastructure failures.
      hyperparameters: {"optimizer": config, "workload": overrides} for this trial.
      batch_size: examples per step.
      step_budget: training steps.
      eval_every_steps: evaluation period.
    """

    study_id: str
    kind: RunKind
    trial_index: int
    replica: int
    seed: int
    attempt: int
    hyperparameters: Mapping[str, Any]
    batch_size: int
    step_budget: int
    eval_every_steps: int

    @property
    def key(self) -> RunKey:
        """The run's identity (the same for every attempt)."""
        return RunKey(self.trial_index, self.seed)

    @property
    def name(self) -> str:
        """A readable, stable name: f"{study_id}/t{trial}/r{replica}/a{attempt}"."""
        return f"{self.study_id}/t{self.trial_index}/r{self.replica}/a{self.attempt}"

    def to_dict(self) -> dict[str, Any]:
        """The request as JSON data (what runners store beside a run's result)."""
        return {
            "study_id": self.study_id,
            "kind": str(self.kind),
            "trial_index": self.trial_index,
            "replica": self.replica,
            "seed": self.seed,
            "attempt": self.attempt,
            "hyperparameters": json.loads(json.dumps(self.hyperparameters, allow_nan=True)),
            "batch_size": self.batch_size,
            "step_budget": self.step_budget,
            "eval_every_steps": self.eval_every_steps,
        }


@dataclass(frozen=True)
class RunState:
    """Everything known about one run.

    Args:
      key: the run.
      kind: TUNING or RERUN.
      replica: 0 for the tuning run, 1.. for reruns.
      status: see RunStatus.
      failed_attempts: attempts that ended FAILED or CANCELLED.
      result: the SUCCEEDED or DIVERGED record, if any.
    """

    key: RunKey
    kind: RunKind
    replica: int
    status: RunStatus
    failed_attempts: int = 0
    result: RunRecord | None = None


@dataclass(frozen=True)
class StudyState:
    """The protocol's reading of a study's records.

    Args:
      phase: TUNING, RERUNS or DONE.
      tuning: the tuning run of every trial started so far, by trial index.
      counted_trials: the feasible trials selection considers (the first trials_per_study).
      best_trial: the selected trial, once tuning is complete (None if no trial is feasible).
      reruns: the reruns of the best trial, by replica.
      stray_records: records of reruns of a trial that is not the best (ignored, but their
        steps count in the tuning effort).
      reason: why the study is in its phase, for people.
    """

    phase: Phase
    tuning: Mapping[int, RunState]
    counted_trials: tuple[int, ...]
    best_trial: int | None
    reruns: tuple[RunState, ...]
    stray_records: tuple[RunRecord, ...]
    reason: str

    def trials_with(self, status: RunStatus) -> tuple[int, ...]:
        """Tuning trials whose run has a given status, ascending.

        Args:
          status: the status to select.
        """
        return tuple(sorted(i for i, s in self.tuning.items() if s.status is status))

    @property
    def feasible_trials(self) -> int:
        """Tuning trials that finished without diverging."""
        return len(self.trials_with(RunStatus.SUCCEEDED))

    @property
    def diverged_trials(self) -> int:
        """Tuning trials that diverged."""
        return len(self.trials_with(RunStatus.DIVERGED))

    @property
    def abandoned_trials(self) -> int:
        """Tuning trials given up after max_attempts infrastructure failures."""
        return len(self.trials_with(RunStatus.ABANDONED))


@dataclass(frozen=True)
class Decision:
    """What to do next for a study.

    Args:
      launch: runs to start now (at most parallelism minus the runs in flight).
      done: the study needs no more runs.
      phase: TUNING, RERUNS or DONE.
      best_trial: the selected trial once tuning is complete.
      reason: why, for people (e.g. "waiting for 2 runs in flight").
      state: the full reading of the records.
    """

    launch: tuple[RunRequest, ...]
    done: bool
    phase: Phase
    best_trial: int | None
    reason: str
    state: StudyState


def is_feasible(study: Study, record: RunRecord) -> bool:
    """Whether a finished record is feasible: SUCCEEDED with a finite target metric.

    A SUCCEEDED record whose target metric is NaN or infinite is treated as diverged.

    Args:
      study: the study (names the target metric).
      record: a SUCCEEDED or DIVERGED record.

    Raises:
      ProtocolError: a SUCCEEDED record lacks the target metric (a runner bug, not a result).
    """
    if record.outcome is not Outcome.SUCCEEDED:
        return False
    metric = study.target.metric
    if metric not in record.final_metrics:
        raise ProtocolError(
            f"study {study.id}: SUCCEEDED record of trial {record.trial_index} seed "
            f"{record.seed} lacks the target metric {metric!r} "
            f"(has {sorted(record.final_metrics)})")
    value = record.final_metrics[metric]
    return value is not None and math.isfinite(value)


def _run_state(study: Study, key: RunKey, kind: RunKind, replica: int,
               attempts: Sequence[RunRecord], running: bool) -> RunState:
    results = [r for r in attempts if r.outcome in (Outcome.SUCCEEDED, Outcome.DIVERGED)]
    failed = len(attempts) - len(results)
    if len(results) > 1:
        raise ProtocolError(f"study {study.id}: {len(results)} results for the run of trial "
                            f"{key.trial_index} seed {key.seed}; expected one")
    if results:
        result = results[0]
        status = RunStatus.SUCCEEDED if is_feasible(study, result) else RunStatus.DIVERGED
        return RunState(key, kind, replica, status, failed, result)
    if running:
        status = RunStatus.RUNNING
    elif failed >= study.max_attempts:
        status = RunStatus.ABANDONED
    elif failed:
        status = RunStatus.RETRY
    else:
        status = RunStatus.NOT_STARTED
    return RunState(key, kind, replica, status, failed)


def held_steps(curve: Sequence[Mapping[str, float]], target: Target) -> float:
    """The first evaluation step from which every later evaluation meets the target; inf if the
    final evaluation does not meet it (the END_OF_BUDGET reading).

    Args:
      curve: the evaluations in step order (metric -> value, with "step").
      target: the target.
    """
    held = math.inf
    for point in reversed(list(curve)):
        if not target.is_met(float(point.get(target.metric, math.nan))):
            break
        held = float(point["step"])
    return held


def reading_steps(target: Target, record: RunRecord) -> float:
    """A finished run's steps-to-target under the target's reading (inf: not reached).

    FIRST_EVALUATION: the run's recorded steps-to-target. END_OF_BUDGET: `held_steps` of the
    run's curve; a record without a curve (stored before curves were kept) counts as reaching
    the target at its recorded steps-to-target when its final metric meets the target.

    Args:
      target: the study's target.
      record: a SUCCEEDED or DIVERGED record.
    """
    if record.outcome is not Outcome.SUCCEEDED:
        return math.inf
    if target.reading is not TargetReading.END_OF_BUDGET:
        return record.steps_to_target
    if record.curve:
        return held_steps(record.curve, target)
    final = record.final_metrics.get(target.metric)
    met = final is not None and target.is_met(float(final))
    return record.steps_to_target if met else math.inf


def select_best(study: Study, candidates: Iterable[RunRecord]) -> int | None:
    """The best trial among feasible tuning records, by the study's selection rule.

    Args:
      study: the study (selection rule and target).
      candidates: one feasible tuning record per trial.

    Returns:
      The best trial index, or None when there are no candidates.
    """
    target = study.target

    def key(record: RunRecord) -> tuple[float, ...]:
        metric_key = target.rank_key(record.final_metrics.get(target.metric))
        if study.selection is Selection.FEWEST_STEPS_TO_TARGET:
            return (reading_steps(target, record), metric_key, record.trial_index)
        return (metric_key, record.trial_index)

    ranked = sorted(candidates, key=key)
    return ranked[0].trial_index if ranked else None


def _as_key(item: Any) -> RunKey:
    if isinstance(item, RunKey):
        return item
    if hasattr(item, "trial_index") and hasattr(item, "seed"):
        return RunKey(int(item.trial_index), int(item.seed))
    trial_index, seed = item
    return RunKey(int(trial_index), int(seed))


def study_state(study: Study, records: Iterable[RunRecord],
                in_flight: Iterable[Any] = ()) -> StudyState:
    """Read a study's records (and the runs in flight) into a StudyState.

    Args:
      study: the study.
      records: every run attempt recorded so far, in any order.
      in_flight: runs launched and not yet recorded (RunKey, RunRequest, or (trial, seed)).

    Raises:
      ProtocolError: a record or run in flight has a seed never assigned to its trial, or a
        run has two results.
    """
    records = list(records)
    running = {_as_key(item) for item in in_flight}
    seeds_cache: dict[int, tuple[int, ...]] = {}

    def classify(key: RunKey) -> int:
        """The replica of a key: 0 tuning, 1.. rerun."""
        if key.trial_index < 0:
            raise ProtocolError(f"study {study.id}: negative trial index {key.trial_index}")
        if key.trial_index not in seeds_cache:
            seeds_cache[key.trial_index] = run_seeds(study, key.trial_index)
        seeds = seeds_cache[key.trial_index]
        if key.seed in seeds:
            return seeds.index(key.seed)
        raise ProtocolError(f"study {study.id}: seed {key.seed} was never assigned to trial "
                            f"{key.trial_index}")

    by_key: dict[RunKey, list[RunRecord]] = {}
    for record in records:
        by_key.setdefault(record.key, []).append(record)
    replicas = {key: classify(key) for key in set(by_key) | running}

    tuning: dict[int, RunState] = {}
    for key, replica in replicas.items():
        if replica == 0:
            tuning[key.trial_index] = _run_state(study, key, RunKind.TUNING, 0,
                                                 by_key.get(key, []), key in running)
    tuning = dict(sorted(tuning.items()))
    feasible = [i for i, s in tuning.items() if s.status is RunStatus.SUCCEEDED]
    pending = [i for i, s in tuning.items() if not s.status.terminal]
    counted = tuple(feasible[: study.trials_per_study])
    finished = sum(1 for s in tuning.values() if s.status.terminal)

    def rerun_records(best: int | None) -> tuple[RunRecord, ...]:
        return tuple(r for key, rs in by_key.items() for r in rs
                     if replicas[key] > 0 and key.trial_index != best)

    tuning_complete = False
    reason = ""
    if len(feasible) >= study.trials_per_study:
        if pending:
            reason = f"{len(feasible)} feasible trials; waiting for {len(pending)} pending"
        else:
            tuning_complete = True
            reason = f"{study.trials_per_study} feasible trials"
    elif not pending and _unused_indices(tuning, study.max_total_trials, 1) == []:
        tuning_complete = True
        reason = (f"max_total_trials ({study.max_total_trials}) reached with "
                  f"{len(feasible)} feasible trials")
    else:
        reason = (f"tuning: {len(feasible)} of {study.trials_per_study} feasible trials, "
                  f"{finished} trials finished, {len(pending)} pending")
    if not tuning_complete:
        return StudyState(Phase.TUNING, tuning, counted, None, (),
                          rerun_records(None), reason)

    best = select_best(study, [r for r in (tuning[i].result for i in counted) if r is not None])
    if best is None:
        return StudyState(Phase.DONE, tuning, counted, None, (), rerun_records(None),
                          f"no feasible trial ({reason})")
    rerun_states = tuple(
        _run_state(study, RunKey(best, seed), RunKind.RERUN, replica,
                   by_key.get(RunKey(best, seed), []), RunKey(best, seed) in running)
        for replica, seed in enumerate(study.rerun_seeds(best), start=1)
    )
    open_reruns = [s for s in rerun_states if not s.status.terminal]
    if open_reruns:
        phase = Phase.RERUNS
        reason = (f"best trial {best} ({reason}); {len(rerun_states) - len(open_reruns)} of "
                  f"{len(rerun_states)} reruns finished")
    else:
        phase = Phase.DONE
        reason = f"best trial {best} ({reason}); {len(rerun_states)} reruns finished"
    return StudyState(phase, tuning, counted, best, rerun_states, rerun_records(best), reason)


def _unused_indices(tuning: Mapping[int, RunState], max_total_trials: int,
                    count: int) -> list[int]:
    """The `count` smallest trial indices below max_total_trials not started yet."""
    found: list[int] = []
    index = 0
    while len(found) < count and index < max_total_trials:
        if index not in tuning:
            found.append(index)
        index += 1
    return found


def _request(study: Study, state: RunState) -> RunRequest:
    return request_for(study, state.key.trial_index, state.replica, state.failed_attempts + 1)


def request_for(study: Study, trial_index: int, replica: int, attempt: int = 1) -> RunRequest:
    """The request this study makes for replica `replica` (0: tuning) of trial `trial_index`.

    What a stored run must match to count as that run: a runner resuming a results folder
    compares the requests it stored with these (code that derives hyperparameters or seeds
    differently, or run files from another experiment, would otherwise be mixed in silently).

    Raises:
      ValueError: a negative trial, or a replica outside 0..seeds_per_best.
    """
    seeds = run_seeds(study, trial_index)
    if not 0 <= replica < len(seeds):
        raise ValueError(f"replica must be in 0..{len(seeds) - 1} (seeds_per_best is "
                         f"{study.seeds_per_best}), got {replica}")
    return RunRequest(
        study_id=study.id,
        kind=RunKind.TUNING if replica == 0 else RunKind.RERUN,
        trial_index=trial_index,
        replica=replica,
        seed=seeds[replica],
        attempt=attempt,
        hyperparameters=study.hyperparameters(trial_index),
        batch_size=study.batch_size,
        step_budget=study.step_budget,
        eval_every_steps=study.eval_every_steps,
    )


def run_file_name(trial_index: int, replica: int, attempt: int) -> str:
    """The file a run attempt is stored in, under its study's folder ("t{T}_r{R}_a{A}.json"):
    its identity for a runner reading a results folder back."""
    return f"t{trial_index}_r{replica}_a{attempt}.json"


# Every run_file_name matches it: how a reader finds a study folder's run files.
RUN_FILE_PATTERN = "t*_r*_a*.json"


def holds_runs(folder: Path) -> bool:
    """Whether ``folder`` holds run files: what makes a folder under runs/ a study's results
    (an empty or editor-made folder holds none). The runner refuses, and the report names, such
    a folder that is not a study of the experiment."""
    return any(folder.glob(RUN_FILE_PATTERN))


def request_differences(study: Study, stored: Mapping[str, Any],
                        fields: Iterable[str] | None = None, *,
                        file_name: str | None = None) -> list[str]:
    """How a stored run's request differs from the one the study makes for its trial and replica.

    A resumed study reads its finished runs back as results, so each must be the run the
    protocol asks for now: code that derives hyperparameters or seeds differently, or runs of
    another experiment, would otherwise be mixed into its verdicts silently.

    Args:
      study: the study.
      stored: a stored request (RunRequest.to_dict's keys; at least trial_index and replica).
      fields: the keys to compare (default: all of RunRequest.to_dict's).
      file_name: the name of the file the request was read from: a request that matches but
        is stored under another run's name (a copy) is a second result of that other run.

    Returns:
      "path: stored X, expected Y" for each differing leaf (the run's identity first, then
      its hyperparameters); a stored request that no trial and replica of the study can have
      gives one entry saying why. Empty when it matches.
    """
    identity = {key: stored.get(key, 1 if key == "attempt" else None)
                for key in ("trial_index", "replica", "attempt")}
    wrong = [f"{key} must be an integer, got {value!r}" for key, value in identity.items()
             if isinstance(value, bool) or not isinstance(value, int)]
    if wrong:
        return [f"not a run of study {study.id} ({'; '.join(wrong)})"]
    try:
        wanted = request_for(study, identity["trial_index"], identity["replica"],
                             identity["attempt"]).to_dict()
    except ValueError as err:
        return [f"not a run of study {study.id} ({type(err).__name__}: {err})"]
    keys = list(wanted) if fields is None else list(fields)
    found = [d for key in keys
             for d in _differences(stored.get(key, "<missing>"), wanted[key], key)]
    named = run_file_name(identity["trial_index"], identity["replica"], identity["attempt"])
    if not found and file_name is not None and file_name != named:
        return [f"the file holds the run {named}"]
    return sorted(found, key=lambda d: d.startswith("hyperparameters"))


def _differences(stored: Any, wanted: Any, path: str) -> list[str]:
    if isinstance(stored, Mapping) and isinstance(wanted, Mapping):
        return [d for key in sorted(set(stored) | set(wanted), key=str)
                for d in _differences(stored.get(key, "<missing>"),
                                      wanted.get(key, "<missing>"), f"{path}.{key}")]
    return [] if stored == wanted else [f"{path}: stored {stored!r}, expected {wanted!r}"]


def unfilled_runs(study: Study, state: StudyState) -> list[str]:
    """The runs a finished study budgeted but lacks because runs were abandoned, for people.

    A rerun of the best trial abandoned after max_attempts failures leaves its seed out of the
    median; abandoned tuning trials that used up max_total_trials before trials_per_study
    trials were feasible leave the search short. Either way the study did not get the effort
    the protocol promises every optimizer, so its comparisons are not on equal budgets. A
    tuning trial abandoned and then replaced by another within max_total_trials is not
    missing. Empty when nothing is missing.

    Args:
      study: the study.
      state: its protocol state (study_state), once done.
    """
    missing = [f"{study.id} rerun {run.replica} of trial {state.best_trial}"
               for run in state.reruns if run.status is RunStatus.ABANDONED]
    if state.abandoned_trials and len(state.counted_trials) < study.trials_per_study:
        missing.append(f"{study.id}: {len(state.counted_trials)} of {study.trials_per_study} "
                       f"tuning trials feasible within max_total_trials (abandoned: trial "
                       f"{', '.join(map(str, state.trials_with(RunStatus.ABANDONED)))})")
    return missing


def next_runs(study: Study, records: Iterable[RunRecord], *, in_flight: Iterable[Any] = (),
              parallelism: int = 1) -> Decision:
    """Decide which runs of a study to launch now, and whether the study is done.

    Pure and deterministic: the same study, records and runs in flight give the same decision.
    Retries come first (lowest trial or replica first), then new trials in index order, then
    (once tuning is complete) reruns in replica order. No new trial is started while the
    feasible trials plus the pending ones already reach trials_per_study; if some of those
    diverge, later calls start more, up to max_total_trials.

    Args:
      study: the study.
      records: every run attempt recorded so far (any order).
      in_flight: runs launched and not yet recorded (RunKey, RunRequest, or (trial, seed)).
      parallelism: how many runs of this study may be in flight at once, >= 1.

    Raises:
      ProtocolError: records inconsistent with the study (see study_state).
      ValueError: parallelism < 1.

    References:
      Nado et al. 2021, Section 2 and Appendix D.3 (feasible-trial budgets, seed reruns).
    """
    if parallelism < 1:
        raise ValueError(f"parallelism must be >= 1, got {parallelism}")
    in_flight = [_as_key(item) for item in in_flight]
    state = study_state(study, records, in_flight)
    slots = max(parallelism - len(set(in_flight)), 0)
    launch: list[RunState] = []
    if state.phase is Phase.TUNING:
        retries = [s for s in state.tuning.values() if s.status is RunStatus.RETRY]
        launch.extend(retries)
        feasible = state.feasible_trials
        pending = sum(1 for s in state.tuning.values() if not s.status.terminal)
        wanted = study.trials_per_study - feasible - pending
        if wanted > 0:
            for index in _unused_indices(state.tuning, study.max_total_trials, wanted):
                key = RunKey(index, study.tuning_seed(index))
                launch.append(RunState(key, RunKind.TUNING, 0, RunStatus.NOT_STARTED))
    elif state.phase is Phase.RERUNS:
        launch.extend(s for s in state.reruns if s.status is RunStatus.RETRY)
        launch.extend(s for s in state.reruns if s.status is RunStatus.NOT_STARTED)
    requests = tuple(_request(study, s) for s in launch[:slots])
    reason = state.reason
    if not requests and state.phase is not Phase.DONE:
        reason = f"{reason}; waiting for {len(set(in_flight))} runs in flight"
    return Decision(launch=requests, done=state.phase is Phase.DONE, phase=state.phase,
                    best_trial=state.best_trial, reason=reason, state=state)
