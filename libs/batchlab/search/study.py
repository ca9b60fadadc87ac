"""A study: one workload x optimizer x (batch size, step budget), and its trials.

A Study is plain data (no protobuf), built by `batchlab.search.spec.expand_studies`. It fixes
everything the protocol needs: the search space, the target, the trial budgets and the seeds.
Trial i's hyperparameters are the study's base mapping {"optimizer": config, "workload":
hyperparameters} with Halton point i of the study's own search sequence written in, and the
step budget filled into any schedule that omits total_steps.

Independent tuning luck: each study draws its own scrambled Halton sequence, seeded by a hash of
(search_seed, the study's point and optimizer, its search replicate), so two optimizers or two
batch sizes are not tuned on the same unit-cube points, and a search replicate repeats the whole
protocol with independent luck (AlgoPerf scores the median over independent studies). With
`share_search_points`, every study of a replicate uses one sequence (the old behaviour, for
paired designs).

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check", Sections 2 and 4, Appendix D.
  Bousquet et al. 2017, "Critical Hyper-Parameters: No Random, No Cry".
"""

from __future__ import annotations

import copy
import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchlab.paths import set_path
from batchlab.search.halton import halton_point
from batchlab.search.space import SearchSpace
from batchlab.targets import (  # noqa: F401 - re-exported: the study protocol speaks of them
    DEFAULT_ABSOLUTE_MARGIN,
    DEFAULT_FRACTION_MARGIN,
    DEFAULT_MARGIN_FRACTION,
    Goal,
    Target,
    TargetReading,
)

# Schedules (batchlab.optim.schema) whose total_steps defaults to the study's step budget.
SCHEDULES_WITH_TOTAL_STEPS = frozenset({"piecewise_polynomial", "bert_legacy", "cosine",
                                        "linear_decay"})
SEED_LIMIT = 2**31  # run seeds are in [0, 2**31): valid for numpy, JAX PRNG keys and int32.
class Selection(enum.IntEnum):
    """The rule that picks a study's best trial (numbers as batchlab.v1.Selection)."""

    BEST_VALIDATION_METRIC = 1
    FEWEST_STEPS_TO_TARGET = 2


@dataclass(frozen=True)
class Study:
    """One workload x optimizer x (batch size, step budget) study of an experiment.

    Args:
      id: stable id, f"{workload}.{optimizer}.b{batch_size}.s{step_budget}", with
        f".r{replicate}" appended when the spec has more than one search replicate.
      index: position in expand_studies' order.
      experiment: the experiment name.
      workload: registered workload name.
      optimizer: the optimizer label (OptimizerSpec.name).
      batch_size: examples per step.
      step_budget: training steps per run.
      eval_every_steps: evaluation period (resolution of steps-to-target).
      target: the target metric, value and goal.
      search_space: the tuned (and fixed) hyperparameters.
      optimizer_config: the base optimizer config (before a trial's values are written in).
      workload_hyperparameters: the base workload overrides.
      search_seed: the spec's search seed (run seeds hash it with the study id).
      trials_per_study: feasible tuning trials wanted.
      max_total_trials: cap on tuning trials, diverged ones included.
      seeds_per_best: reruns of the best trial.
      selection: how the best trial is picked.
      max_attempts: attempts per run before an infrastructure failure abandons it.
      resources: what one run needs (cpus, gpus, tpus, num_hosts, memory_gib).
      replicate: the search replicate (0-based) this study belongs to.
      search_replicates: how many replicates the spec asks for.
      share_search_points: every study of a replicate draws the same Halton points.
      eval_every_examples: the evaluation period in examples when the spec gives it that way
        (eval_every_steps is then ceil(examples / batch_size)); 0 when given in steps.
      stop_at_target: runs end at the first evaluation meeting the target.
    """

    id: str
    index: int
    experiment: str
    workload: str
    optimizer: str
    batch_size: int
    step_budget: int
    eval_every_steps: int
    target: Target
    search_space: SearchSpace
    optimizer_config: Mapping[str, Any]
    workload_hyperparameters: Mapping[str, Any]
    search_seed: int
    trials_per_study: int
    max_total_trials: int
    seeds_per_best: int
    selection: Selection
    max_attempts: int = 3
    resources: Mapping[str, Any] = field(default_factory=dict)
    replicate: int = 0
    search_replicates: int = 1
    share_search_points: bool = False
    eval_every_examples: int = 0
    stop_at_target: bool = False

    @property
    def group_id(self) -> str:
        """The id shared by the replicates of this study (the id without ".r<k>")."""
        return f"{self.workload}.{self.optimizer}.b{self.batch_size}.s{self.step_budget}"

    @property
    def halton_seed(self) -> int:
        """The seed of this study's own scrambled Halton sequence (see the module docstring)."""
        return search_sequence_seed(self.search_seed, self.group_id, self.replicate,
                                    shared=self.share_search_points)

    def __hash__(self) -> int:
        # The mappings inside are not hashable; a study is identified by its experiment and id.
        return hash((self.experiment, self.id))

    def hyperparameters(self, trial_index: int) -> dict[str, Any]:
        """Trial `trial_index`'s hyperparameters (see `trial_hyperparameters`).

        Args:
          trial_index: the 0-based tuning trial.
        """
        return trial_hyperparameters(self, trial_index)

    def tuning_seed(self, trial_index: int) -> int:
        """The seed of trial `trial_index`'s tuning run.

        Args:
          trial_index: the 0-based tuning trial.
        """
        return run_seeds(self, trial_index)[0]

    def rerun_seeds(self, trial_index: int) -> tuple[int, ...]:
        """The seeds of the `seeds_per_best` reruns of a trial, distinct from its tuning seed.

        Args:
          trial_index: the 0-based tuning trial.
        """
        return run_seeds(self, trial_index)[1:]


def fill_total_steps(config: Any, step_budget: int) -> None:
    """Set total_steps = step_budget in every schedule of a config that takes but omits it.

    Args:
      config: an optimizer config (single group or {"weights": ..., "bias_bn": ...}), changed
        in place.
      step_budget: the study's step budget.
    """
    if isinstance(config, dict):
        schedule = config.get("schedule")
        if isinstance(schedule, str) and schedule in SCHEDULES_WITH_TOTAL_STEPS \
                and "total_steps" not in config:
            config["total_steps"] = step_budget
        for value in config.values():
            fill_total_steps(value, step_budget)
    elif isinstance(config, list):
        for value in config:
            fill_total_steps(value, step_budget)


def hyperparameters_at(study: Study, point: tuple[float, ...] | list[float]) -> dict[str, Any]:
    """The study's hyperparameter mapping with a given point of its search space written in.

    Args:
      study: the study.
      point: `study.search_space.dimension` coordinates in [0, 1).

    Raises:
      ValueError: a path runs through a value that is not a mapping.
    """
    mapping = {
        "optimizer": copy.deepcopy(dict(study.optimizer_config)),
        "workload": copy.deepcopy(dict(study.workload_hyperparameters)),
    }
    for path, value in study.search_space.assign(point).items():
        set_path(mapping, path, value)
    fill_total_steps(mapping["optimizer"], study.step_budget)
    return mapping


def trial_hyperparameters(study: Study, trial_index: int) -> dict[str, Any]:
    """Trial `trial_index`'s hyperparameters: {"optimizer": config, "workload": overrides}.

    The values come from point `trial_index` of the study's own Halton sequence
    (`Study.halton_seed`), so a trial has the same hyperparameters in any process and can be
    computed without earlier trials.

    Args:
      study: the study.
      trial_index: the 0-based tuning trial.

    References:
      Bousquet et al. 2017 (quasi-random search); Nado et al. 2021, Appendix D.
    """
    return hyperparameters_at(study, trial_point(study, trial_index))


def trial_point(study: Study, trial_index: int) -> tuple[float, ...]:
    """Trial `trial_index`'s point of the unit cube (one coordinate per tuned parameter).

    Args:
      study: the study.
      trial_index: the 0-based tuning trial.
    """
    return halton_point(trial_index, study.search_space.dimension, study.halton_seed)


def search_sequence_seed(search_seed: int, group_id: str, replicate: int, *,
                         shared: bool) -> int:
    """The Halton seed of a study: a BLAKE2b hash, stable across processes and versions.

    Args:
      search_seed: the spec's search seed.
      group_id: the study's id without its replicate suffix (ignored when shared).
      replicate: the search replicate.
      shared: every study of the replicate uses the same sequence.
    """
    identity = "*" if shared else group_id
    text = f"batchlab-search-sequence|{search_seed}|{identity}|{replicate}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 2**32


def _hash_seed(search_seed: int, study_id: str, trial_index: int, replica: int,
               salt: int) -> int:
    text = f"batchlab-run-seed|{search_seed}|{study_id}|{trial_index}|{replica}|{salt}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SEED_LIMIT


def run_seeds(study: Study, trial_index: int) -> tuple[int, ...]:
    """Seeds of a trial: [tuning seed, rerun seed 1, ..., rerun seed seeds_per_best], distinct.

    Seeds are hashes of (search_seed, study id, trial, replica) (BLAKE2b, stable across
    processes and versions), re-drawn with a salt in the rare case of a collision.

    Args:
      study: the study.
      trial_index: the 0-based tuning trial.
    """
    if trial_index < 0:
        raise ValueError(f"trial_index must be >= 0, got {trial_index}")
    seeds: list[int] = []
    for replica in range(study.seeds_per_best + 1):
        salt = 0
        seed = _hash_seed(study.search_seed, study.id, trial_index, replica, salt)
        while seed in seeds:
            salt += 1
            seed = _hash_seed(study.search_seed, study.id, trial_index, replica, salt)
        seeds.append(seed)
    return tuple(seeds)
