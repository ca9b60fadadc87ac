"""Warm starts in an experiment spec: which stored run initialises a workload's runs.

A workload entry may name, in ``warm_start``, a study of another experiment whose run's final
parameters (and batch statistics) initialise every run of the workload, with a fresh optimizer
state at step 0: BERT's phase 2 (sequence length 512) continues phase 1 (sequence length 128),
each phase tuned on its own (Nado et al. 2021, Section 3, Appendix B.2). The source keeps
those final states only when its workload sets ``keep_final_state``.

This module reads and checks the fields (no JAX, no I/O); finding the stored run is the
runner's job (:mod:`batchlab.runner.warm_start` for ``batchlab local run``).

Example:
  >>> from batchlab.search.spec import ExperimentSpec
  >>> spec = ExperimentSpec(name="phase2")
  >>> w = spec.workloads.add(workload="bert_large_phase2")
  >>> w.warm_start.experiment = "phase1"
  >>> warm_start_problems(spec)
  [('workloads[0].warm_start.workload', "required: the source study's workload, e.g. 'bert_large_phase1'")]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["WarmStartRef", "warm_start_of", "warm_start_problems"]

# The rules of ExperimentSpec.name, OptimizerSpec.name and workload names (search/spec.py).
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_WORKLOAD_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class WarmStartRef:
    """A parsed ``WorkloadSpec.warm_start``: the source study and trial.

    Attributes:
      experiment: the source experiment's name.
      workload: the source study's workload.
      optimizer: the source study's optimizer label; None means the label of the study being
        run (each arm continues the same arm of the source).
      batch_size: the source study's batch size; None (with step_budget None) means the
        source workload's only point.
      step_budget: the source study's step budget.
      trial: the source tuning trial; None means the source study's best trial.
    """

    experiment: str
    workload: str
    optimizer: str | None = None
    batch_size: int | None = None
    step_budget: int | None = None
    trial: int | None = None

    def optimizer_for(self, label: str) -> str:
        """The source study's optimizer label for a study labelled ``label``.

        Args:
          label: the optimizer label of the study being run.
        """
        return self.optimizer or label


def warm_start_of(workload: Any) -> WarmStartRef | None:
    """The warm start of a workload entry (a ``batchlab.v1.WorkloadSpec``), or None.

    Args:
      workload: the workload entry; its fields are assumed valid (see warm_start_problems).
    """
    if not workload.HasField("warm_start"):
        return None
    ws = workload.warm_start
    return WarmStartRef(
        experiment=ws.experiment,
        workload=ws.workload,
        optimizer=ws.optimizer or None,
        batch_size=ws.batch_size or None,
        step_budget=ws.step_budget or None,
        trial=ws.trial if ws.HasField("trial") else None,
    )


def warm_start_problems(spec: Any) -> list[tuple[str, str]]:
    """Every problem with the warm starts of a spec, as (field path, message) pairs.

    Checked here: the source experiment, workload and optimizer are well-formed names, the
    source is another experiment, and the source point is given whole or not at all. Whether
    the source exists, keeps final states and matches the model is known only when a run
    starts (the runner checks it then).

    Args:
      spec: a ``batchlab.v1.ExperimentSpec``.

    Returns:
      The problems, in field order; empty when every warm start is well-formed.
    """
    problems: list[tuple[str, str]] = []
    for i, workload in enumerate(spec.workloads):
        if not workload.HasField("warm_start"):
            continue
        where = f"workloads[{i}].warm_start"
        ws = workload.warm_start
        if not ws.experiment:
            problems.append((f"{where}.experiment", "required: the name of the experiment whose "
                             "stored run initialises this workload's runs"))
        elif not _NAME_RE.match(ws.experiment):
            problems.append((f"{where}.experiment", "must be an experiment name (1-63 lower-case "
                             f"letters, digits, '_' or '-', starting with a letter), got "
                             f"{ws.experiment!r}"))
        elif ws.experiment == spec.name:
            problems.append((f"{where}.experiment", f"names this experiment ({spec.name!r}): a "
                             "run cannot start from a result of its own experiment"))
        if not ws.workload:
            problems.append((f"{where}.workload", "required: the source study's workload, e.g. "
                             "'bert_large_phase1'"))
        elif not _WORKLOAD_RE.match(ws.workload):
            problems.append((f"{where}.workload", "must be a workload name (lower-case letters, "
                             f"digits and '_'), got {ws.workload!r}"))
        if ws.optimizer and not _NAME_RE.match(ws.optimizer):
            problems.append((f"{where}.optimizer", "must be an optimizer label (1-63 lower-case "
                             f"letters, digits, '_' or '-'), got {ws.optimizer!r}; leave it out "
                             "to continue the same label"))
        if bool(ws.batch_size) != bool(ws.step_budget):
            missing = "step_budget" if ws.batch_size else "batch_size"
            problems.append((f"{where}.{missing}", "give the source point whole (batch_size and "
                             "step_budget) or leave both out for the source workload's only "
                             "point"))
    return problems
