"""Stage 2 of the CPU reproduction's Figure 4 ablations: write the spec from stage 1's best trial.

Reads the best trial of results/reproduction/ablation_base_160 (Nesterov at batch 1,024 x 160
with gamma_0 tuned; experiments/reproduction/ablation_base_160.yaml) and prints
experiments/reproduction/ablations_160.yaml: that point ("base") and three copies that each
change one detail, as in Nado et al. 2021, Appendix C, Figure 4 (no retuning: the same point
with one thing changed):

- ``bn_init``: gamma_0 = 1.0 instead of the tuned value;
- ``full_batch_bn``: batch norm over the whole batch instead of virtual batches of 32;
- ``l2_all``: the weights' L2 coefficient applied to biases and BN parameters too.

Each arm is one fixed trial rerun with 7 seeds; each ablation is compared with the base.

    python scripts/ablation_spec.py results/reproduction/ablation_base_160 > experiments/reproduction/ablations_160.yaml

The stage-2 spec's name and file follow the stage-1 folder's (ablation_base_160 -> ablations_160).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from batchlab.optim.config import without_total_steps


def _fixed(path: str, value: Any) -> dict[str, Any]:
    return {"path": path, "fixed": {"value": value}}


def spec_from_base(base_dir: Path) -> tuple[dict[str, Any], str]:
    experiment = json.loads((base_dir / "experiment.json").read_text())
    # ablation_base -> ablations, ablation_base_160 -> ablations_160 (specs and folders alike).
    stem = base_dir.name.replace("ablation_base", "ablations")
    (study_file,) = sorted((base_dir / "studies").glob("*.json"))
    study = json.loads(study_file.read_text())
    best = study["best_hyperparameters"]
    base_spec = experiment["spec"]
    optimizer = without_total_steps(best["optimizer"])
    gamma_0 = float(best["workload"]["gamma_0"])
    weight_decay = optimizer["weights"]["weight_decay"]
    l2_all = copy.deepcopy(optimizer)
    l2_all["bias_bn"]["weight_decay"] = weight_decay

    workload = copy.deepcopy(base_spec["workloads"][0])

    def arm(name: str, description: str, config: dict[str, Any], *, gamma: float,
            virtual_batch_size: int = 32) -> dict[str, Any]:
        parameters = [_fixed("workload.gamma_0", gamma),
                      _fixed("workload.virtual_batch_size", virtual_batch_size)]
        if not virtual_batch_size and workload.get("hyperparameters", {}).get("microbatch_size"):
            # BN over the whole batch needs the batch in one pass (a microbatch would be
            # normalised over fewer examples): this arm runs without gradient accumulation.
            parameters.append(_fixed("workload.microbatch_size", 0))
        return {"name": name, "description": description, "config": config,
                "search_space": {"parameters": parameters}}

    spec = {
        "name": "repro-" + stem.replace("_", "-"),
        "description": ("Figure 4's ablations around the tuned Nesterov point of ablation_base: "
                        "gamma_0 = 1, full-batch BN, L2 on every parameter."),
        "search_seed": base_spec["search_seed"],
        "trials_per_study": 1,
        "max_total_trials": 1,
        "seeds_per_best": 7,
        "selection": base_spec["selection"],
        "max_attempts": 2,
        "resources": base_spec.get("resources", {"cpus": 1}),
        "comparisons": [{"a": "base", "b": other} for other in ("bn_init", "full_batch_bn", "l2_all")],
        "workloads": [workload],
        "optimizers": [
            arm("base", f"ablation_base's best trial {study['best_trial']}", optimizer, gamma=gamma_0),
            arm("bn_init", "the base point with gamma_0 = 1", copy.deepcopy(optimizer), gamma=1.0),
            arm("full_batch_bn", "the base point with BN over the whole batch",
                copy.deepcopy(optimizer), gamma=gamma_0, virtual_batch_size=0),
            arm("l2_all", "the base point with its L2 on biases and BN too", l2_all, gamma=gamma_0),
        ],
    }
    header = (
        "# Claim (f) of the CPU reproduction, stage 2 of 2: Figure 4's ablations (Nado et al. 2021,\n"
        f"# Appendix C) around the best trial of {base_dir.name}.yaml, one detail changed at a time and\n"
        "# no retuning, each arm rerun with 7 seeds. Written by scripts/ablation_spec.py from\n"
        f"# {base_dir} (best trial {study['best_trial']} of {study_file.stem}, gamma_0 = {gamma_0:.4g}).\n"
        "#\n"
        f"#   batchlab local run experiments/reproduction/{stem}.yaml --out results/reproduction/{stem}\n")
    return spec, header


def main() -> None:
    spec, header = spec_from_base(Path(sys.argv[1]))
    sys.stdout.write(header + yaml.safe_dump(spec, sort_keys=False, width=100))


if __name__ == "__main__":
    main()
