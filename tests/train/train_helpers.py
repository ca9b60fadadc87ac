"""Helpers of the training-loop tests: a recorder patched into the loop, a stopper, tree checks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from batchlab.train import loop as loop_module


class _RecordingIterator:
    """Wraps the loop's training iterator: records every batch; can fail at one."""

    def __init__(self, inner, recorder: Recorder):
        self._inner, self._recorder = inner, recorder

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._inner.__exit__(*exc_info)

    def __next__(self):
        rec = self._recorder
        index = rec.next_calls
        rec.next_calls += 1
        if rec.fail_at_batch is not None and index == rec.fail_at_batch:
            raise RuntimeError(f"injected data failure at batch {index}")
        batch = next(self._inner)
        rec.batches.append({k: np.array(v, copy=True) for k, v in batch.items()})
        return batch

    def get_state(self):
        return self._inner.get_state()


@dataclasses.dataclass
class Recorder:
    """Records what the loop feeds its train step and the per-step losses it gets back.

    Attributes:
      batches: every training batch handed to the train step, in order.
      losses: the train step's loss at every step (1-based step = index + 1 within a session).
      fail_at_batch: raise from the iterator at this (0-based, per recorder) batch.
      nan_loss_from_step: report a NaN loss to the loop from this (1-based) step on. Poisoning
        the inputs instead would not do: the jitted model on this CPU turns all-NaN inputs into
        zero logits (eagerly they stay NaN), so the loss stays finite at log(10).
    """

    batches: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    fail_at_batch: int | None = None
    nan_loss_from_step: int | None = None
    next_calls: int = 0

    def patch(self, monkeypatch) -> Recorder:
        recorder = self
        original_iterator = loop_module._Run.train_iterator
        original_init = loop_module._Run.__init__

        def train_iterator(run, state):
            return _RecordingIterator(original_iterator(run, state), recorder)

        def init(run, *args, **kwargs):
            original_init(run, *args, **kwargs)
            step_fn = run.train_step

            def train_step(state, batch):
                new_state, metrics = step_fn(state, batch)
                step = len(recorder.losses) + 1
                if recorder.nan_loss_from_step is not None and step >= recorder.nan_loss_from_step:
                    metrics = {**metrics, "loss": jnp.float32(np.nan)}
                recorder.losses.append(float(metrics["loss"]))
                return new_state, metrics

            run.train_step = train_step

        monkeypatch.setattr(loop_module._Run, "train_iterator", train_iterator)
        monkeypatch.setattr(loop_module._Run, "__init__", init)
        return self


def stop_after(num_steps: int):
    """A ``should_stop`` that lets ``num_steps`` steps run (it is polled before each step)."""
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        return calls[0] > num_steps

    return should_stop


def assert_trees_equal(a, b) -> None:
    """Every leaf bit-identical (same structure, dtype, shape and values)."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for i, (x, y) in enumerate(zip(leaves_a, leaves_b, strict=True)):
        x, y = np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y))
        assert x.dtype == y.dtype and x.shape == y.shape, i
        assert np.array_equal(x, y), f"leaf {i} differs: max |diff| {np.max(np.abs(x - y))}"


def assert_batches_equal(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.keys() == w.keys(), i
        for key in g:
            assert np.array_equal(g[key], w[key]), f"batch {i}, feature {key!r} differs"
