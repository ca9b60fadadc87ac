"""The training loop: train_and_evaluate(RunConfig) -> RunResult.

One run trains one workload with one optimizer configuration at one batch size for a
step budget, evaluating on training and held-out data every ``eval_every_steps``.
It ends with an explicit outcome: SUCCEEDED (budget reached), DIVERGED (a non-finite
training loss), FAILED (an exception), CANCELLED (asked to stop). With a checkpoint
directory it saves at every evaluation and resumes from the newest checkpoint, ending
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from batchlab import data as bdata
from batchlab.data.pipeline import BatchIterator, RandomAccessSource
from batchlab.optim import (
    learning_rate_fn,
    optimizer_arguments,
    optimizer_structure,
    validate_optimizer_config,
)
from batchlab.targets import Goal, Outcome, Target, steps_to_target
from batchlab.train.checkpoint import (
    RunCheckpointer,
    check_initial_variables,
    restore_initial_variables,
    snapshot,
)
from batchlab.train.parallel import DataParallel
from batchlab.train.steps import (
    TrainState,
    make_apply_step,
    make_eval_step,
    make_gradient_step,
    make_train_step,
)
from batchlab.train.workloads import Workload, get_workload
from batchlab.workloads import microbatch_problem

__all__ = ["Goal", "RunConfig", "RunResult", "Target", "train_and_evaluate"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run.

    Attributes:
      workload: registered workload name.
      optimizer: optimizer configuration (the format of :mod:`batchlab.optim.schema`).
      batch_size: global batch size.
      total_steps: the step budget.
      hyperparameters: workload hyperparameters (label_smoothing, gamma_0, ...).
      eval_every_steps: evaluation interval (the last step is always evaluated).
      seed: seeds the model initialisation, dropout and the data order.
      target: optional target; the run records the first evaluation step meeting it.
      stop_at_target: end the run (SUCCEEDED) as soon as the target is met.
      data_dir: tfds data folder (default: batchlab.data.default_data_dir()).
      checkpoint_dir: save at every evaluation and resume from here.
      init_checkpoint: a checkpoint folder (a run's checkpoint_dir, or a final state a runner
        kept) whose newest parameters and batch statistics initialise the run, with a fresh
        optimizer state at step 0 (BERT phase 2 continues phase 1). A resume from
        checkpoint_dir takes precedence.
      divergence_check_every: how often (steps) losses are fetched to detect divergence.
    """

    workload: str
    optimizer: Mapping[str, Any]
    batch_size: int
    total_steps: int
    hyperparameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    eval_every_steps: int = 100
    seed: int = 0
    target: Target | None = None
    stop_at_target: bool = False
    data_dir: str | None = None
    checkpoint_dir: str | None = None
    divergence_check_every: int = 10
    init_checkpoint: str | None = None

    @classmethod
    def for_trial(
        cls, workload: str, hyperparameters: Mapping[str, Any], *, batch_size: int, step_budget: int,
        **fields: Any,
    ) -> RunConfig:
        """The run of one trial: its hyperparameter mapping {"optimizer": ..., "workload": ...}
        (as the study protocol builds it) at a batch size and step budget.

        Args:
          workload: registered workload name.
          hyperparameters: the trial's mapping; "workload" may be absent or empty.
          batch_size: global batch size.
          step_budget: the step budget.
          **fields: other RunConfig fields (eval_every_steps, seed, target, data_dir, ...).
        """
        return cls(
            workload=workload,
            optimizer=hyperparameters["optimizer"],
            hyperparameters=hyperparameters.get("workload") or {},
            batch_size=int(batch_size),
            total_steps=int(step_budget),
            **fields,
        )

    def validate(self) -> tuple[Workload, dict[str, Any]]:
        """Check every field; return the workload and its full hyperparameters."""
        workload = get_workload(self.workload)
        for name in ("batch_size", "total_steps", "eval_every_steps", "divergence_check_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: must be an integer >= 0, got {self.seed!r}")
        if self.target is not None and not isinstance(self.target.goal, Goal):
            # Target.is_met compares with `is`: a plain "MAXIMIZE" would silently minimise.
            raise ValueError(f"target.goal: must be a Goal, got {self.target.goal!r}")
        if self.stop_at_target and self.target is None:
            raise ValueError("stop_at_target: needs a target")
        if self.init_checkpoint is not None and (not isinstance(self.init_checkpoint, str) or not self.init_checkpoint):
            raise ValueError(f"init_checkpoint: must be a checkpoint folder, got {self.init_checkpoint!r}")
        validate_optimizer_config(self.optimizer, total_steps=self.total_steps)
        return workload, workload.hyperparameters(self.hyperparameters)


@dataclasses.dataclass
class RunResult:
    """What a run produced: outcome, curve, steps-to-target, timing."""

    outcome: Outcome
    steps_completed: int
    curve: list[dict[str, float]]
    steps_to_target: float
    diverged_step: int | None = None
    error: str | None = None
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    input_wait_s: float = 0.0
    examples_per_second: float = 0.0
    startup_time_s: float = 0.0
    resumed_from_step: int | None = None
    failure: str | None = None
    """Why a FAILED run failed: "infrastructure" (an exception marked ``infrastructure``,
    e.g. the sharding service failed) or "run" (anything else)."""
    initialised_from: str | None = None
    """The checkpoint folder (and step) the parameters started from, for a warm start."""
    final_state: Any = dataclasses.field(default=None, repr=False, compare=False)
    """The TrainState at the end, when ``train_and_evaluate(..., return_state=True)``."""

    @property
    def final_metrics(self) -> dict[str, float]:
        return dict(self.curve[-1]) if self.curve else {}

    def to_dict(self) -> dict[str, Any]:
        d = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "final_state"
        }
        d["outcome"] = self.outcome.name
        d["steps_to_target"] = None if math.isinf(self.steps_to_target) else int(self.steps_to_target)
        d["final_metrics"] = self.final_metrics
        return d


class _Subset:
    """The first ``n`` examples of a random-access source."""

    def __init__(self, source: RandomAccessSource, n: int):
        self._source, self._n = source, min(n, len(source))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._source[i]

    def __getitems__(self, indices: Sequence[int]) -> list[Mapping[str, Any]]:
        # tfds sources read many records per call; keep that (reading 10k one by one is slow).
        if any(not 0 <= i < self._n for i in indices):
            raise IndexError(indices)
        getitems = getattr(self._source, "__getitems__", None)
        if getitems:
            examples: list[Mapping[str, Any]] = getitems(list(indices))
            return examples
        return [self._source[i] for i in indices]


def _to_model_batch(
    workload: Workload, batch: Mapping[str, np.ndarray], input_key: str
) -> dict[str, np.ndarray]:
    if workload.kind == "classification":
        out = {"input": batch[input_key], "label": batch["label"]}
    else:
        out = {k: v for k, v in batch.items() if k != "mask"}
    if "mask" in batch:
        out["mask"] = batch["mask"]
    return out


@dataclasses.dataclass
class _Programs:
    """The jitted functions of every run with one program key (see _Run.program_key)."""

    step: Any = None
    gradient: Any = None
    apply: Any = None
    eval_step: Any = None
    init: Any = None
    # What the functions close over, kept to check each reuse against (see _programs_for).
    captured: Any = None


# Runs of a study differ in values the programs take as arguments (optimizer hyperparameters,
# keys, data), not in the programs: the jitted functions of the latest few program keys are
# kept, so that a process training run after run (a local runner's worker, a trainer) traces
# and lowers each program once, not once per run (about 0.5 s of a 2 s run on mnist1d here).
# What they close over is equal for equal keys; nothing of a run itself. Each entry holds one
# compiled program per batch shape it met; the limit counts keys (train and eval keys apart).
_PROGRAMS: collections.OrderedDict[str, _Programs] = collections.OrderedDict()
_PROGRAMS_KEPT = 16


def _programs_for(key: str, captured: Any) -> _Programs:
    """The kept functions of ``key`` (new ones to fill when none are kept).

    Raises:
      RuntimeError: the kept functions close over something else than ``captured`` (the
        objects this run's functions would close over): the key misses what differs, and
        reusing them would train this run with another run's program.
    """
    programs = _PROGRAMS.pop(key, None)
    if programs is None:
        programs = _Programs(captured=captured)
    elif programs.captured != captured:
        raise RuntimeError(f"program key {key} is shared by runs whose programs differ")
    _PROGRAMS[key] = programs
    while len(_PROGRAMS) > _PROGRAMS_KEPT:
        _PROGRAMS.popitem(last=False)
    return programs


def _initial_variables(model: Any, workload: Workload, hparams: Mapping[str, Any],
                       input_shape: Any, key: jax.Array) -> Mapping[str, Any]:
    """A model's initial variables ("params", and "batch_stats" for BN models)."""
    dummy = workload.dummy_batch(2 * max(1, hparams.get("virtual_batch_size") or 1), input_shape, hparams)
    variables: Mapping[str, Any]
    if workload.kind == "classification":
        variables = model.init(key, dummy["input"], train=False)
    else:
        variables = model.init(
            key, dummy["input_ids"], dummy["segment_ids"], dummy["input_mask"],
            dummy["masked_lm_positions"], train=False,
        )
    return variables


class _Run:
    """One run's machinery: data, model, optimizer, jitted steps, checkpoints."""

    def __init__(self, config: RunConfig, dp: DataParallel | None):
        self.config = config
        self.workload, self.hparams = config.validate()
        self.dp = dp or DataParallel()
        w, hp = self.workload, self.hparams
        self.dp.check_batch_size(
            config.batch_size, hp.get("virtual_batch_size") if w.kind == "classification" else None
        )
        self.data_dir = config.data_dir
        info = bdata.dataset_info(w.dataset)
        self.input_key = info.input_key
        self.input_shape = info.input_shape
        extra: dict[str, Any] = {}
        self.data_kwargs: dict[str, Any] = dict(w.dataset_kwargs)
        if w.kind == "mlm":
            tokenizer = bdata.mlm_tokenizer(self.data_dir, config=w.dataset_config)
            extra["vocab_size"] = tokenizer.vocab_size
            self.data_kwargs.update(
                max_seq_length=hp["max_seq_length"], max_predictions_per_seq=hp["max_predictions_per_seq"]
            )
        self.model = model = w.model(hp, **extra)
        build, self.optimizer_values = optimizer_arguments(config.optimizer, total_steps=config.total_steps)
        self.optimizer = build(self.optimizer_values)
        self.lr_fn = learning_rate_fn(config.optimizer, total_steps=config.total_steps)

        # The optimizer's real-valued hyperparameters are arguments, not constants: tuning
        # trials that differ only in them lower to one program, which this process keeps
        # (_PROGRAMS) and the persistent compilation cache serves to later processes (see
        # optimizer_arguments).
        # Python floats, which jit abstracts as weak-typed float32 scalars (a bf16 model stays
        # bf16). Not placed with jax.device_put: across processes its consistency check fails
        # on Python scalars (multi-host runs), and jit places them itself.
        values = self.optimizer_values
        self.microbatches = self._microbatches()
        # Evaluation does not depend on the optimizer: its programs have a key of their own.
        structure = optimizer_structure(config.optimizer, total_steps=config.total_steps)
        model_key = {
            "workload": w.name, "hyperparameters": hp, "model": extra,
            "devices": [[d.platform, d.process_index, d.id] for d in self.dp.mesh.devices.flat],
        }
        self.program_key = json.dumps({
            **model_key,
            "optimizer": structure,
            "microbatches": self.microbatches,
        }, sort_keys=True, default=repr)
        input_shape = self.input_shape
        captured = (w.name, dict(hp), model, input_shape, self.dp.replicated, self.dp.batch)
        programs = self._programs = _programs_for(self.program_key, (*captured, structure))
        eval_programs = _programs_for(
            "eval " + json.dumps(model_key, sort_keys=True, default=repr), captured)
        # A host batch in, (state, metrics) out: one jitted step, or with gradient accumulation
        # one jitted gradient step per microbatch and one jitted optimizer step.
        self.train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
        if self.microbatches == 1:

            def train_step(
                state: TrainState, batch: Mapping[str, jax.Array], values: Mapping[str, Any]
            ) -> tuple[TrainState, dict[str, jax.Array]]:
                return make_train_step(w, hp, model, build(dict(values)))(state, batch)

            if programs.step is None:
                programs.step = jax.jit(
                    train_step,
                    in_shardings=(self.dp.replicated, self.dp.batch, self.dp.replicated),
                    out_shardings=(self.dp.replicated, self.dp.replicated),
                    donate_argnums=(0,),
                )
            step = programs.step
            self.train_step = lambda state, batch: step(state, self.dp.put_batch(batch), values)
        else:
            if programs.gradient is None:
                programs.gradient = jax.jit(
                    make_gradient_step(w, hp, model),
                    in_shardings=(self.dp.replicated, self.dp.batch, self.dp.replicated),
                    out_shardings=self.dp.replicated,
                    donate_argnums=(2,),
                )

            def apply_step(
                state: TrainState, total: Any, moments: Any, sums: Any, values: Mapping[str, Any]
            ) -> tuple[TrainState, dict[str, jax.Array]]:
                return make_apply_step(build(dict(values)))(state, total, moments, sums)

            if programs.apply is None:
                programs.apply = jax.jit(
                    apply_step,
                    in_shardings=(self.dp.replicated,) * 5,
                    out_shardings=(self.dp.replicated, self.dp.replicated),
                    donate_argnums=(0,),
                )
            gradient, apply = programs.gradient, programs.apply

            def accumulate(
                state: TrainState, batch: Mapping[str, np.ndarray]
            ) -> tuple[TrainState, dict[str, jax.Array]]:
                total, moments, sums = None, [], []
                for microbatch in self._split(batch):
                    total, m, s = gradient(state, self.dp.put_batch(microbatch), total)
                    moments.append(m)
                    sums.append(s)
                stepped: tuple[TrainState, dict[str, jax.Array]] = apply(
                    state, total, tuple(moments), tuple(sums), values)
                return stepped

            self.train_step = accumulate
        if eval_programs.eval_step is None:
            eval_programs.eval_step = jax.jit(
                make_eval_step(w, hp, model),
                in_shardings=(self.dp.replicated, self.dp.batch),
                out_shardings=self.dp.replicated,
            )
        self.eval_step = eval_programs.eval_step
        if programs.init is None:
            # The keys are arguments, not constants: every seed then compiles the same
            # program. So are the optimizer's values, as in the train step.
            @jax.jit
            def init(k: jax.Array, dropout_key: jax.Array, values: Mapping[str, Any]) -> TrainState:
                variables = _initial_variables(model, w, hp, input_shape, k)
                params = variables["params"]
                return TrainState(
                    step=jnp.zeros((), jnp.int32),
                    params=params,
                    batch_stats=variables.get("batch_stats"),
                    opt_state=build(dict(values)).init(params),
                    rng=jax.random.key_data(dropout_key),
                )

            programs.init = init
        self._eval_sources: dict[str, Any] = {}
        self._abstract: dict[str, Any] | None = None
        self.init_step: int | None = None
        if config.init_checkpoint is not None:
            # A source of another architecture is the caller's mistake: refuse it before training.
            self.init_step = check_initial_variables(config.init_checkpoint, self.abstract_variables())

    def _microbatches(self) -> int:
        """How many microbatches a batch is run as (workload.microbatch_size), after checks.

        Raises:
          ValueError: naming workload.microbatch_size, when it does not split the batch into
            equal microbatches of whole virtual batches on every device.
        """
        size = int(self.hparams.get("microbatch_size") or 0)
        batch = self.config.batch_size
        if not size or batch <= size:
            return 1
        field = "workload.microbatch_size"
        problem = microbatch_problem(self.hparams, batch)
        if problem is not None:
            raise ValueError(f"{field}: {problem}")
        self.dp.check_batch_size(size, self.hparams["virtual_batch_size"], field=field)
        return batch // size

    def _split(self, batch: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """This process's share of a batch as its shares of the microbatches.

        Microbatch k holds the k-th slice of every device's share, so each device computes on
        examples it would hold in one pass, and virtual batches are never cut.
        """
        k = self.microbatches
        devices = self.dp.num_local_devices
        shaped = {name: np.asarray(v).reshape(devices, k, -1, *np.shape(v)[1:])
                  for name, v in batch.items()}
        return [{name: v[:, i].reshape(-1, *v.shape[3:]) for name, v in shaped.items()}
                for i in range(k)]

    # -- state ---------------------------------------------------------------------------------
    def _variables(self, key: jax.Array) -> Mapping[str, Any]:
        """The model's initial variables ("params", and "batch_stats" for BN models)."""
        return _initial_variables(self.model, self.workload, self.hparams, self.input_shape, key)

    def abstract_variables(self) -> dict[str, Any]:
        """{"params", "batch_stats"} as shape/dtype leaves (batch_stats None without BN).

        Traced once per run object (the evaluation service asks at every checkpoint it
        evaluates, and tracing the model's initialisation cost about as much as evaluating
        a small model's point)."""
        if self._abstract is None:
            variables = jax.eval_shape(self._variables, jax.random.key(0))
            self._abstract = {"params": variables["params"],
                              "batch_stats": variables.get("batch_stats")}
        return dict(self._abstract)

    def init_state(self) -> TrainState:
        key = jax.random.key(self.config.seed)
        init_key, dropout_key = jax.random.split(key)
        state: TrainState = self.dp.put_replicated(
            self._programs.init(init_key, dropout_key, self.optimizer_values))
        return state

    def warm_start(self, state: TrainState) -> TrainState:
        """``state`` with init_checkpoint's params and batch_stats and a fresh optimizer state.

        The step stays 0 and the dropout key is this run's. The optimizer state is built from
        the loaded parameters, not read: the source may have used another optimizer.
        """
        assert self.config.init_checkpoint is not None  # the caller checks
        variables = restore_initial_variables(self.config.init_checkpoint, self.abstract_variables(), self.init_step)
        params = self.dp.put_replicated(variables["params"])
        batch_stats = variables["batch_stats"]
        return state.replace(
            params=params,
            batch_stats=None if batch_stats is None else self.dp.put_replicated(batch_stats),
            opt_state=self.dp.put_replicated(jax.jit(self.optimizer.init)(params)),
        )

    # -- data ----------------------------------------------------------------------------------
    def train_iterator(self, state: Mapping[str, Any] | None, *,
                       index_stream: Callable[[int], Any] | None = None,
                       index_key: str | None = None) -> BatchIterator:
        shard_count, shard_index = jax.process_count(), jax.process_index()
        return bdata.input_pipeline(
            self.workload.dataset,
            "train",
            self.config.batch_size // shard_count,
            data_dir=self.data_dir,
            config=self.workload.dataset_config,
            train=True,
            seed=self.config.seed,
            shard_index=shard_index,
            shard_count=shard_count,
            state=state,
            max_examples=self.hparams.get("train_examples") or None,
            index_stream=index_stream,
            index_key=index_key,
            **self.data_kwargs,
        )

    def _eval_batches(
        self, split: str, limit: int | None, batch_size: int
    ) -> tuple[BatchIterator, int | None]:
        """One pass over the first ``limit`` examples of ``split`` in order, padded and masked."""
        w = self.workload
        if w.kind == "mlm":
            it = bdata.input_pipeline(
                w.dataset, split, batch_size, data_dir=self.data_dir,
                config=w.dataset_config, train=False, seed=0, num_epochs=1, **self.data_kwargs,
            )
            max_batches = math.ceil(limit / batch_size) if limit else None
            return it, max_batches
        source = self._eval_sources.get(split)
        if source is None:
            if w.dataset == "imagenet2012":
                source = bdata.get_dataset(w.dataset, split, self.data_dir, config=w.dataset_config)
                if limit:
                    source = _Subset(source, limit)
            else:
                # Small enough to hold in memory, and read from disk once per process: every
                # run of a worker evaluates on the same arrays its training input gathers from.
                source = bdata.in_memory_split(w.dataset, split, self.data_dir, config=w.dataset_config)
                if limit and limit < len(source):
                    source = bdata.in_memory_split(w.dataset, split, self.data_dir,
                                                   config=w.dataset_config, max_examples=limit)
            self._eval_sources[split] = source
        preprocess = bdata.imagenet.eval_preprocess if w.dataset == "imagenet2012" else None
        it = bdata.BatchIterator(
            source, batch_size, shuffle=False, num_epochs=1, preprocess=preprocess,
            drop_remainder=False, prefetch=2 if preprocess else 0,
        )
        return it, None

    def evaluate(self, state: TrainState, splits: tuple[str, ...] = ("train", "validation")) -> dict[str, float]:
        """Metrics (eval-mode BN) on the first training examples and/or the validation split."""
        w = self.workload
        # Every device gets an equal share of an eval batch; padding is masked out.
        batch_size = -(-w.eval_batch_size // self.dp.num_devices) * self.dp.num_devices
        out: dict[str, float] = {}
        limits = {"train": w.train_eval_examples, "validation": w.validation_examples}
        if self.hparams.get("train_examples"):
            # Train metrics over examples the run trains on, not the unused rest of the split.
            limits["train"] = min(w.train_eval_examples, self.hparams["train_examples"])
        for split in splits:
            if split not in limits:
                raise ValueError(f"split: must be one of {sorted(limits)}, got {split!r}")
            limit = limits[split]
            it, max_batches = self._eval_batches(split, limit, batch_size)
            totals: dict[str, list[Any]] = {}
            with it:
                for i, batch in enumerate(it):
                    if max_batches is not None and i >= max_batches:
                        break
                    sums = self.eval_step(state, self.dp.put_batch(_to_model_batch(w, batch, self.input_key)))
                    for k, (s, c) in sums.items():
                        acc = totals.setdefault(k, [0.0, 0.0])
                        acc[0], acc[1] = acc[0] + s, acc[1] + c
            for k, (s, c) in jax.device_get(totals).items():
                out[f"{split}/{k}"] = float(s) / max(float(c), 1.0)
        return out


class _CheckpointWriter:
    """Runs a run's checkpoint jobs (write, record the data position, the caller's callback)
    one at a time, in order.

    In a single-process run a background thread runs them, so training goes on while a
    checkpoint is written and handed on (uploaded, sent for evaluation), as in orbax's
    asynchronous checkpointing. As there, one job is in flight at most: the next waits for it
    (so a run holds one extra copy of its state at most), and a failed job's error reaches the
    training thread before any later job runs (a later checkpoint stored after an earlier one
    was lost would be a resume point whose curve has a point no checkpoint holds). The error
    is raised by the next ``check`` (every step), ``submit`` or ``wait``. In a multi-process
    run the jobs run in the caller's thread: the callbacks may run collectives, which every
    process must enter at the same point of its training.

    Args:
      background: run the jobs in a thread of their own.
    """

    def __init__(self, *, background: bool):
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
                      if background else None)
        self._pending: collections.deque[concurrent.futures.Future[None]] = collections.deque()

    @property
    def background(self) -> bool:
        """Whether jobs run in a thread of their own (while the caller goes on)."""
        return self._pool is not None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        if self._pool is None:
            job()
        else:
            self._pending.append(self._pool.submit(job))

    def check(self) -> None:
        """Raise the error of a finished job, if one failed."""
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()

    def wait(self) -> None:
        """Wait for every job; raise the first error."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait for the job in flight (a run that failed in training still completes its last
        checkpoint); never raises."""
        for job in self._pending:
            error = job.exception()
            if error is not None:
                log.warning("a checkpoint job of a run that ended failed too: %s: %s",
                            type(error).__name__, error)
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def train_and_evaluate(
    config: RunConfig,
    *,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    data_parallel: DataParallel | None = None,
    return_state: bool = False,
    on_checkpoint: Callable[[int, str], None] | None = None,
    evaluate: bool = True,
    index_stream: Callable[[int, Mapping[str, Any] | None], Any] | None = None,
    on_data_position: Callable[[int, Mapping[str, Any]], None] | None = None,
    on_examples: Callable[[int, np.ndarray], None] | None = None,
) -> RunResult:
    """Train one run to its step budget (or divergence, cancellation, target) and evaluate it.

    Args:
      config: the run.
      on_eval: called with every evaluation point (step, learning rate, train and
        validation metrics), e.g. to report progress.
      should_stop: polled between steps; True ends the run as CANCELLED (after a checkpoint).
      data_parallel: the devices to use (default: all).
      return_state: put the final TrainState in ``RunResult.final_state``.
      on_checkpoint: called with (step, checkpoint_dir) after each checkpoint is on disk
        (its files are in ``checkpoint_dir/<step>``), e.g. to upload it. In a single-process
        run it is called from a background thread, in step order, while training goes on
        (an error it raises fails the run at the next step); the run returns once every
        call has returned. In a multi-process run, process 0 alone writes the checkpoint
        (the state is replicated) and every process is called, in the training thread
        (e.g. to record its data position, or to run a collective).
      evaluate: evaluate at each evaluation point in this process. False leaves the
        evaluation to someone else (the evaluation service reads the checkpoint saved at
        every point): points carry the step, learning rate and training loss only, and the
        run needs a checkpoint_dir.
      index_stream: ``fn(num_examples, saved) -> stream``: this process's example-index
        stream from elsewhere (the sharding service), starting where its provider says,
        instead of one computed here and moved to the position saved with the checkpoint;
        ``saved`` is that position (the checkpoint's ``data_state["indices"]``, None at the
        start), e.g. to check that both agree. See batchlab.data.BatchIterator.
      on_data_position: called on every process at each checkpoint, before on_checkpoint
        and from the same thread, with (step, the training input's position at that step:
        its ``get_state()["indices"]``).
      on_examples: called with (step, the example indices of this process's batch) for
        every step trained, e.g. to log what a run read.

    Returns:
      The RunResult. Exceptions inside training become outcome FAILED with the error text;
      an invalid config raises ValueError before anything runs.
    """
    start_wall = time.perf_counter()
    if not evaluate and (config.checkpoint_dir is None or config.stop_at_target):
        raise ValueError("evaluate: False needs a checkpoint_dir (the evaluation reads the "
                         "checkpoint of each point) and no stop_at_target")
    run = _Run(config, data_parallel)  # ValueError for bad configs: the caller's mistake
    cfg = config
    ckpt = None
    curve: list[dict[str, float]] = []
    resumed_from = None
    initialised_from = None
    state = None
    step = 0
    outcome, error, diverged_step = Outcome.SUCCEEDED, None, None
    failure = None
    input_wait = train_time = startup_time = 0.0
    steps_this_session = 0
    pending: list[tuple[int, jax.Array]] = []
    # Training losses since the last evaluation (their mean is the next point's
    # train/batch_loss); checkpointed, so a run resumed mid-window records the same curve.
    window_losses: list[float] = []
    writer = _CheckpointWriter(background=jax.process_count() == 1)
    saved_step: int | None = None  # the step of the latest checkpoint, saved or on its way

    def check_divergence() -> int | None:
        nonlocal pending
        if not pending:
            return None
        losses = jax.device_get([loss for _, loss in pending])
        first_bad = None
        for (s, _), value in zip(pending, losses, strict=True):
            if first_bad is None and not np.isfinite(value):
                first_bad = s
            window_losses.append(float(value))
        pending = []
        return first_bad

    def save(iterator: BatchIterator) -> None:
        # A cancellation right after an evaluation (or right after resuming) finds this step
        # saved already, with the same content; orbax refuses to overwrite it.
        nonlocal saved_step
        if ckpt is None or step == saved_step:
            return
        saved_step = at = step
        data_state = copy.deepcopy(iterator.get_state())
        # What the job writes is taken now: training goes on meanwhile.
        host_state = None
        if jax.process_index() == 0:
            host_state = snapshot(state) if writer.background else state
        meta = {"step": at, "curve": copy.deepcopy(curve), "data_state": data_state,
                "window_losses": list(window_losses)}
        directory = str(ckpt.directory)
        checkpointer = ckpt

        def job() -> None:
            if host_state is not None:
                checkpointer.save(at, host_state, meta)
            if on_data_position is not None:
                on_data_position(at, data_state["indices"])
            if on_checkpoint is not None:
                on_checkpoint(at, directory)

        writer.submit(job)

    try:
        ckpt = RunCheckpointer(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        saved_step = None if ckpt is None else ckpt.latest_step()
        data_state = None
        state = run.init_state()
        if ckpt is not None and ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state)
            state = run.dp.put_replicated(state)
            curve, data_state = meta["curve"], meta["data_state"]
            window_losses = [float(x) for x in meta.get("window_losses", [])]
            resumed_from = int(meta["step"])
            log.info("resumed %s from step %d", cfg.checkpoint_dir, resumed_from)
        elif cfg.init_checkpoint is not None:
            state = run.warm_start(state)
            initialised_from = f"{cfg.init_checkpoint} (step {run.init_step})"
            log.info("initialised from %s", initialised_from)
        step = int(jax.device_get(state.step))
        example_key = "example_index" if on_examples is not None else None
        extra: dict[str, Any] = {} if example_key is None else {"index_key": example_key}
        if index_stream is not None:
            saved = None if data_state is None else data_state.get("indices")
            extra["index_stream"] = lambda n: index_stream(n, saved)
            data_state = None  # the stream starts where its provider says
        iterator = run.train_iterator(data_state, **extra)
        with iterator:
            t_train = time.perf_counter()
            while step < cfg.total_steps:
                if should_stop is not None and should_stop():
                    bad = check_divergence()
                    if bad is not None:
                        outcome, diverged_step = Outcome.DIVERGED, bad
                        log.info("run diverged at step %d", bad)
                        break
                    outcome = Outcome.CANCELLED
                    save(iterator)
                    break
                writer.check()
                t0 = time.perf_counter()
                batch = next(iterator)
                input_wait += time.perf_counter() - t0
                if example_key is not None and on_examples is not None:
                    on_examples(step + 1, batch.pop(example_key))
                state, metrics = run.train_step(
                    state, _to_model_batch(run.workload, batch, run.input_key)
                )
                step += 1
                steps_this_session += 1
                if steps_this_session == 1:
                    # The first step compiles and the first batch loads the data: keep both
                    # out of the steady-state throughput and input-wait figures.
                    jax.block_until_ready(state.params)
                    startup_time = time.perf_counter() - t_train
                    input_wait = 0.0
                    t_train = time.perf_counter()
                pending.append((step, metrics["loss"]))
                is_eval = step % cfg.eval_every_steps == 0 or step == cfg.total_steps
                if step % cfg.divergence_check_every == 0 or is_eval:
                    bad = check_divergence()
                    if bad is not None:
                        outcome, diverged_step = Outcome.DIVERGED, bad
                        log.info("run diverged at step %d", bad)
                        break
                if is_eval:
                    jax.block_until_ready(state.params)
                    train_time += time.perf_counter() - t_train
                    point = {"step": float(step), "learning_rate": float(run.lr_fn(step - 1))}
                    point["train/batch_loss"] = float(np.mean(window_losses)) if window_losses else math.nan
                    window_losses.clear()
                    if evaluate:
                        point.update(run.evaluate(state))
                    curve.append(point)
                    if on_eval is not None:
                        on_eval(point)
                    save(iterator)
                    t_train = time.perf_counter()
                    if cfg.stop_at_target and cfg.target and cfg.target.is_met(point.get(cfg.target.metric, math.nan)):
                        break
        writer.wait()
    except Exception as err:  # noqa: BLE001 - any failure inside training is the FAILED outcome
        log.exception("run failed at step %d", step)
        # A checkpoint job of a run that had diverged failed: the attempt is lost (its
        # checkpoint is not stored), whatever the run did.
        outcome, error, diverged_step = Outcome.FAILED, f"{type(err).__name__}: {err}", None
        failure = "infrastructure" if getattr(err, "infrastructure", False) else "run"
    finally:
        writer.close()
        if ckpt is not None:
            ckpt.close()

    stt = math.inf
    if cfg.target is not None and curve:
        stt = steps_to_target(
            [int(p["step"]) for p in curve],
            [p.get(cfg.target.metric, math.nan) for p in curve],
            cfg.target.value,
            cfg.target.goal,
        )
    examples = max(steps_this_session - 1, 0) * cfg.batch_size
    return RunResult(
        outcome=outcome,
        steps_completed=step,
        curve=curve,
        steps_to_target=stt,
        diverged_step=diverged_step,
        error=error,
        wall_time_s=time.perf_counter() - start_wall,
        train_time_s=train_time,
        input_wait_s=input_wait,
        examples_per_second=examples / train_time if train_time > 0 else 0.0,
        startup_time_s=startup_time,
        resumed_from_step=resumed_from,
        failure=failure,
        initialised_from=initialised_from,
        final_state=state if return_state else None,
    )
