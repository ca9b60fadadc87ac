"""A results folder's numbers in a stable, comparable form: the determinism contract, checkable.

The contract: the same code, spec, data and machine kind give the same numbers. `digest`
collects every number a run or a study stored that the contract covers (curves, final metrics,
outcomes, steps, seeds, hyperparameters, scores, verdicts with their bootstrap intervals) and
leaves out what legitimately varies between two executions (wall-clock timings, timestamps, the
command line, the commit).
`compare_digests` lists every difference, so `batchlab digest DIR --compare EXPECTED` tells
whether a rerun reproduced a result, and a test pins a small shipped study's numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchlab.search.protocol import RUN_FILE_PATTERN

__all__ = ["TIMING_KEYS", "compare_digests", "digest"]

# Run-result fields that measure the machine, not the training: excluded from the contract.
TIMING_KEYS = frozenset({"wall_time_s", "train_time_s", "input_wait_s", "examples_per_second",
                         "startup_time_s", "resumed_from_step"})


def _clean(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in sorted(value.items()) if k not in TIMING_KEYS}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def digest(results_dir: str | Path) -> dict[str, Any]:
    """Every number of a results folder that the determinism contract covers.

    Args:
      results_dir: a folder written by `batchlab local run` (or the controller's report).

    Returns:
      {"spec": ..., "runs": {"<study>/<file>": {"request", "result"}},
       "studies": {"<study>": {...}}, "verdicts": {"<workload>/b<B>/s<S>/<a> vs <b>": {...}},
       "machine_kinds": [the machine kind of each session that ran in the folder]},
      with timings removed and keys sorted.

    Raises:
      FileNotFoundError: no experiment.json in the folder.
    """
    root = Path(results_dir)
    experiment = json.loads((root / "experiment.json").read_text())
    runs = {}
    for path in sorted((root / "runs").glob(f"*/{RUN_FILE_PATTERN}")):
        stored = json.loads(path.read_text())
        # Which session and code wrote the file is provenance, not a result (and names the
        # commit, which every commit changes).
        stored.pop("written_by", None)
        runs[f"{path.parent.name}/{path.name}"] = _clean(stored)
    studies = {path.stem: _clean(json.loads(path.read_text()))
               for path in sorted((root / "studies").glob("*.json"))}
    kinds = [session["machine_kind"] for session in experiment.get("sessions", [])
             if "machine_kind" in session]
    return {"spec": _clean(experiment.get("spec", {})), "runs": runs, "studies": studies,
            "verdicts": _verdicts(root),
            # Where the runs were made (batchlab.runner.provenance.machine_kind): the contract
            # is bit-identical numbers on the same kind only.
            "machine_kinds": [_clean(k) for i, k in enumerate(kinds) if k not in kinds[:i]]}


def _verdicts(root: Path) -> dict[str, Any]:
    """Every pre-registered comparison's decision, as the report computes it (bootstrap
    intervals included: a change to the resampling or the rule changes the digest)."""
    from batchlab.report.results import load_results  # The report stack loads only here.
    from batchlab.report.verdicts import decide_point

    experiment = load_results(root)
    found: dict[str, Any] = {}
    for workload, batch_size, step_budget in experiment.points():
        for pair in decide_point(experiment, workload, batch_size, step_budget):
            verdict = pair.verdict
            found[f"{workload}/b{batch_size}/s{step_budget}/{verdict.a} vs {verdict.b}"] = _clean({
                "verdict": verdict.verdict.value, "reason": verdict.reason,
                "metric": [verdict.metric.estimate, verdict.metric.low, verdict.metric.high],
                "fraction": [verdict.fraction.estimate, verdict.fraction.low,
                             verdict.fraction.high]})
    return found


def compare_digests(actual: Mapping[str, Any], expected: Mapping[str, Any],
                    *, limit: int = 20) -> list[str]:
    """The differences between two digests, as "path: expected X, got Y" lines.

    Args:
      actual: a digest.
      expected: the reference digest.
      limit: report at most this many differences (the count of the rest is appended).

    Digests from different machine kinds ("machine_kinds") differ there, and usually in
    their numbers too: the last bits of float sums differ between CPU features, and training
    amplifies them (seen here: a validation accuracy of 0.41 against 0.4025 after 30 steps).
    """
    found: list[str] = []

    def walk(a: Any, e: Any, where: str) -> None:
        if isinstance(e, Mapping) and isinstance(a, Mapping):
            for key in sorted(set(a) | set(e)):
                if key not in a:
                    found.append(f"{where}/{key}: missing (expected {_short(e[key])})")
                elif key not in e:
                    found.append(f"{where}/{key}: unexpected ({_short(a[key])})")
                else:
                    walk(a[key], e[key], f"{where}/{key}")
        elif isinstance(e, list) and isinstance(a, list) and len(a) == len(e):
            for i, (x, y) in enumerate(zip(a, e, strict=True)):
                walk(x, y, f"{where}[{i}]")
        elif a != e:
            found.append(f"{where}: expected {_short(e)}, got {_short(a)}")

    walk(actual, expected, "")
    if len(found) > limit:
        return found[:limit] + [f"... and {len(found) - limit} more differences"]
    return found


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
