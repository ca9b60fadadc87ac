"""The paper's configurations as data, each reproducible by name. Pure Python: no JAX.

Each entry is a :class:`PaperConfig`: the optimizer mapping (the format of
:mod:`batchlab.optim.schema`), the workload hyperparameters it was paired with
(label smoothing tau, gamma_0, BN rho and epsilon, virtual batch size), batch
size and step budget, the search space the paper tuned it in, the configuration
whose final parameters it starts from (BERT phase 2), and the table it comes from.

:data:`PAPER_SPECS` links the experiment specs under ``experiments/paper/`` to these
configurations, arm by arm; tests/optim/test_paper_specs.py checks that every spec
file encodes exactly what it names here, field by field, so this module stays the one
source of truth.

References:
  Nado et al. 2021: Table 1 and Table 5 (ResNet-50, batch 32,768, 2,512 steps),
  Section 2.1.4 and Tables 20-23 (configuration A's eta_init), Tables 6 and 7 and
  Appendix B.2 (BERT-Large Adam phases), Table 8 (6,000-step cosine runs, best points
  and final ranges).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PAPER_CONFIGS",
    "PAPER_SPECS",
    "TABLE6_SEARCH_SPACE",
    "PaperArm",
    "PaperConfig",
    "PaperSpec",
    "paper_config",
    "table1_differences",
]


@dataclass(frozen=True)
class PaperConfig:
    """One configuration from the paper.

    Attributes:
      name: the key in :data:`PAPER_CONFIGS`.
      source: the table (and column) it comes from.
      workload: the registered workload it trains.
      batch_size: examples per step.
      total_steps: the step budget (the schedules' T).
      optimizer: the optimizer mapping (:mod:`batchlab.optim.schema`).
      hyperparameters: the workload hyperparameters it was paired with.
      notes: anything a reader needs to know to reproduce it.
      search_space: the paper's search space whose best point this is, as the parameters of
        an experiment spec's ``search_space`` (Table 8's final ranges); empty when the paper
        gives the point without its search space here.
      continues_from: the configuration whose final parameters initialise this one (BERT
        phase 2 continues phase 1, Appendix B.2); None for training from scratch.
    """

    name: str
    source: str
    workload: str
    batch_size: int
    total_steps: int
    optimizer: dict[str, Any]
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    search_space: tuple[dict[str, Any], ...] = ()
    continues_from: str | None = None


def _poly(
    init: float,
    peak: float,
    end: float,
    warmup: int,
    total: int,
    p_warmup: float,
    p_decay: float,
) -> dict[str, Any]:
    return {
        "schedule": "piecewise_polynomial",
        "init_value": init,
        "peak_value": peak,
        "end_value": end,
        "warmup_steps": warmup,
        "total_steps": total,
        "warmup_power": p_warmup,
        "decay_power": p_decay,
    }


def _resnet_hparams(tau: float, gamma_0: float, rho: float, eps: float) -> dict[str, Any]:
    return {
        "label_smoothing": tau,
        "gamma_0": gamma_0,
        "bn_momentum": rho,
        "bn_epsilon": eps,
        "virtual_batch_size": 64,
    }


def _table5() -> list[PaperConfig]:
    # Table 5 columns: t_warmup, p_warmup, p_decay, rho, eps, eta_peak, eta_final, 1-mu, lambda,
    # tau, gamma_0, and eta_init, which Table 5 leaves out: the LARS pipeline's is 0.0
    # (Section 2.1.4) and configuration B keeps it (Section 2.1.4, Appendix C: B sets eta_0 to
    # the LARS value); configuration A's was fixed at 0.12 in its last searches (Tables 21-23,
    # t_warmup 638 and eta_peak 7.05 there as in Table 5).
    rows = {
        "lars_pipeline_32k": ("lars", 706, 1.0, 2.0, 0.9, 1e-5, 29.0, 1e-4, 0.071, 1e-4, 0.10, 0.0, 0.0),
        "nesterov_a_32k": ("nesterov", 638, 2.497, 1.955, 0.94, 4e-6, 7.05, 6e-6, 0.02397, 5.8e-5, 0.15, 0.4138, 0.12),
        "nesterov_b_32k": ("nesterov", 706, 2.0, 2.0, 0.9, 1e-5, 7.05, 6e-6, 0.02397, 5.8e-5, 0.15, 0.4138, 0.0),
    }
    out = []
    for name, (opt, tw, pw, pd, rho, eps, peak, final, one_minus_mu, l2, tau, g0, init) in rows.items():
        lr = _poly(init, peak, final, tw, 2512, pw, pd)
        momentum = round(1.0 - one_minus_mu, 10)
        bias_opt = "heavy_ball" if opt == "lars" else opt
        optimizer = {
            "weights": {"optimizer": opt, "learning_rate": lr, "momentum": momentum, "weight_decay": l2},
            # Section 2.1.3: no L2 and no LARS on biases and BN parameters.
            "bias_bn": {"optimizer": bias_opt, "learning_rate": dict(lr), "momentum": momentum},
        }
        if opt == "lars":
            optimizer["weights"].update(trust_coefficient=0.001, eps=0.0, variant="mlperf")
        out.append(
            PaperConfig(
                name=name,
                source="Table 5" + (" (LARS column; Kumar et al. 2019)" if opt == "lars" else ""),
                workload="imagenet_resnet50",
                batch_size=32768,
                total_steps=2512,
                optimizer=optimizer,
                hyperparameters=_resnet_hparams(tau, g0, rho, eps),
            )
        )
    return out


# Table 6: the space Adam was tuned in for every BERT phase, as experiment-spec parameters of a
# {"weights", "bias_bn"} config: one learning rate, beta_1 and beta_2 for both groups, weight
# decay on the weights only, and one polynomial power p for warmup and decay of both.
_W, _B = "optimizer.weights", "optimizer.bias_bn"
TABLE6_SEARCH_SPACE: tuple[dict[str, Any], ...] = (
    {"path": f"{_W}.learning_rate.peak_value", "tied_paths": [f"{_B}.learning_rate.peak_value"],
     "log": {"min": 1e-5, "max": 1.0}},
    {"path": f"{_W}.b1", "tied_paths": [f"{_B}.b1"], "log": {"min": 1e-2, "max": 0.5},
     "one_minus": True},
    {"path": f"{_W}.b2", "tied_paths": [f"{_B}.b2"], "log": {"min": 1e-2, "max": 0.5},
     "one_minus": True},
    {"path": f"{_W}.weight_decay", "log": {"min": 1e-3, "max": 10.0}},
    {"path": f"{_W}.learning_rate.warmup_power",
     "tied_paths": [f"{_W}.learning_rate.decay_power", f"{_B}.learning_rate.warmup_power",
                    f"{_B}.learning_rate.decay_power"],
     "discrete": {"values": [1, 2]}},
)


def _table7() -> list[PaperConfig]:
    # batch, phase, seq len, warmup, steps, lr, b1, b2, lambda, p  (eps 1e-11 for all trials),
    # and the phase-1 row a phase-2 row continues (Section 3: 32k; 65k then 32k; 65k).
    rows = {
        "bert_adam_b32k_phase1": (32768, 1, 128, 3125, 14063, 5.9415e-4, 0.934271, 0.989295, 0.31466, 1, None),
        "bert_adam_b32k_phase2": (32768, 2, 512, 781, 1562, 2.8464e-4, 0.963567, 0.952647, 0.31466, 1, "bert_adam_b32k_phase1"),
        "bert_adam_b65k_phase1": (65536, 1, 128, 2000, 7037, 1.3653e-3, 0.952378, 0.86471, 0.19891, 2, None),
        "bert_adam_b65k32k_phase2": (32768, 2, 512, 781, 1562, 2.8464e-4, 0.952647, 0.963567, 0.19891, 2, "bert_adam_b65k_phase1"),
        "bert_adam_b65k_phase2": (65536, 2, 512, 390, 781, 6.1951e-5, 0.65322, 0.82451, 0.19891, 2, "bert_adam_b65k_phase1"),
    }
    out = []
    for name, (batch, phase, seq, warmup, steps, lr, b1, b2, wd, p, parent) in rows.items():
        schedule = _poly(0.0, lr, 0.0, warmup, steps, float(p), float(p))
        group = {"optimizer": "adam", "learning_rate": schedule, "b1": b1, "b2": b2, "eps": 1e-11}
        out.append(
            PaperConfig(
                name=name,
                source="Table 7",
                workload=f"bert_large_phase{phase}",
                batch_size=batch,
                total_steps=steps,
                optimizer={
                    "weights": {**group, "weight_decay": wd},
                    # As in the BERT code, no decay on LayerNorm parameters and biases.
                    "bias_bn": {**group, "learning_rate": dict(schedule)},
                },
                hyperparameters={"max_seq_length": seq},
                notes="p is the polynomial power of both warmup and decay. The best of 30 trials "
                "in Table 6's space (130 for phase 2 at batch 65,536), selected by masked-LM "
                "accuracy on 10k training examples (Appendix B.2).",
                continues_from=parent,
            )
        )
    return out


def _table8() -> list[PaperConfig]:
    def cos(lr: float) -> dict[str, Any]:
        return {"schedule": "cosine", "peak_value": lr, "total_steps": 6000}

    def group(opt: str, lr: float, **kw: float) -> dict[str, Any]:
        return {"optimizer": opt, "learning_rate": cos(lr), **kw}

    def final_ranges(
        grouped: bool, lr_range: tuple[float, float], wd_range: tuple[float, float]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        # Table 8's "Final Range", all on a log scale; with two groups the bias/BN learning
        # rate follows the weights' (lambda is 0 there, Appendix D.3).
        if grouped:
            lr = {"path": f"{_W}.learning_rate.peak_value", "tied_paths": [f"{_B}.learning_rate.peak_value"]}
            wd = {"path": f"{_W}.weight_decay"}
        else:
            lr = {"path": "optimizer.learning_rate.peak_value"}
            wd = {"path": "optimizer.weight_decay"}
        return (
            {**lr, "log": {"min": lr_range[0], "max": lr_range[1]}},
            {**wd, "log": {"min": wd_range[0], "max": wd_range[1]}},
        )

    momentum = {"nesterov": 0.98, "lars": 0.929, "heavy_ball": 0.929}
    rows = {
        # One optimizer on every parameter: lambda on every parameter.
        "table8_nesterov": (
            group("nesterov", 1.173, momentum=0.98, weight_decay=3.026e-4),
            final_ranges(False, (0.8, 3.0), (3e-4, 1e-3)),
        ),
        "table8_lars_lars": (
            group("lars", 14.18, momentum=0.929, weight_decay=5.278e-5),
            final_ranges(False, (10.0, 30.0), (5e-5, 5e-4)),
        ),
        "table8_adam_eps1e-8": (
            group("adam", 0.004596, eps=1e-8, weight_decay=0.6182),
            final_ranges(False, (4e-3, 2e-2), (0.2, 1.0)),
        ),
        "table8_adam_eps1e-6": (
            group("adam", 3.332e-3, eps=1e-6, weight_decay=1.055),
            final_ranges(False, (3e-3, 1e-2), (0.5, 2.0)),
        ),
        "table8_lamb_lamb": (
            group("lamb", 0.01134, weight_decay=0.02657),
            final_ranges(False, (4e-3, 5e-2), (1e-2, 0.1)),
        ),
        # A different optimizer on bias/BN: lambda = 0 there (Appendix D.3).
        "table8_lars_momentum": (
            {
                "weights": group("lars", 14.49, momentum=momentum["lars"], weight_decay=1.708e-4),
                "bias_bn": group("heavy_ball", 14.49, momentum=momentum["heavy_ball"]),
            },
            final_ranges(True, (10.0, 40.0), (5e-5, 2e-4)),
        ),
        "table8_lamb_adam_eps1e-8": (
            {
                "weights": group("lamb", 0.02569, weight_decay=2.5),
                "bias_bn": group("adam", 0.02569, eps=1e-8),
            },
            final_ranges(True, (1e-2, 8e-2), (1.0, 8.0)),
        ),
        "table8_lamb_adam_eps1e-6": (
            {
                "weights": group("lamb", 0.03378, weight_decay=4.197),
                "bias_bn": group("adam", 0.03378, eps=1e-6),
            },
            final_ranges(True, (1e-2, 8e-2), (1.0, 8.0)),
        ),
    }
    return [
        PaperConfig(
            name=name,
            source="Table 8 (best point of the final range)",
            workload="imagenet_resnet50",
            batch_size=32768,
            total_steps=6000,
            optimizer=optimizer,
            # Section 4: the LARS pipeline's values except gamma_0 = 1.0.
            hyperparameters=_resnet_hparams(0.10, 1.0, 0.9, 1e-5),
            notes="Cosine decay without warmup; the paper states no warmup for these runs.",
            search_space=space,
        )
        for name, (optimizer, space) in rows.items()
    ]


PAPER_CONFIGS: dict[str, PaperConfig] = {c.name: c for c in _table5() + _table7() + _table8()}


@dataclass(frozen=True)
class PaperArm:
    """One optimizer arm of a spec under ``experiments/paper/``: what it reproduces.

    Attributes:
      config: the :data:`PAPER_CONFIGS` name whose optimizer mapping, workload,
        hyperparameters, batch size and step budget the arm runs (its base config when it is
        searched); None for an arm the paper gives no configuration for.
      search_space: the parameters of the arm's ``search_space``, exactly; empty for a
        published point rerun as is.
      reason: why an arm without a paper configuration is in the spec (required then).
    """

    config: str | None
    search_space: tuple[dict[str, Any], ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class PaperSpec:
    """A spec file under ``experiments/paper/`` and the paper configurations it encodes.

    Attributes:
      arms: optimizer label in the file -> the arm.
      trials_per_study: the paper's tuning budget (feasible trials); 1 for a published point.
      seeds_per_best: the paper's reruns of the best trial; None where it gives none.
      notes: what the file is for.
    """

    arms: dict[str, PaperArm]
    trials_per_study: int
    seeds_per_best: int | None = None
    notes: str = ""


# LAMB at BERT's phases: You et al. 2019's optimizer, searched with Adam's budget. The paper
# compares with LAMB's published results (Table 3) and gives no LAMB configuration.
_LAMB_BERT = PaperArm(
    None,
    reason="LAMB searched with the same budget as Adam; the paper quotes You et al. 2019's LAMB "
    "results (Table 3) and gives no LAMB configuration of its own.",
)


def _bert_specs() -> dict[str, PaperSpec]:
    out: dict[str, PaperSpec] = {}
    for point in ("b32k_phase1", "b32k_phase2", "b65k_phase1", "b65k32k_phase2", "b65k_phase2"):
        config = f"bert_adam_{point}"
        # Appendix B.2: 30 trials per phase, 130 for the second phase at batch 65,536.
        trials = 130 if point == "b65k_phase2" else 30
        out[f"bert_{point}.yaml"] = PaperSpec(
            arms={"adam": PaperArm(config)},
            trials_per_study=1,
            notes="The Table 7 point, as published.",
        )
        out[f"bert_{point}_tuned.yaml"] = PaperSpec(
            arms={
                "adam_table6": PaperArm(config, search_space=TABLE6_SEARCH_SPACE),
                "lamb": _LAMB_BERT,
            },
            trials_per_study=trials,
            notes="Adam tuned in Table 6's space at the Table 7 point, and LAMB, with equal budgets.",
        )
    return out


# Every spec file under experiments/paper/, keyed by file name.
PAPER_SPECS: dict[str, PaperSpec] = {
    # Section 2: the published point rerun over 50 seeds, median reported.
    "lars_pipeline_32k.yaml": PaperSpec({"lars_pipeline": PaperArm("lars_pipeline_32k")}, 1, 50),
    "nesterov_a_32k.yaml": PaperSpec({"nesterov_a": PaperArm("nesterov_a_32k")}, 1, 50),
    "nesterov_b_32k.yaml": PaperSpec({"nesterov_b": PaperArm("nesterov_b_32k")}, 1, 50),
    # Section 4, Appendix D.3: 25 feasible trials in the final range, best point over 5 seeds.
    "section4_cosine_6000.yaml": PaperSpec(
        {
            label: PaperArm(f"table8_{label}", search_space=PAPER_CONFIGS[f"table8_{label}"].search_space)
            for label in (
                "nesterov", "lars_momentum", "lars_lars", "adam_eps1e-8", "adam_eps1e-6",
                "lamb_lamb", "lamb_adam_eps1e-8", "lamb_adam_eps1e-6",
            )
        },
        25,
        5,
    ),
    **_bert_specs(),
}


def paper_config(name: str) -> PaperConfig:
    """A deep copy of the named configuration.

    Args:
      name: a key of :data:`PAPER_CONFIGS`.

    Returns:
      The PaperConfig.

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    if name not in PAPER_CONFIGS:
        raise ValueError(f"name: unknown paper config {name!r}; allowed: {sorted(PAPER_CONFIGS)}")
    return copy.deepcopy(PAPER_CONFIGS[name])


def _summary(cfg: PaperConfig) -> dict[str, float]:
    weights = cfg.optimizer["weights"]
    lr = weights["learning_rate"]
    return {
        "p_warmup": lr["warmup_power"],
        "eta_peak": lr["peak_value"],
        "eta_final": lr["end_value"],
        "1 - mu": round(1.0 - weights["momentum"], 8),
        "lambda": weights["weight_decay"],
        "tau": cfg.hyperparameters["label_smoothing"],
        "gamma_0": cfg.hyperparameters["gamma_0"],
        "t_warmup": lr["warmup_steps"],
        "p_decay": lr["decay_power"],
        "eta_init": lr["init_value"],
        "rho": cfg.hyperparameters["bn_momentum"],
        "epsilon": cfg.hyperparameters["bn_epsilon"],
    }


def table1_differences(
    a: str = "nesterov_b_32k", b: str = "lars_pipeline_32k"
) -> list[tuple[str, float, float]]:
    """The hyperparameters that differ between two Table 5 configurations (the paper's Table 1).

    Derived from the stored configurations, so it shows what the data says.

    Args:
      a: first configuration (Nesterov configuration B).
      b: second configuration (the LARS pipeline).

    Returns:
      (name, value in a, value in b) for every differing hyperparameter.
    """
    sa, sb = _summary(paper_config(a)), _summary(paper_config(b))
    return [(k, sa[k], sb[k]) for k in sa if sa[k] != sb[k]]
