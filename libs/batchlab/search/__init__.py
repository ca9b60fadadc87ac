"""batchlab.search: search spaces, quasi-random search, the study protocol and scoring.

No JAX here: the controller service, which installs none, drives studies with this package.
The spec loader (batchlab.search.spec) needs the generated protobuf code and loads on first use.

    spec = load_spec("experiments/examples/minimal.yaml")
    for study in expand_studies(spec):
        decision = next_runs(study, records, in_flight=running, parallelism=4)
        ...  # launch decision.launch, record results, repeat until decision.done
        score = score_study(study, records)

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check".
  Bousquet et al. 2017, "Critical Hyper-Parameters: No Random, No Cry".
"""

from __future__ import annotations

import importlib
from typing import Any

from batchlab.paths import set_path
from batchlab.search.halton import HALTON_SKIP, halton_point, halton_points
from batchlab.search.protocol import (
    Decision,
    Phase,
    ProtocolError,
    RunKey,
    RunKind,
    RunRecord,
    RunRequest,
    RunState,
    RunStatus,
    StudyState,
    next_runs,
    request_differences,
    request_for,
    select_best,
    study_state,
    unfilled_runs,
)
from batchlab.search.scoring import (
    Effort,
    MetricSummary,
    SeedSummary,
    StudyScore,
    score_study,
    steps_to_target,
    summarize_metric,
    summarize_seeds,
)
from batchlab.search.space import (
    Scale,
    SearchParameter,
    SearchSpace,
    SpecError,
    parse_search_space,
)
from batchlab.search.study import Selection, Study, trial_hyperparameters
from batchlab.targets import Goal, Outcome, Target

# Loaded on first use: they need the generated protobuf code.
_LAZY = {
    "ExperimentSpec", "expand_studies", "load_spec", "parse_spec", "spec_to_dict", "study_id",
    "validate_spec",
}

__all__ = [
    "Decision",
    "Effort",
    "ExperimentSpec",
    "Goal",
    "HALTON_SKIP",
    "MetricSummary",
    "Outcome",
    "Phase",
    "ProtocolError",
    "RunKey",
    "RunKind",
    "RunRecord",
    "RunRequest",
    "RunState",
    "RunStatus",
    "Scale",
    "SearchParameter",
    "SearchSpace",
    "SeedSummary",
    "Selection",
    "SpecError",
    "Study",
    "StudyScore",
    "StudyState",
    "Target",
    "expand_studies",
    "halton_point",
    "halton_points",
    "load_spec",
    "next_runs",
    "request_differences",
    "request_for",
    "parse_search_space",
    "parse_spec",
    "score_study",
    "select_best",
    "set_path",
    "unfilled_runs",
    "spec_to_dict",
    "steps_to_target",
    "study_id",
    "study_state",
    "summarize_metric",
    "summarize_seeds",
    "trial_hyperparameters",
    "validate_spec",
]

def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("batchlab.search.spec"), name)
    raise AttributeError(f"module 'batchlab.search' has no attribute {name!r}")
