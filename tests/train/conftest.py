"""Fixtures for the training-loop tests: real mnist1d 'small' data, one shared baseline run.

Every run here goes through ``train_and_evaluate`` on data built by ``batchlab.data.prepare``.
Compiling the tiny model (about 5 s a run) is most of the cost, so the session points JAX's
persistent compilation cache at a fresh folder: runs whose programs are identical (same
optimizer, batch size and workload) compile once, and a repeated run takes about a second.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache
from train_helpers import Recorder

from batchlab import data
from batchlab.train import RunConfig, RunResult, train_and_evaluate

WORKLOAD = "mnist1d_resnet1d_small"
BATCH_SIZE = 64
TOTAL_STEPS = 30
EVAL_EVERY = 10
# A schedule, so each curve point's learning_rate pins which step's rate is logged.
OPTIMIZER = {
    "optimizer": "nesterov",
    "learning_rate": {"schedule": "cosine", "peak_value": 0.2, "warmup_steps": 5},
    "momentum": 0.9,
}


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_dir(tmp_path_factory) -> Iterator[Any]:
    """A persistent compilation cache private to this session (empty at the start)."""
    path = tmp_path_factory.mktemp("jax_cache")
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX decides once per process whether the cache is on; earlier tests may have compiled.
    compilation_cache.reset_cache()
    yield path
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A tfds folder with mnist1d 'small' (1,600 train / 400 validation) built once."""
    path = tmp_path_factory.mktemp("tfds")
    data.prepare("mnist1d", path, config="small")
    return str(path)


@pytest.fixture(scope="session")
def make_config(data_dir):
    """``make_config(**overrides)``: the baseline RunConfig with fields replaced."""

    def make(**overrides: Any) -> RunConfig:
        base = RunConfig(
            workload=WORKLOAD,
            optimizer=OPTIMIZER,
            batch_size=BATCH_SIZE,
            total_steps=TOTAL_STEPS,
            eval_every_steps=EVAL_EVERY,
            seed=0,
            data_dir=data_dir,
        )
        return dataclasses.replace(base, **overrides)

    return make


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    """A Recorder patched into the loop for one test."""
    return Recorder().patch(monkeypatch)


@dataclasses.dataclass
class BaselineRun:
    """The uninterrupted reference run (checkpointed, final state returned)."""

    result: RunResult
    recorder: Recorder
    eval_points: list[dict[str, float]]
    checkpoint_dir: str


@pytest.fixture(scope="session")
def baseline(make_config, tmp_path_factory) -> BaselineRun:
    """30 steps of batch 64, evaluated every 10 steps, checkpointed at every evaluation."""
    checkpoint_dir = str(tmp_path_factory.mktemp("ckpt_baseline"))
    points: list[dict[str, float]] = []
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder().patch(mp)
        result = train_and_evaluate(
            make_config(checkpoint_dir=checkpoint_dir), on_eval=points.append, return_state=True
        )
    return BaselineRun(result, rec, points, checkpoint_dir)
