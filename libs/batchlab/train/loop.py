"""The training loop: train_and_evaluate(RunConfig) -> RunResult.

One run trains one workload with one optimizer configuration at one batch size for a
step budget, evaluating on training and held-out data every ``eval_every_steps``.
It ends with an explicit outcome: SUCCEEDED (budget reached), DIVERGED (a non-finite
training loss), FAILED (an exception), CANCELLED (asked to stop). With a checkpoint
directory it saves at every evaluation and resumes from the newest checkpoint, ending
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from batchlab import data as bdata
from batchlab.optim import from_config, learning_rate_fn, validate_optimizer_config
from batchlab.search.protocol import Outcome
from batchlab.search.scoring import steps_to_target
from batchlab.search.study import Goal, Target
from batchlab.train.checkpoint import RunCheckpointer
from batchlab.train.parallel import DataParallel
from batchlab.train.steps import TrainState, make_eval_step, make_train_step
from batchlab.train.workloads import Workload, get_workload

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

    def __init__(self, source, n: int):
        self._source, self._n = source, min(n, len(source))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int):
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._source[i]

    def __getitems__(self, indices):
        # tfds sources read many records per call; keep that (reading 10k one by one is slow).
        if any(not 0 <= i < self._n for i in indices):
            raise IndexError(indices)
        getitems = getattr(self._source, "__getitems__", None)
        return getitems(list(indices)) if getitems else [self._source[i] for i in indices]


def _to_model_batch(workload: Workload, batch: Mapping[str, np.ndarray], input_key: str):
    if workload.kind == "classification":
        out = {"input": batch[input_key], "label": batch["label"]}
    else:
        out = {k: v for k, v in batch.items() if k != "mask"}
    if "mask" in batch:
        out["mask"] = batch["mask"]
    return out


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
        self.model = w.model(hp, **extra)
        self.optimizer = from_config(config.optimizer, total_steps=config.total_steps)
        self.lr_fn = learning_rate_fn(config.optimizer, total_steps=config.total_steps)
        self.train_step = jax.jit(
            make_train_step(w, hp, self.model, self.optimizer),
            in_shardings=(self.dp.replicated, self.dp.batch),
            out_shardings=(self.dp.replicated, self.dp.replicated),
            donate_argnums=(0,),
        )
        self.eval_step = jax.jit(
            make_eval_step(w, hp, self.model),
            in_shardings=(self.dp.replicated, self.dp.batch),
            out_shardings=self.dp.replicated,
        )
        self._eval_sources: dict[str, Any] = {}

    # -- state ---------------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        key = jax.random.key(self.config.seed)
        init_key, dropout_key = jax.random.split(key)
        dummy = self.workload.dummy_batch(2 * max(1, self.hparams.get("virtual_batch_size") or 1), self.input_shape, self.hparams)

        # The keys are arguments, not constants: every seed then compiles the same program,
        # which the persistent compilation cache serves to later runs.
        @jax.jit
        def init(k, dropout_key):
            if self.workload.kind == "classification":
                variables = self.model.init(k, dummy["input"], train=False)
            else:
                variables = self.model.init(
                    k, dummy["input_ids"], dummy["segment_ids"], dummy["input_mask"],
                    dummy["masked_lm_positions"], train=False,
                )
            params = variables["params"]
            return TrainState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                batch_stats=variables.get("batch_stats"),
                opt_state=self.optimizer.init(params),
                rng=jax.random.key_data(dropout_key),
            )

        return self.dp.put_replicated(init(init_key, dropout_key))

    # -- data ----------------------------------------------------------------------------------
    def train_iterator(self, state: Mapping[str, Any] | None):
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
            **self.data_kwargs,
        )

    def _eval_batches(self, split: str, limit: int | None, batch_size: int):
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
            source = bdata.get_dataset(w.dataset, split, self.data_dir, config=w.dataset_config)
            if limit:
                source = _Subset(source, limit)
            if w.dataset != "imagenet2012":
                # Small enough to hold in memory: read once per run, not at every evaluation.
                arrays = bdata.ArraySource.from_source(source).arrays
                source = bdata.ArraySource({
                    self.input_key: arrays[self.input_key].astype(np.float32, copy=False),
                    "label": arrays["label"].astype(np.int32),
                })
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
        for split in splits:
            if split not in limits:
                raise ValueError(f"split: must be one of {sorted(limits)}, got {split!r}")
            limit = limits[split]
            it, max_batches = self._eval_batches(split, limit, batch_size)
            totals: dict[str, list] = {}
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


def train_and_evaluate(
    config: RunConfig,
    *,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    data_parallel: DataParallel | None = None,
    return_state: bool = False,
    on_checkpoint: Callable[[int, str], None] | None = None,
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
        (its files are in ``checkpoint_dir/<step>``), e.g. to upload it.

    Returns:
      The RunResult. Exceptions inside training become outcome FAILED with the error text;
      an invalid config raises ValueError before anything runs.
    """
    start_wall = time.perf_counter()
    run = _Run(config, data_parallel)  # ValueError for bad configs: the caller's mistake
    cfg = config
    ckpt = None
    curve: list[dict[str, float]] = []
    resumed_from = None
    state = None
    step = 0
    outcome, error, diverged_step = Outcome.SUCCEEDED, None, None
    input_wait = train_time = startup_time = 0.0
    steps_this_session = 0
    pending: list[tuple[int, jax.Array]] = []
    # Training losses since the last evaluation (their mean is the next point's
    # train/batch_loss); checkpointed, so a run resumed mid-window records the same curve.
    window_losses: list[float] = []

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

    def save(iterator) -> None:
        # A cancellation right after an evaluation (or right after resuming) finds this step
        # saved already, with the same content; orbax refuses to overwrite it.
        if ckpt is not None and ckpt.latest_step() != step:
            ckpt.save(step, state, {
                "step": step, "curve": curve, "data_state": iterator.get_state(),
                "window_losses": window_losses,
            })
            if on_checkpoint is not None:
                on_checkpoint(step, str(ckpt.directory))

    try:
        ckpt = RunCheckpointer(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        data_state = None
        state = run.init_state()
        if ckpt is not None and ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state)
            state = run.dp.put_replicated(state)
            curve, data_state = meta["curve"], meta["data_state"]
            window_losses = [float(x) for x in meta.get("window_losses", [])]
            resumed_from = int(meta["step"])
            log.info("resumed %s from step %d", cfg.checkpoint_dir, resumed_from)
        step = int(jax.device_get(state.step))
        with run.train_iterator(data_state) as iterator:
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
                t0 = time.perf_counter()
                batch = next(iterator)
                input_wait += time.perf_counter() - t0
                state, metrics = run.train_step(
                    state, run.dp.put_batch(_to_model_batch(run.workload, batch, run.input_key))
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
                    point.update(run.evaluate(state))
                    curve.append(point)
                    if on_eval is not None:
                        on_eval(point)
                    save(iterator)
                    t_train = time.perf_counter()
                    if cfg.stop_at_target and cfg.target and cfg.target.is_met(point.get(cfg.target.metric, math.nan)):
                        break
    except Exception as err:  # noqa: BLE001 - any failure inside training is the FAILED outcome
        log.exception("run failed at step %d", step)
        outcome, error = Outcome.FAILED, f"{type(err).__name__}: {err}"
    finally:
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
        final_state=state if return_state else None,
    )
