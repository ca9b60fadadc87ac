"""`make bench-gpu` (benchmarks/gpu.sh): what one accelerator does with batchlab's workloads.

Measured in one process, each figure from the library's own code:

* ResNet-50 v1.5 and BERT-Large phase 1 (sequence 128): the library's ``make_train_step``
  (forward, backward, the paper's optimizer: the LARS pipeline of ``lars_pipeline_32k`` and the
  Adam of ``bert_adam_b32k_phase1``) in bfloat16 on one device, on synthetic batches already on
  the device, compile time apart. Model FLOP utilisation is the FLOPs XLA's cost analysis counts
  in the compiled step over its time, against the device's dense bf16 peak (the datasheet table
  in benchmarks/resnet50.py) or, on a CPU, the float32 matmul rate measured in the same run.
* The optimizer updates: benchmarks/optimizers.py's interleaved run (each update beside its
  minimal same-math form and optax's peer).
* Vectorised lanes: K runs of the CPU-scale workload (mnist1d_resnet1d, batch 128 per run,
  per-run parameters and optimizer state) as one ``jax.vmap`` of the train step.
* The host's ImageNet input rate: the library's BatchIterator running the MLPerf training
  preprocessing (batchlab.data.imagenet) on generated JPEGs, at several worker counts.

Modes: ``full`` (an accelerator: per-device batch 256 at 224 px, BERT-Large), ``reduced`` (a
CPU: the same programs at toy sizes and a tiny BERT, in about 3 minutes) and ``smoke`` (the
reduced run made smaller still, for the test). Results go to ``<out>/gpu-<device kind>.{md,json}``,
rewritten after every section so that a run cut short keeps what it measured.

Usage: python -m benchmarks.gpu [--mode full|reduced|smoke] [--out DIR] [--budget-s S]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from batchlab.data import dataset_info, imagenet
from batchlab.data.pipeline import BatchIterator
from batchlab.optim import optimizer_arguments
from batchlab.optim.paper import paper_config
from batchlab.train.steps import TrainState, make_train_step
from batchlab.train.workloads import get_workload
from benchmarks import common, optimizers, resnet50

__all__ = ["MODES", "SECTIONS", "Mode", "main", "mock_jpegs", "nvidia_smi", "run", "to_markdown"]

log = logging.getLogger(__name__)

# MLPerf-class ResNet-50 training: roughly 3,000 images/s per H100-class GPU (issue 11).
REFERENCE_RESNET50_IMAGES_PER_S = 3000.0
LANES_WORKLOAD = "mnist1d_resnet1d"
LANES_BATCH = 128
LANES_OPTIMIZER = {"optimizer": "nesterov", "learning_rate": 0.05, "momentum": 0.9}
# ImageNet's training images average about 470 x 390 pixels (width x height) and 110 KiB as JPEG;
# the mock JPEGs are drawn around that size.
MOCK_HEIGHTS, MOCK_WIDTHS = (320, 460), (400, 540)


@dataclasses.dataclass(frozen=True)
class Mode:
    """The sizes of one run.

    Attributes:
      resnet_batch: per-device batch of the ResNet-50 step.
      image_size: its input resolution.
      bert_workload: "bert_large_phase1", or "mlm_tiny_bert" where BERT-Large would not fit the time.
      bert_batch: per-device batch of the BERT step (sequence length 128 either way).
      optimizer_tree: the workload whose parameter shapes the updates run on
        ("imagenet_resnet50": ResNet-50's 25.6 M parameters).
      optimizer_iters: timed updates per contender per round (one round).
      lanes: the K values of the vmap curve.
      pipeline_images: mock JPEGs generated.
      pipeline_batch: batch size of the input pipeline.
      pipeline_workers: worker-thread counts tried; 0 means every core.
      window_s: time each timed window aims at (steps are sized from a warm step).
      rounds: timed windows per step measurement (the median is reported).
      budget_s: the run's time budget (gpu.sh passes its own).
    """

    resnet_batch: int
    image_size: int
    bert_workload: str
    bert_batch: int
    optimizer_tree: str
    optimizer_iters: int
    lanes: tuple[int, ...]
    pipeline_images: int
    pipeline_batch: int
    pipeline_workers: tuple[int, ...]
    window_s: float
    rounds: int
    budget_s: float


MODES: dict[str, Mode] = {
    "full": Mode(
        resnet_batch=256,
        image_size=224,
        bert_workload="bert_large_phase1",
        bert_batch=128,
        optimizer_tree="imagenet_resnet50",
        optimizer_iters=10,
        lanes=(1, 2, 4, 8, 16),
        pipeline_images=512,
        pipeline_batch=128,
        pipeline_workers=(1, 4, 8, 0),
        window_s=2.0,
        rounds=3,
        budget_s=540.0,
    ),
    "reduced": Mode(
        resnet_batch=4,
        image_size=64,
        bert_workload="mlm_tiny_bert",
        bert_batch=16,
        optimizer_tree="digits_resnet20",
        optimizer_iters=3,
        lanes=(1, 2, 4, 8, 16),
        pipeline_images=48,
        pipeline_batch=16,
        pipeline_workers=(1, 0),
        window_s=1.0,
        rounds=3,
        budget_s=170.0,
    ),
    "smoke": Mode(
        resnet_batch=2,
        image_size=32,
        bert_workload="mlm_tiny_bert",
        bert_batch=4,
        optimizer_tree="mnist1d_resnet1d_small",
        optimizer_iters=1,
        lanes=(1, 2),
        pipeline_images=12,
        pipeline_batch=4,
        pipeline_workers=(1, 0),
        window_s=0.2,
        rounds=2,
        budget_s=600.0,
    ),
}
SECTIONS = ("resnet50", "bert", "mfu", "optimizers", "lanes", "input_pipeline")


# -- timing a train step ------------------------------------------------------------------------
def _cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", float("nan")))


def _time_step(step: Callable, state, batch, *args: Any, window_s: float,
               rounds: int) -> dict[str, Any]:
    """Compile ``step(state, batch, *args) -> (state, metrics)`` with the state donated, then
    time it.

    Two warm steps run first (the second sizes the timed windows to about ``window_s``); the
    step time is the median over ``rounds`` windows.
    """
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch, *args).compile()
    compile_s = time.perf_counter() - start
    for _ in range(2):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, *args)
        jax.block_until_ready((state, metrics))
        warm_s = time.perf_counter() - start
    steps = max(1, min(200, round(window_s / max(warm_s, 1e-6))))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch, *args)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - start) / steps)
    loss = np.asarray(metrics["loss"])
    return {
        "compile_s": compile_s,
        "step_s": float(np.median(times)),
        "step_s_min": float(np.min(times)),
        "step_s_max": float(np.max(times)),
        "steps_per_window": steps,
        "rounds": rounds,
        "flops_per_step": _cost_flops(compiled),
        "loss_finite": bool(np.isfinite(loss).all()),
    }


def _init_state(
    workload, hparams, model, optimizer, key, dummy: dict[str, jax.Array]
) -> TrainState:
    """The loop's initial TrainState (batchlab.train.loop), from a dummy batch of the right shapes."""
    init_key, dropout_key = jax.random.split(key)
    if workload.kind == "classification":
        variables = model.init(init_key, dummy["input"], train=False)
    else:
        variables = model.init(
            init_key,
            dummy["input_ids"],
            dummy["segment_ids"],
            dummy["input_mask"],
            dummy["masked_lm_positions"],
            train=False,
        )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats"),
        opt_state=optimizer.init(variables["params"]),
        rng=jax.random.key_data(dropout_key),
    )


def _argument_step(workload, hp, model, build: Callable) -> Callable:
    """``step(state, batch, values)``: the library's train step with the optimizer built from
    ``values`` inside it, as the training loop runs it (batchlab.optim.optimizer_arguments)."""

    def step(state, batch, values):
        return make_train_step(workload, hp, model, build(dict(values)))(state, batch)

    return step


def _paper_step(workload, hp, model, optimizer_config, total_steps: int, batch, dummy,
                mode: Mode) -> dict[str, Any]:
    """Initialise as the loop does, then compile and time the library's train step as the
    loop runs it: the optimizer's real-valued hyperparameters are arguments of the step, not
    constants (batchlab.optim.optimizer_arguments)."""
    build, values = optimizer_arguments(optimizer_config, total_steps=total_steps)
    state = jax.jit(lambda k: _init_state(workload, hp, model, build(values), k, dummy))(
        jax.random.key(0)
    )
    params = int(sum(x.size for x in jax.tree.leaves(state.params)))
    step = _argument_step(workload, hp, model, build)
    timed = _time_step(step, state, batch, values, window_s=mode.window_s, rounds=mode.rounds)
    return {"parameters": params, **timed}


def _resnet50(mode: Mode) -> dict[str, Any]:
    """The paper's ResNet-50 v1.5 step (LARS pipeline, label smoothing, virtual-batch BN) in bf16."""
    cfg = paper_config("lars_pipeline_32k")
    workload = get_workload(cfg.workload)
    # The paper's virtual batch is 64; a toy CPU batch smaller than that is one virtual batch.
    hp = workload.hyperparameters(
        {**cfg.hyperparameters, "virtual_batch_size": min(64, mode.resnet_batch)}
    )
    model = workload.model(hp, dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    size = mode.image_size
    # float32 images, as the input pipeline delivers them; the model computes in bf16.
    batch = {
        "input": jnp.asarray(rng.normal(size=(mode.resnet_batch, size, size, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 1000, mode.resnet_batch), jnp.int32),
    }
    dummy = {"input": batch["input"][: min(2 * hp["virtual_batch_size"], mode.resnet_batch)]}
    timed = _paper_step(workload, hp, model, cfg.optimizer, cfg.total_steps, batch, dummy, mode)
    return {
        "model": "ResNet-50 v1.5",
        "optimizer": f"{cfg.name} (paper_config)",
        "dtype": "bfloat16",
        "batch_per_device": mode.resnet_batch,
        "image_size": size,
        "virtual_batch_size": hp["virtual_batch_size"],
        **timed,
        "images_per_s": mode.resnet_batch / timed["step_s"],
    }


def _bert(mode: Mode) -> dict[str, Any]:
    """BERT pretraining (MLM + NSP, dropout on) at sequence 128 with the paper's phase-1 Adam, bf16."""
    cfg = paper_config("bert_adam_b32k_phase1")
    workload = get_workload(mode.bert_workload)
    hp = workload.hyperparameters(cfg.hyperparameters)
    model = workload.model(hp, dtype=jnp.bfloat16)
    vocab = model.config.vocab_size
    b, seq, preds = mode.bert_batch, hp["max_seq_length"], hp["max_predictions_per_seq"]
    rng = np.random.default_rng(0)
    segment = (np.arange(seq)[None, :] >= seq // 2).astype(np.int32).repeat(b, 0)
    batch = {
        "input_ids": jnp.asarray(rng.integers(0, vocab, (b, seq)), jnp.int32),
        "segment_ids": jnp.asarray(segment),
        "input_mask": jnp.ones((b, seq), jnp.int32),
        "masked_lm_positions": jnp.asarray(np.sort(rng.choice(seq, (b, preds)), axis=1), jnp.int32),
        "masked_lm_ids": jnp.asarray(rng.integers(0, vocab, (b, preds)), jnp.int32),
        "masked_lm_weights": jnp.ones((b, preds), jnp.float32),
        "next_sentence_label": jnp.asarray(rng.integers(0, 2, b), jnp.int32),
    }
    timed = _paper_step(workload, hp, model, cfg.optimizer, cfg.total_steps, batch, batch, mode)
    c = model.config
    return {
        "model": f"{workload.name} ({c.num_layers} layers, hidden {c.hidden_size}, vocab {vocab})",
        "optimizer": f"{cfg.name} (paper_config)",
        "dtype": "bfloat16",
        "batch_per_device": b,
        "seq_length": seq,
        "max_predictions": preds,
        **timed,
        "sequences_per_s": b / timed["step_s"],
    }


def _mfu(results: dict[str, Any], peak: float, peak_source: str) -> dict[str, Any]:
    rows = []
    for name in ("resnet50", "bert"):
        r = results.get(name) or {}
        if "step_s" not in r:
            continue
        achieved = r["flops_per_step"] / r["step_s"]
        rows.append(
            {
                "model": r["model"],
                "flops_per_step": r["flops_per_step"],
                "achieved_flops": achieved,
                "mfu": achieved / peak,
            }
        )
    return {"peak_flops": peak, "peak_source": peak_source, "rows": rows}


# -- optimizer updates --------------------------------------------------------------------------
def _optimizer_updates(mode: Mode) -> dict[str, Any]:
    """benchmarks/optimizers.py's run on ResNet-50's tree, or on a smaller workload's shapes."""
    tree = None
    if mode.optimizer_tree != "imagenet_resnet50":
        workload = get_workload(mode.optimizer_tree)
        model = workload.model(workload.hyperparameters({}))
        dummy = jnp.zeros((2, *dataset_info(workload.dataset).input_shape))
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, train=False))
        tree = optimizers.random_tree(shapes["params"])
    result = optimizers.run(rounds=1, iters=mode.optimizer_iters, tree=tree)
    name = result["tree"] if tree is None else f"{mode.optimizer_tree}'s shapes ({result['tree']})"
    return {"tree_name": name, **result}


# -- vectorised lanes ---------------------------------------------------------------------------
def _lanes(mode: Mode) -> dict[str, Any]:
    """K independent runs of the CPU-scale workload as one vmapped train step, each lane with
    its own optimizer hyperparameters (arguments, as the loop passes them: lane i's learning
    rate is the base one times 1 + i / K) and its own data."""
    workload = get_workload(LANES_WORKLOAD)
    hp = workload.hyperparameters({})
    model = workload.model(hp)
    build, base_values = optimizer_arguments(LANES_OPTIMIZER, total_steps=1000)
    step = _argument_step(workload, hp, model, build)
    rows = []
    for k in mode.lanes:
        rng = np.random.default_rng(k)
        # Each lane its own batch, as runs with their own data order would have.
        batch = {
            "input": jnp.asarray(rng.normal(size=(k, LANES_BATCH, 40)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, (k, LANES_BATCH)), jnp.int32),
        }
        dummy = {"input": batch["input"][0, : 2 * hp["virtual_batch_size"]]}
        keys = jax.random.split(jax.random.key(0), k)
        values = {name: jnp.full((k,), value, jnp.float32) for name, value in base_values.items()}
        values["learning_rate.value"] = values["learning_rate.value"] * (1 + jnp.arange(k) / k)
        states = jax.jit(
            jax.vmap(
                lambda key, dummy=dummy: _init_state(workload, hp, model, build(base_values),
                                                     key, dummy)
            )
        )(keys)
        timed = _time_step(
            jax.vmap(step), states, batch, values, window_s=mode.window_s, rounds=mode.rounds
        )
        rows.append(
            {
                "k": k,
                "compile_s": timed["compile_s"],
                "step_s": timed["step_s"],
                "examples_per_s": k * LANES_BATCH / timed["step_s"],
                "loss_finite": timed["loss_finite"],
            }
        )
    base = rows[0]["examples_per_s"]
    for row in rows:
        row["vs_k1"] = row["examples_per_s"] / base
    return {
        "workload": LANES_WORKLOAD,
        "batch_per_lane": LANES_BATCH,
        "optimizer": LANES_OPTIMIZER["optimizer"],
        "rows": rows,
    }


# -- host input pipeline ------------------------------------------------------------------------
def mock_jpegs(n: int, *, seed: int = 0, quality: int = 90) -> list[bytes]:
    """``n`` JPEGs of ImageNet-like size and content statistics (smooth colour fields plus noise).

    Pure noise would compress badly and decode slower than photographs; flat images faster.
    Low-frequency colour upsampled with grain sits between (about 60-120 KiB a file here).
    """
    from PIL import Image  # Pillow: the pipeline's own JPEG decoder.

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(*MOCK_HEIGHTS)), int(rng.integers(*MOCK_WIDTHS))
        coarse = Image.fromarray(
            rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)
        )
        smooth = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), np.float32)
        pixels = np.clip(smooth + rng.normal(0.0, 16.0, smooth.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def _input_pipeline(mode: Mode, window_s: float) -> dict[str, Any]:
    """Images/s of BatchIterator + imagenet.train_preprocess (decode, crop, resize, flip, normalise)."""
    jpegs = mock_jpegs(mode.pipeline_images)
    source = [
        {"image": data, "label": np.int32(i % imagenet.NUM_CLASSES)} for i, data in enumerate(jpegs)
    ]
    cores = os.cpu_count() or 1
    workers = sorted({w or cores for w in mode.pipeline_workers})
    rows = []
    for n in workers:
        with BatchIterator(
            source,
            mode.pipeline_batch,
            seed=0,
            shuffle=True,
            preprocess=imagenet.train_preprocess,
            prefetch=2,
            num_workers=n,
        ) as it:
            first = next(it)
            images, start = 0, time.perf_counter()
            while time.perf_counter() - start < window_s or images == 0:
                images += len(next(it)["label"])
            elapsed = time.perf_counter() - start
        rows.append({"workers": n, "images_per_s": images / elapsed, "images": images})
    best = max(rows, key=lambda r: r["images_per_s"])
    return {
        "jpegs": len(jpegs),
        "mean_jpeg_kb": float(np.mean([len(j) for j in jpegs]) / 1024),
        "output_shape": list(first["image"].shape[1:]),
        "output_dtype": str(first["image"].dtype),
        "batch": mode.pipeline_batch,
        "cores": cores,
        "rows": rows,
        "max_images_per_s": best["images_per_s"],
        "best_workers": best["workers"],
    }


# -- the run ------------------------------------------------------------------------------------
def nvidia_smi() -> dict[str, str] | None:
    """nvidia-smi's name, driver and memory of the first GPU, or None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("nvidia-smi failed: %s", error)
        return None
    fields = [f.strip() for f in out.splitlines()[0].split(",")] if out.strip() else []
    return dict(zip(("name", "driver", "memory"), fields, strict=False)) or None


def _device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "nvidia_smi": nvidia_smi(),
    }


def _slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "unknown"


def run(mode_name: str, out: Path, *, budget_s: float | None = None) -> dict[str, Any]:
    """Measure every section, rewriting ``out/gpu-<device kind>.{md,json}`` after each.

    A section that raises is recorded with its error and the run goes on (an accelerator's time
    is scarce); a section that would start after the budget is spent is recorded as skipped.

    Returns:
      The JSON-able result.
    """
    mode = MODES[mode_name]
    budget = mode.budget_s if budget_s is None else budget_s
    started = time.perf_counter()
    device = _device_info()
    result: dict[str, Any] = {
        "mode": mode_name,
        "sizes": dataclasses.asdict(mode),
        "budget_s": budget,
        "stamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "machine": common.machine_description(),
        "versions": common.versions(
            "jax",
            "jaxlib",
            "jax-cuda12-plugin",
            "jax-cuda13-plugin",
            "flax",
            "optax",
            "numpy",
            "pillow",
        ),
        "sections": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu-{_slug(device['device_kind'])}"
    peak: tuple[float, str] | None = None

    def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        elapsed = time.perf_counter() - started
        if elapsed > budget:
            result["sections"][name] = {
                "skipped": f"budget of {budget:.0f} s spent ({elapsed:.0f} s)"
            }
            log.warning("skipping %s: budget spent", name)
        else:
            log.info("measuring %s", name)
            t0 = time.perf_counter()
            try:
                result["sections"][name] = {**fn(), "section_s": time.perf_counter() - t0}
            except Exception as error:  # noqa: BLE001 - keep the other sections' device time
                log.exception("section %s failed", name)
                result["sections"][name] = {"error": f"{type(error).__name__}: {error}"}
        result["wall_s"] = time.perf_counter() - started
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
        stem.with_suffix(".md").write_text(to_markdown(result))

    def mfu() -> dict[str, Any]:
        nonlocal peak
        peak = peak or resnet50.peak_flops(jax.devices()[0])
        return _mfu(result["sections"], *peak)

    section("resnet50", lambda: _resnet50(mode))
    section("bert", lambda: _bert(mode))
    section("mfu", mfu)
    section("optimizers", lambda: _optimizer_updates(mode))
    section("lanes", lambda: _lanes(mode))
    section("input_pipeline", lambda: _input_pipeline(mode, max(1.0, 2 * mode.window_s)))
    return result


# -- the report ---------------------------------------------------------------------------------
def _fmt(x: float, spec: str = ",.1f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _not_measured(r: dict[str, Any]) -> str | None:
    if not r:
        return "not measured (the run ended before this section)"
    if "error" in r:
        return f"FAILED: {r['error']}"
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    return None


def _step_lines(r: dict[str, Any], unit: str, rate_key: str, reference: str) -> list[str]:
    return [
        f"{r['model']}, {r['parameters']:,} parameters; {r['optimizer']}; {r['dtype']}; "
        f"per-device batch {r['batch_per_device']}; synthetic data already on the device; "
        f"median of {r['rounds']} windows of {r['steps_per_window']} steps; loss finite: {r['loss_finite']}.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| compile (apart from the timing) | {r['compile_s']:.1f} s |",
        f"| step time (median; min-max) | {r['step_s'] * 1e3:.1f} ms ({r['step_s_min'] * 1e3:.1f}-"
        f"{r['step_s_max'] * 1e3:.1f}) |",
        f"| {unit} per device | {_fmt(r[rate_key])} |",
        f"| FLOPs per step (XLA cost analysis) | {r['flops_per_step'] / 1e9:,.2f} GFLOP |",
        f"| reference | {reference} |",
        "",
    ]


def _rendered(
    title: str, r: dict[str, Any], render: Callable[[dict[str, Any]], list[str]]
) -> list[str]:
    """A section: its heading, then why it is missing or what ``render`` makes of it."""
    missing = _not_measured(r)
    return [title, "", *([missing, ""] if missing else render(r))]


def _mfu_lines(m: dict[str, Any]) -> list[str]:
    return [
        "Achieved = XLA's FLOP count of the compiled step / step time; peak: "
        f"{_fmt(m['peak_flops'] / 1e12, ',.3f')} TFLOP/s ({m['peak_source']}).",
        "",
        "| model | FLOPs per step | achieved | MFU |",
        "|---|---:|---:|---:|",
        *[
            f"| {row['model']} | {row['flops_per_step'] / 1e12:.4f} TFLOP | "
            f"{row['achieved_flops'] / 1e12:.4f} TFLOP/s | {_fmt(row['mfu'], '.1%')} |"
            for row in m["rows"]
        ],
        "",
    ]


def _optimizer_lines(o: dict[str, Any]) -> list[str]:
    by = {(row["optimizer"], row["role"]): row for row in o["rows"]}
    lines = [
        f"{o['tree_name']}; benchmarks/optimizers.py's interleaved run ({o['rounds']} round x "
        f"{o['iters']} updates per contender, params and state donated, weight decay "
        f"{o['weight_decay']:g}).",
        "",
        "| optimizer | batchlab ms | minimal same-math ms | optax peer ms | batchlab / minimal "
        "| GB/s (batchlab) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for agg in o["optimizers"]:
        name = agg["optimizer"]
        ours, minimal, peer = (by.get((name, role)) for role in ("batchlab", "minimal", "optax"))
        peer_ms = "n/a" if peer is None else f"{peer['median_ms']:.2f}"
        lines.append(
            f"| {name} | {ours['median_ms']:.2f} | {minimal['median_ms']:.2f} | {peer_ms} | "
            f"{agg['batchlab_over_minimal']:.3f} | {ours['gb_per_s']:.1f} |"
        )
    return [*lines, ""]


def _lane_lines(v: dict[str, Any]) -> list[str]:
    return [
        f"{v['workload']}, batch {v['batch_per_lane']} per lane, {v['optimizer']}, per-lane "
        "parameters, optimizer state, optimizer hyperparameters (arguments of the step, as in "
        "training; the learning rate differs by lane) and batches; examples/s over all lanes.",
        "",
        "| K | compile s | step ms | examples/s | vs K = 1 |",
        "|---:|---:|---:|---:|---:|",
        *[
            f"| {row['k']} | {row['compile_s']:.1f} | {row['step_s'] * 1e3:.2f} | "
            f"{row['examples_per_s']:,.0f} | {row['vs_k1']:.2f}x |"
            for row in v["rows"]
        ],
        "",
    ]


def _pipeline_lines(p: dict[str, Any], need: float, devices: int) -> list[str]:
    if math.isnan(need):
        verdict = "n/a (ResNet-50 not measured)"
    else:
        enough = "yes" if p["max_images_per_s"] >= need else "NO"
        verdict = (
            f"{p['max_images_per_s']:,.0f} images/s against {need:,.0f} needed by {devices} "
            f"device(s): {enough} ({p['max_images_per_s'] / need:.2f}x)"
        )
    return [
        "batchlab.data BatchIterator + imagenet.train_preprocess (PIL decode, distorted crop, "
        f"bilinear resize to {p['output_shape'][0]}, flip, normalise to {p['output_dtype']}) on "
        f"{p['jpegs']} generated JPEGs of about 470 x 390 px, {p['mean_jpeg_kb']:.0f} KiB on "
        f"average; batch {p['batch']}; {p['cores']} cores on this host.",
        "",
        "| worker threads | images/s |",
        "|---:|---:|",
        *[f"| {row['workers']} | {row['images_per_s']:,.1f} |" for row in p["rows"]],
        "",
        f"Can this host feed the devices at the measured ResNet-50 rate? {verdict}.",
        "",
    ]


def to_markdown(result: dict[str, Any]) -> str:
    """Render the result (possibly partial) as markdown."""
    s, device, mode = result["sections"], result["device"], result["mode"]
    smi = device.get("nvidia_smi")
    gpu = (
        f"{smi.get('name')} (driver {smi.get('driver')}, {smi.get('memory')})"
        if smi
        else "none (no nvidia-smi)"
    )
    full = mode == "full"
    lines = [
        f"# GPU benchmark: {device['device_kind']} ({result['stamp']})",
        "",
        "| | |",
        "|---|---|",
        f"| JAX device | {device['devices']} x {device['device_kind']} ({device['platform']}); measured on one |",
        f"| nvidia-smi | {gpu} |",
        *[
            f"| {k} | {v} |"
            for k, v in result["machine"].items()
            if k in ("host", "cpu", "cores", "memory")
        ],
        f"| mode | {mode}{'' if full else ' (toy sizes: NOT comparable with accelerator figures)'} |",
        f"| wall time | {result.get('wall_s', 0.0):.0f} s (budget {result['budget_s']:.0f} s) |",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        "Command: `make bench-gpu` (benchmarks/gpu.sh -> python -m benchmarks.gpu). Timings on a shared "
        "machine are noisy.",
        "",
    ]
    r = s.get("resnet50", {})
    if "images_per_s" in r and full:
        ref = (
            f"MLPerf-class about {REFERENCE_RESNET50_IMAGES_PER_S:,.0f} images/s per H100-class GPU: "
            f"{r['images_per_s'] / REFERENCE_RESNET50_IMAGES_PER_S:.2f}x"
        )
    else:
        ref = f"MLPerf-class about {REFERENCE_RESNET50_IMAGES_PER_S:,.0f} images/s per H100-class GPU (not comparable here)"
    res = f" at {r['image_size']} px" if "image_size" in r else ""
    lines += _rendered(
        f"## ResNet-50 v1.5 training, bfloat16{res}",
        r,
        lambda r: _step_lines(r, "images/s", "images_per_s", ref),
    )
    lines += _rendered(
        "## BERT pretraining phase 1 (sequence 128), bfloat16",
        s.get("bert", {}),
        lambda r: _step_lines(r, "sequences/s", "sequences_per_s", "none recorded here"),
    )
    lines += _rendered("## Model FLOP utilisation", s.get("mfu", {}), _mfu_lines)
    lines += _rendered("## Optimizer update times", s.get("optimizers", {}), _optimizer_lines)
    lines += _rendered(
        "## Vectorised lanes: K runs as one vmapped train step", s.get("lanes", {}), _lane_lines
    )
    need = r.get("images_per_s", float("nan")) * device["local_devices"]
    lines += _rendered(
        "## Host input pipeline: MLPerf ImageNet training preprocessing on mock JPEGs",
        s.get("input_pipeline", {}),
        lambda p: _pipeline_lines(p, need, device["local_devices"]),
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mode", choices=sorted(MODES), help="default: full on an accelerator, reduced on a CPU"
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--budget-s", type=float, help="time budget (default: the mode's)")
    args = parser.parse_args(argv)
    # force: an imported library has already given the root logger a WARNING-level handler.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    mode = args.mode or ("reduced" if jax.default_backend() == "cpu" else "full")
    result = run(mode, Path(args.out), budget_s=args.budget_s)
    stem = Path(args.out) / f"gpu-{_slug(result['device']['device_kind'])}"
    print(stem.with_suffix(".md").read_text())
    failed = [k for k, v in result["sections"].items() if "error" in v or "skipped" in v]
    if failed:
        log.error("not measured: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
