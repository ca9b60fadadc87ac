"""The paper's configurations: optim/paper.py against the paper's tables, and the spec files
under experiments/paper/ against optim/paper.py, field by field (one source of truth).

The expected numbers below are typed from the paper (Nado et al. 2021: Section 2.1.4, Tables 5,
7 and 20-23, Appendix B.2), not computed from paper.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchlab import optim
from batchlab.optim.paper import PAPER_CONFIGS, PAPER_SPECS, PaperConfig, paper_config
from batchlab.paths import get_path
from batchlab.search import expand_studies, load_spec, spec_to_dict
from batchlab.search.warm_start import warm_start_of
from batchlab.train.workloads import workload_names

PAPER_DIR = Path(__file__).resolve().parents[2] / "experiments" / "paper"
SPEC_FILES = sorted(p.name for p in PAPER_DIR.glob("*.yaml"))


# ----------------------------------------------------------------- paper.py vs the paper


def test_configuration_a_schedule_starts_at_eta_init_012():
    """Section 2.1.4's formula with Table 5's A column and eta_init = 0.12 (Tables 21-23)."""
    lr = optim.learning_rate_fn(paper_config("nesterov_a_32k").optimizer)
    # t = 0: eta_init.
    np.testing.assert_allclose(float(lr(0)), 0.12, rtol=1e-6)
    # t = 319, half of t_warmup = 638: 0.12 + (7.05 - 0.12) * 0.5 ** 2.497 = 1.3476126.
    np.testing.assert_allclose(float(lr(319)), 1.3476126, rtol=1e-5)
    # t = t_warmup: eta_peak; t = T: eta_final.
    np.testing.assert_allclose(float(lr(638)), 7.05, rtol=1e-6)
    np.testing.assert_allclose(float(lr(2512)), 6e-6, rtol=1e-5)
    # Configuration B keeps the LARS pipeline's eta_init = 0 (Appendix C, "BN & LR tuning").
    assert float(optim.learning_rate_fn(paper_config("nesterov_b_32k").optimizer)(0)) == 0.0


def test_configuration_a_spec_runs_the_same_schedule():
    """The run a spec file launches (trial 0's config, as the study protocol builds it)."""
    (study,) = expand_studies(load_spec(PAPER_DIR / "nesterov_a_32k.yaml"))
    config = study.hyperparameters(0)["optimizer"]
    for group in ("weights", "bias_bn"):
        lr = optim.learning_rate_fn(config[group])
        np.testing.assert_allclose([float(lr(0)), float(lr(319))], [0.12, 1.3476126], rtol=1e-5)


# Table 5: t_warmup, p_warmup, p_decay, rho, epsilon, eta_peak, eta_final, 1 - mu, lambda, tau,
# gamma_0; and eta_init (Section 2.1.4 for LARS and B, Tables 21-23 for A).
TABLE5 = {
    "nesterov_a_32k": (638, 2.497, 1.955, 0.94, 4e-6, 7.05, 6e-6, 0.02397, 5.8e-5, 0.15, 0.4138, 0.12),
    "nesterov_b_32k": (706, 2.0, 2.0, 0.9, 1e-5, 7.05, 6e-6, 0.02397, 5.8e-5, 0.15, 0.4138, 0.0),
    "lars_pipeline_32k": (706, 1.0, 2.0, 0.9, 1e-5, 29.0, 1e-4, 0.071, 1e-4, 0.10, 0.0, 0.0),
}


@pytest.mark.parametrize("name", sorted(TABLE5))
def test_table5_columns(name):
    cfg = paper_config(name)
    tw, pw, pd, rho, eps, peak, final, one_minus_mu, l2, tau, gamma_0, init = TABLE5[name]
    for group in ("weights", "bias_bn"):
        lr = cfg.optimizer[group]["learning_rate"]
        assert (lr["warmup_steps"], lr["total_steps"]) == (tw, 2512)
        assert (lr["warmup_power"], lr["decay_power"]) == (pw, pd)
        assert (lr["init_value"], lr["peak_value"], lr["end_value"]) == (init, peak, final)
        assert math.isclose(1.0 - cfg.optimizer[group]["momentum"], one_minus_mu, rel_tol=1e-9)
    # Section 2.1.3: L2 on the weights only.
    assert cfg.optimizer["weights"]["weight_decay"] == l2
    assert "weight_decay" not in cfg.optimizer["bias_bn"]
    hp = cfg.hyperparameters
    assert (hp["bn_momentum"], hp["bn_epsilon"], hp["label_smoothing"], hp["gamma_0"]) == (rho, eps, tau, gamma_0)
    assert (cfg.batch_size, cfg.total_steps, hp["virtual_batch_size"]) == (32768, 2512, 64)


# Table 7: batch, phase, sequence length, warmup, steps, learning rate, beta_1, beta_2, lambda, p;
# and the phase-1 row each phase-2 row continues (Section 3, Table 3's three regimes).
TABLE7 = {
    "bert_adam_b32k_phase1": (32768, 1, 128, 3125, 14063, 5.9415e-4, 0.934271, 0.989295, 0.31466, 1, None),
    "bert_adam_b32k_phase2": (32768, 2, 512, 781, 1562, 2.8464e-4, 0.963567, 0.952647, 0.31466, 1, "bert_adam_b32k_phase1"),
    "bert_adam_b65k_phase1": (65536, 1, 128, 2000, 7037, 1.3653e-3, 0.952378, 0.86471, 0.19891, 2, None),
    "bert_adam_b65k32k_phase2": (32768, 2, 512, 781, 1562, 2.8464e-4, 0.952647, 0.963567, 0.19891, 2, "bert_adam_b65k_phase1"),
    "bert_adam_b65k_phase2": (65536, 2, 512, 390, 781, 6.1951e-5, 0.65322, 0.82451, 0.19891, 2, "bert_adam_b65k_phase1"),
}


@pytest.mark.parametrize("name", sorted(TABLE7))
def test_table7_rows(name):
    batch, phase, seq, warmup, steps, lr, b1, b2, wd, p, parent = TABLE7[name]
    cfg = paper_config(name)
    assert (cfg.workload, cfg.batch_size, cfg.total_steps) == (f"bert_large_phase{phase}", batch, steps)
    assert cfg.hyperparameters["max_seq_length"] == seq
    assert cfg.continues_from == parent
    for group in ("weights", "bias_bn"):
        g = cfg.optimizer[group]
        s = g["learning_rate"]
        assert (s["warmup_steps"], s["total_steps"], s["peak_value"], s["end_value"]) == (warmup, steps, lr, 0.0)
        assert s["warmup_power"] == s["decay_power"] == p
        assert (g["optimizer"], g["b1"], g["b2"], g["eps"]) == ("adam", b1, b2, 1e-11)
    # As in the BERT code, no weight decay on LayerNorm parameters and biases.
    assert cfg.optimizer["weights"]["weight_decay"] == wd and "weight_decay" not in cfg.optimizer["bias_bn"]


def test_the_three_bert_regimes_add_up_to_table3_step_budgets():
    # Table 3: 15,625 steps at 32k, 8,599 at 65k/32k, 7,818 at 65k (phase 1 + phase 2).
    totals = {
        name: cfg.total_steps + PAPER_CONFIGS[cfg.continues_from].total_steps
        for name, cfg in PAPER_CONFIGS.items() if cfg.continues_from
    }
    assert totals == {"bert_adam_b32k_phase2": 15625, "bert_adam_b65k32k_phase2": 8599, "bert_adam_b65k_phase2": 7818}


# ------------------------------------------------------- spec files vs paper.py, field by field


def _differences(got: Any, want: Any, path: str = "") -> list[str]:
    """Where two plain-data trees differ; numbers compare by value, but a bool is only a bool."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path}: {got!r} is not a mapping"]
        out = [f"{path}.{k}: missing" for k in want if k not in got]
        out += [f"{path}.{k}: not in the paper's config" for k in got if k not in want]
        for k in want:
            if k in got:
                out += _differences(got[k], want[k], f"{path}.{k}")
        return out
    if isinstance(want, list | tuple):
        if not isinstance(got, list | tuple) or len(got) != len(want):
            return [f"{path}: {got!r} != {want!r}"]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in _differences(g, w, f"{path}[{i}]")]
    if isinstance(want, bool) or isinstance(got, bool):
        return [] if got is want else [f"{path}: {got!r} != {want!r}"]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def test_differences_sees_every_kind_of_change():
    want = {"a": 1.0, "b": [1, 2], "c": {"d": True}}
    assert _differences({"a": 1, "b": [1, 2], "c": {"d": True}}, want) == []
    assert _differences({"a": 1.5, "b": [1, 2], "c": {"d": True}}, want) == [".a: 1.5 != 1.0"]
    assert _differences({"a": 1.0, "b": [1], "c": {"d": True}}, want) == [".b: [1] != [1, 2]"]
    assert _differences({"a": 1.0, "b": [1, 2], "c": {"d": 1}}, want) == [".c.d: 1 != True"]
    assert sorted(_differences({"a": 1.0, "b": [1, 2], "c": {}, "e": 0}, want)) == [".c.d: missing", ".e: not in the paper's config"]


def test_every_spec_file_is_declared_and_every_declaration_has_a_file():
    assert set(SPEC_FILES) == set(PAPER_SPECS), (
        f"files without a PAPER_SPECS entry: {sorted(set(SPEC_FILES) - set(PAPER_SPECS))}; "
        f"entries without a file: {sorted(set(PAPER_SPECS) - set(SPEC_FILES))}"
    )


def test_every_paper_config_is_encoded_by_a_spec_file():
    used = {arm.config for spec in PAPER_SPECS.values() for arm in spec.arms.values() if arm.config}
    assert used == set(PAPER_CONFIGS), f"not in any spec file: {sorted(set(PAPER_CONFIGS) - used)}"
    unexplained = [
        (f, label) for f, s in PAPER_SPECS.items() for label, arm in s.arms.items()
        if arm.config is None and not arm.reason
    ]
    assert unexplained == []


def _load(file: str):
    spec = load_spec(PAPER_DIR / file, known_workloads=set(workload_names()))
    return spec, spec_to_dict(spec), expand_studies(spec)


def _paper_point(file: str) -> PaperConfig:
    configs = [PAPER_CONFIGS[a.config] for a in PAPER_SPECS[file].arms.values() if a.config]
    points = {(c.workload, c.batch_size, c.total_steps, tuple(sorted(c.hyperparameters.items()))) for c in configs}
    assert len(points) == 1, f"{file}: its paper configs disagree on workload/point: {points}"
    return configs[0]


@pytest.mark.parametrize("file", SPEC_FILES)
def test_spec_file_encodes_its_paper_configs(file):
    declared = PAPER_SPECS[file]
    spec, data, studies = _load(file)
    assert {o.name for o in spec.optimizers} == set(declared.arms)
    assert spec.trials_per_study == declared.trials_per_study
    if declared.seeds_per_best is not None:
        assert spec.seeds_per_best == declared.seeds_per_best
    point = _paper_point(file)
    (workload,) = data["workloads"]
    assert workload["workload"] == point.workload
    assert _differences(workload.get("hyperparameters", {}), point.hyperparameters, "hyperparameters") == []
    assert [(p["batch_size"], p["step_budget"]) for p in workload["points"]] == [(point.batch_size, point.total_steps)]

    by_label = {s.optimizer: s for s in studies}
    spaces = {o["name"]: o.get("search_space", {}).get("parameters", []) for o in data["optimizers"]}
    for label, arm in declared.arms.items():
        study = by_label[label]
        # What a run of trial 0 gets (schedule total_steps filled in as the protocol does it);
        # the searched values are the paper's best point only for a fixed arm.
        run_config = study.hyperparameters(0)["optimizer"] if not arm.search_space else dict(study.optimizer_config)
        if arm.config is None:
            continue  # not the paper's: its point and warmup are checked below for BERT
        assert _differences(spaces[label], list(arm.search_space), f"{label}.search_space") == []
        cfg = PAPER_CONFIGS[arm.config]
        assert _differences(run_config, cfg.optimizer, f"{label}.config") == []


@pytest.mark.parametrize("file", SPEC_FILES)
def test_searched_arms_contain_their_paper_point(file):
    """The paper's best point lies in the search space it came from (Tables 6 and 8)."""
    for label, arm in PAPER_SPECS[file].arms.items():
        if not (arm.config and arm.search_space):
            continue
        mapping = {"optimizer": PAPER_CONFIGS[arm.config].optimizer}
        for parameter in arm.search_space:
            for path in [parameter["path"], *parameter.get("tied_paths", [])]:
                value = get_path(mapping, path)
                if parameter.get("one_minus"):
                    value = 1.0 - value
                if "discrete" in parameter:
                    assert value in parameter["discrete"]["values"], (label, path, value)
                else:
                    scale = parameter.get("log") or parameter["linear"]
                    assert scale["min"] <= value <= scale["max"], (label, path, value, scale)


def _schedules(config: Any) -> list[dict[str, Any]]:
    if isinstance(config, dict):
        found = [config] if "schedule" in config else []
        return found + [s for v in config.values() for s in _schedules(v)]
    return []


@pytest.mark.parametrize("file", [f for f in SPEC_FILES if f.startswith("bert_")])
def test_bert_spec_runs_at_its_table7_point_with_its_warmup(file):
    """Every arm (LAMB too) at the file's own batch size, schedule length and Table 7 warmup."""
    point = _paper_point(file)
    batch, _, _, warmup, steps, *_ = TABLE7[point.name]
    _, _, studies = _load(file)
    for study in studies:
        assert (study.batch_size, study.step_budget) == (batch, steps), study.id
        for schedule in _schedules(study.hyperparameters(0)["optimizer"]):
            assert (schedule["warmup_steps"], schedule["total_steps"]) == (warmup, steps), study.id


@pytest.mark.parametrize("file", SPEC_FILES)
def test_warm_starts_continue_the_paper_configs_they_name(file):
    spec, _, _ = _load(file)
    (workload,) = spec.workloads
    ref = warm_start_of(workload)
    point = _paper_point(file)
    if point.continues_from is None:
        assert ref is None
        return
    parent = PAPER_CONFIGS[point.continues_from]
    assert (ref.workload, ref.batch_size, ref.step_budget) == (parent.workload, parent.batch_size, parent.total_steps)
    sources = [f for f in SPEC_FILES if _load(f)[0].name == ref.experiment]
    assert len(sources) == 1, f"{file}: warm_start.experiment {ref.experiment!r} is no file here"
    source_spec, _, _ = _load(sources[0])
    (source_workload,) = source_spec.workloads
    assert source_workload.keep_final_state, f"{sources[0]} must keep final states"
    # Each arm continues the same arm of the source (the warm start leaves the label out), and
    # a paper arm continues the paper config it names.
    source_arms = PAPER_SPECS[sources[0]].arms
    for label, arm in PAPER_SPECS[file].arms.items():
        assert ref.optimizer_for(label) in source_arms, (file, label)
        if arm.config:
            assert source_arms[ref.optimizer_for(label)].config == parent.name


def test_phase1_bert_files_keep_their_final_states_and_nothing_else_does():
    continued = {c.continues_from for c in PAPER_CONFIGS.values() if c.continues_from}
    for file in SPEC_FILES:
        spec, _, _ = _load(file)
        (workload,) = spec.workloads
        keeps = _paper_point(file).name in continued
        assert workload.keep_final_state == keeps, file
