"""Test a study's best-at-edge flags directly: write the spec that runs each flagged best point
and the same point with one flagged value moved past its range's edge.

A best trial whose value of a searched dimension lies in the outer 10% of its range is flagged
"the optimum may lie outside the range" (batchlab.search.diagnostics.best_at_edges). Widening
the range and tuning again costs a whole study; this asks the narrower question that decides
whether the flag matters for a verdict: does a point past the edge, everything else unchanged,
score better than the best point? Each flagged study gives one arm with its best point exactly
(``<optimizer>_r<replicate>_best``) and one arm per flag with that value moved past the edge
(``..._<dimension>_beyond``), each one fixed trial rerun with the study's seeds per best; each
"beyond" arm is compared with its best arm.

How far past: a quarter of the range's width beyond the edge, in decades on a log scale (for
[1e-6, 1e-3], 10**-0.75 times the lower edge), in units on a linear scale (a lower edge above 0
whose quarter-width step would cross 0 is divided by 2.5 instead, so that values that must
stay positive do); for ``one_minus`` dimensions the searched quantity (1 - value) moves, and
stays at or below 0.9. A dimension with no value left past its edge (discrete, an integer range
at 1, 1 - value already at 0.9) is skipped; a spec whose moved values the optimizer refuses
is an error naming them.

    python scripts/edge_spec.py results/reproduction/momentum_large_batch [--replicate 0] \
        > experiments/reproduction/momentum_large_batch_edges.yaml

The spec's name and its output folder follow the input folder's (NAME -> NAME_edges). It keeps
the input spec's workload, target and cadence; every flagged study must be at one point.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from batchlab.optim.config import without_total_steps
from batchlab.paths import set_path
from batchlab.search import expand_studies, load_spec
from batchlab.search.diagnostics import EdgeFlag, best_at_edges
from batchlab.search.space import Scale


def beyond(flag: EdgeFlag) -> float | None:
    """The flagged value moved past its edge (as the config holds it), or None to skip: a
    discrete dimension, or one where no value past the edge is left (an integer range at 1,
    1 - momentum capped at 0.9)."""
    parameter = flag.parameter
    if parameter.scale is Scale.DISCRETE or parameter.low is None or parameter.high is None:
        return None
    low, high = parameter.low, parameter.high
    if parameter.scale is Scale.LOG:
        factor = (high / low) ** 0.25
        raw = low / factor if flag.side == "lower" else high * factor
    elif flag.side == "lower":
        step = (high - low) / 4
        raw = low / 2.5 if 0 < low <= step else low - step
    else:
        raw = high + (high - low) / 4
    if parameter.one_minus:
        raw = min(raw, 0.9)
    if parameter.integer:
        raw = round(raw)
    if low <= raw <= high or (low > 0 and raw <= 0):
        return None
    return 1.0 - raw if parameter.one_minus else raw


def _short(path: str) -> str:
    """A dimension's name for arm names: the config path without "optimizer." and
    "learning_rate." ("weights.warmup_power", "bias_bn.peak_value", "gamma_0")."""
    parts = [p for p in path.split(".") if p not in ("optimizer", "workload", "learning_rate")]
    return "_".join(parts)


def _fixed_workload(values: dict[str, Any], spec_values: dict[str, Any]) -> list[dict[str, Any]]:
    """Fixed search parameters for the workload hyperparameters that differ from the spec's."""
    return [{"path": f"workload.{k}", "fixed": {"value": v}}
            for k, v in sorted(values.items()) if spec_values.get(k) != v]


def edge_spec(results: Path, replicates: set[int] | None = None) -> tuple[dict[str, Any], str]:
    """The spec testing every flagged best point of ``results``, and its header comment."""
    experiment = json.loads((results / "experiment.json").read_text())
    base = experiment["spec"]
    studies = {s.id: s for s in expand_studies(load_spec(base))}
    arms: list[dict[str, Any]] = []
    comparisons: list[dict[str, str]] = []
    points: set[tuple[int, int]] = set()
    lines: list[str] = []
    workloads = {w["workload"]: w for w in base["workloads"]}
    workload_names: set[str] = set()
    for path in sorted((results / "studies").glob("*.json")):
        stored = json.loads(path.read_text())
        study = studies.get(path.stem)
        best = stored.get("best_trial")
        if study is None or best is None or (replicates is not None and study.replicate not in replicates):
            continue
        moves = [(f, moved) for f in best_at_edges(study, best) if (moved := beyond(f)) is not None]
        if not moves:
            continue
        points.add((study.batch_size, study.step_budget))
        workload_names.add(study.workload)
        workload_hp = dict(workloads[study.workload].get("hyperparameters", {}))
        hyperparameters = study.hyperparameters(best)
        prefix = f"{study.optimizer}_r{study.replicate}"
        config = without_total_steps(hyperparameters["optimizer"])
        arms.append({"name": f"{prefix}_best",
                     "description": f"best trial {best} of {study.id}",
                     "config": config,
                     "search_space": {"parameters": _fixed_workload(hyperparameters["workload"], workload_hp)}})
        lines.append(f"# {study.id}, best trial {best}:")
        for flag, moved in moves:
            mapping = {"optimizer": copy.deepcopy(config), "workload": dict(hyperparameters["workload"])}
            for target in flag.parameter.paths:
                set_path(mapping, target, moved)
            name = f"{prefix}_{_short(flag.parameter.path)}_beyond"
            arms.append({"name": name,
                         "description": f"{prefix}_best with {flag.parameter.path} = {moved:.4g}",
                         "config": mapping["optimizer"],
                         "search_space": {"parameters": _fixed_workload(mapping["workload"], workload_hp)}})
            comparisons.append({"a": name, "b": f"{prefix}_best"})
            shown = (f"1 - {flag.parameter.path} = {1.0 - flag.value:.4g}" if flag.parameter.one_minus
                     else f"{flag.parameter.path} = {flag.value:.4g}")
            lines.append(f"#   {shown} lies {flag.where}; {name} sets {flag.parameter.path} to "
                         f"{moved:.4g}")
    if not arms:
        raise SystemExit(f"no best-at-edge flag to test in {results}")
    if len(points) > 1 or len(workload_names) > 1:
        raise SystemExit(f"flagged studies at several workloads or points "
                         f"({sorted(workload_names)}, {sorted(points)}): an edge spec runs every "
                         "arm at one point; split the results folder")
    ((batch_size, step_budget),) = points
    (workload_name,) = workload_names
    workload = copy.deepcopy(workloads[workload_name])
    workload["points"] = [{"batch_size": batch_size, "step_budget": step_budget}]
    stem = f"{results.name}_edges"
    spec = {
        "name": "repro-" + re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-"),
        "description": (f"The best-at-edge flags of {results.name} tested: each flagged best point "
                        "against the same point with one flagged value moved past its edge."),
        "search_seed": base["search_seed"],
        "trials_per_study": 1,
        "max_total_trials": 1,
        "seeds_per_best": base.get("seeds_per_best", 7),
        "selection": base.get("selection", "BEST_VALIDATION_METRIC"),
        "max_attempts": base.get("max_attempts", 2),
        "resources": base.get("resources", {"cpus": 1}),
        "comparisons": comparisons,
        "workloads": [workload],
        "optimizers": arms,
    }
    try:
        load_spec(spec)
    except ValueError as error:  # SpecError: a value past an edge the optimizer refuses
        raise SystemExit(f"the edge spec of {results} is not valid: {error}") from error
    header = "\n".join([
        f"# The best-at-edge flags of {results.name}.yaml, tested: does a point past the edge,",
        "# everything else unchanged, score better than the flagged best point? Written by",
        f"# scripts/edge_spec.py from {results} (its rule for how far past is in its docstring):",
        *lines,
        "#",
        f"#   batchlab local run experiments/reproduction/{stem}.yaml --out results/reproduction/{stem}",
        "",
    ])
    return spec, header


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results folder written by `batchlab local run`")
    parser.add_argument("--replicate", type=int, action="append", default=None,
                        help="only this search replicate's studies (repeatable; default: all)")
    args = parser.parse_args(argv)
    spec, header = edge_spec(args.results, set(args.replicate) if args.replicate else None)
    sys.stdout.write(header + yaml.safe_dump(spec, sort_keys=False, width=100))


if __name__ == "__main__":
    main()
