"""Gradient accumulation (workload.microbatch_size): the same step as one pass, up to rounding.

With virtual-batch BN each sub-batch lies inside one microbatch, so every example is normalised
as in one pass; the mean of the microbatches' gradients is the gradient of the batch's mean
loss; and the running statistics get one update from the whole batch's moments. The reference
each check compares against is the one-pass step batchlab has always run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batchlab.models import MOMENTS, VirtualBatchNorm, combine_running_statistics
from batchlab.train import loop as loop_module
from batchlab.train import train_and_evaluate
from batchlab.workloads import microbatch_problem


def _close(a, b, *, rtol=1e-4, atol=1e-5) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_running_statistics_from_microbatches_equal_one_pass():
    # Features with a large mean and microbatches of different means: the between-microbatch
    # term of the variance is most of it, so leaving it out would fail by far.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 5, 3)) + np.repeat(np.arange(4.0), 16)[:, None, None] * 3
                    + 10.0, jnp.float32)
    bn = VirtualBatchNorm(virtual_batch_size=8, momentum=0.7)
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    variables = {**variables, "batch_stats": {"mean": jnp.full((3,), 0.5), "var": jnp.full((3,), 2.0)}}
    y, one_pass = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    parts, outputs = [], []
    for mb in jnp.split(x, 4):
        out, updates = bn.apply(variables, mb, use_running_average=False,
                                mutable=["batch_stats", MOMENTS])
        parts.append(updates[MOMENTS])
        outputs.append(out)
    combined = combine_running_statistics(variables["batch_stats"], parts)
    _close(combined, one_pass["batch_stats"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(outputs), y, rtol=1e-6, atol=1e-6)
    # The microbatches' own running updates, averaged, miss the between-microbatch variance.
    naive = float(jnp.mean(jnp.stack([p["var"] for p in parts]), axis=0)[0])
    assert abs(naive - float(combined["var"][0])) > 1.0


def test_a_microbatched_run_matches_the_one_pass_run(make_config, baseline, monkeypatch):
    # Batch 64 as 4 microbatches of 16 (one virtual batch of mnist1d_resnet1d_small each).
    split = loop_module._Run._split
    sizes = []

    def recording_split(run, batch):
        parts = split(run, batch)
        sizes.append([len(p["label"]) for p in parts])
        return parts

    monkeypatch.setattr(loop_module._Run, "_split", recording_split)
    config = make_config(hyperparameters={"microbatch_size": 16})
    result = train_and_evaluate(config, return_state=True)
    assert sizes == [[16, 16, 16, 16]] * 30
    reference = baseline.result
    assert result.outcome == reference.outcome
    assert [p["step"] for p in result.curve] == [p["step"] for p in reference.curve]
    _close(result.final_state.batch_stats, reference.final_state.batch_stats, rtol=1e-3, atol=1e-4)
    _close(result.final_state.params, reference.final_state.params, rtol=1e-3, atol=1e-4)
    for ours, theirs in zip(result.curve, reference.curve, strict=True):
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-3), key


def test_a_microbatch_as_large_as_the_batch_changes_nothing(make_config, baseline):
    result = train_and_evaluate(make_config(hyperparameters={"microbatch_size": 64}),
                                return_state=True)
    assert result.curve == baseline.result.curve


@pytest.mark.parametrize("hyperparameters, reason", [
    ({"microbatch_size": 24}, "24 does not divide batch_size 64"),
    ({"microbatch_size": 8}, "8 is not a multiple of virtual_batch_size 16"),
    ({"microbatch_size": 16, "virtual_batch_size": 0}, "needs a virtual_batch_size"),
])
def test_a_microbatch_that_cannot_split_the_batch_is_refused_naming_the_field(
        make_config, hyperparameters, reason):
    with pytest.raises(ValueError, match="^workload.microbatch_size: ") as error:
        train_and_evaluate(make_config(hyperparameters=hyperparameters))
    assert reason in str(error.value)


def test_microbatch_problem_is_silent_where_the_batch_fits():
    hp = {"virtual_batch_size": 32, "microbatch_size": 512}
    assert microbatch_problem(hp, 128) is None  # one pass: nothing to split
    assert microbatch_problem(hp, 1024) is None
    assert microbatch_problem({**hp, "microbatch_size": 0}, 1024) is None
    assert "does not divide" in microbatch_problem(hp, 1280)

