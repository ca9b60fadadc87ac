"""The paper's configurations as data, each reproducible by name. Pure Python: no JAX.

Each entry is a :class:`PaperConfig`: the optimizer mapping (the format of
:mod:`batchlab.optim.schema`), the workload hyperparameters it was paired with
(label smoothing tau, gamma_0, BN rho and epsilon, virtual batch size), batch
size and step budget, and the table it comes from.

References:
  Nado et al. 2021: Table 1 and Table 5 (ResNet-50, batch 32,768, 2,512 steps),
  Table 7 (BERT-Large Adam phases), Table 8 (6,000-step cosine runs, best points).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PAPER_CONFIGS", "PaperConfig", "paper_config", "table1_differences"]


@dataclass(frozen=True)
class PaperConfig:
    """One configuration from the paper."""

    name: str
    source: str
    workload: str
    batch_size: int
    total_steps: int
    optimizer: dict[str, Any]
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


def _poly(init, peak, end, warmup, total, p_warmup, p_decay) -> dict[str, Any]:
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


def _resnet_hparams(tau, gamma_0, rho, eps) -> dict[str, Any]:
    return {
        "label_smoothing": tau,
        "gamma_0": gamma_0,
        "bn_momentum": rho,
        "bn_epsilon": eps,
        "virtual_batch_size": 64,
    }


def _table5() -> list[PaperConfig]:
    # Table 5 columns: t_warmup, p_warmup, p_decay, rho, eps, eta_peak, eta_final, 1-mu, lambda,
    # tau, gamma_0. eta_init is 0 in all three (Section 2.1.4).
    rows = {
        "lars_pipeline_32k": ("lars", 706, 1.0, 2.0, 0.9, 1e-5, 29.0, 1e-4, 0.071, 1e-4, 0.10, 0.0),
        "nesterov_a_32k": ("nesterov", 638, 2.497, 1.955, 0.94, 4e-6, 7.05, 6e-6, 0.02397, 5.8e-5, 0.15, 0.4138),
        "nesterov_b_32k": ("nesterov", 706, 2.0, 2.0, 0.9, 1e-5, 7.05, 6e-6, 0.02397, 5.8e-5, 0.15, 0.4138),
    }
    out = []
    for name, (opt, tw, pw, pd, rho, eps, peak, final, one_minus_mu, l2, tau, g0) in rows.items():
        lr = _poly(0.0, peak, final, tw, 2512, pw, pd)
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


def _table7() -> list[PaperConfig]:
    # batch, phase, seq len, warmup, steps, lr, b1, b2, lambda, p  (eps 1e-11 for all trials)
    rows = {
        "bert_adam_b32k_phase1": (32768, 1, 128, 3125, 14063, 5.9415e-4, 0.934271, 0.989295, 0.31466, 1),
        "bert_adam_b32k_phase2": (32768, 2, 512, 781, 1562, 2.8464e-4, 0.963567, 0.952647, 0.31466, 1),
        "bert_adam_b65k_phase1": (65536, 1, 128, 2000, 7037, 1.3653e-3, 0.952378, 0.86471, 0.19891, 2),
        "bert_adam_b65k32k_phase2": (32768, 2, 512, 781, 1562, 2.8464e-4, 0.952647, 0.963567, 0.19891, 2),
        "bert_adam_b65k_phase2": (65536, 2, 512, 390, 781, 6.1951e-5, 0.65322, 0.82451, 0.19891, 2),
    }
    out = []
    for name, (batch, phase, seq, warmup, steps, lr, b1, b2, wd, p) in rows.items():
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
                notes="p is the polynomial power of both warmup and decay.",
            )
        )
    return out


def _table8() -> list[PaperConfig]:
    def cos(lr):
        return {"schedule": "cosine", "peak_value": lr, "total_steps": 6000}

    def group(opt, lr, **kw):
        return {"optimizer": opt, "learning_rate": cos(lr), **kw}

    momentum = {"nesterov": 0.98, "lars": 0.929, "heavy_ball": 0.929}
    rows = {
        # One optimizer on every parameter: lambda on every parameter.
        "table8_nesterov": group("nesterov", 1.173, momentum=0.98, weight_decay=3.026e-4),
        "table8_lars_lars": group("lars", 14.18, momentum=0.929, weight_decay=5.278e-5),
        "table8_adam_eps1e-8": group("adam", 0.004596, eps=1e-8, weight_decay=0.6182),
        "table8_adam_eps1e-6": group("adam", 3.332e-3, eps=1e-6, weight_decay=1.055),
        "table8_lamb_lamb": group("lamb", 0.01134, weight_decay=0.02657),
        # A different optimizer on bias/BN: lambda = 0 there (Appendix D.3).
        "table8_lars_momentum": {
            "weights": group("lars", 14.49, momentum=momentum["lars"], weight_decay=1.708e-4),
            "bias_bn": group("heavy_ball", 14.49, momentum=momentum["heavy_ball"]),
        },
        "table8_lamb_adam_eps1e-8": {
            "weights": group("lamb", 0.02569, weight_decay=2.5),
            "bias_bn": group("adam", 0.02569, eps=1e-8),
        },
        "table8_lamb_adam_eps1e-6": {
            "weights": group("lamb", 0.03378, weight_decay=4.197),
            "bias_bn": group("adam", 0.03378, eps=1e-6),
        },
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
        )
        for name, optimizer in rows.items()
    ]


PAPER_CONFIGS: dict[str, PaperConfig] = {c.name: c for c in _table5() + _table7() + _table8()}


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
