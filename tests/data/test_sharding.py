"""Sharding math: deterministic, disjoint, covering, per-epoch, resumable, and strict on input."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from batchlab.data import sharding
from batchlab.data.sharding import ShardIterator, shard_indices

LAYOUTS = ["strided", "contiguous"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_order_on_repeated_calls(layout):
    first = shard_indices(1000, 2, 4, 3, 7, layout=layout)
    second = shard_indices(1000, 2, 4, 3, 7, layout=layout)
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.int64


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_examples,shard_count", [(103, 4), (100, 4), (7, 7), (1000, 3)])
def test_shards_are_disjoint_and_cover_the_epoch_minus_the_remainder(
    layout, num_examples, shard_count
):
    shards = [
        shard_indices(num_examples, i, shard_count, 0, 11, layout=layout)
        for i in range(shard_count)
    ]
    per_shard = num_examples // shard_count
    assert all(len(s) == per_shard for s in shards)
    union = np.concatenate(shards)
    assert len(np.unique(union)) == len(union)  # disjoint
    # Exactly the first N - N % S entries of the epoch's permutation are used.
    permutation = sharding.epoch_permutation(num_examples, 0, 11)
    kept = permutation[: per_shard * shard_count]
    assert set(union.tolist()) == set(kept.tolist())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pad_remainder_covers_everything_once(layout):
    num_examples, shard_count = 103, 4
    shards = [
        shard_indices(num_examples, i, shard_count, 0, 0, layout=layout, remainder="pad")
        for i in range(shard_count)
    ]
    assert all(len(s) == 26 for s in shards)
    union = np.concatenate(shards)
    real = union[union != sharding.PAD_INDEX]
    assert sorted(real.tolist()) == list(range(num_examples))
    assert (union == sharding.PAD_INDEX).sum() == 26 * 4 - 103


def test_epochs_and_seeds_permute_differently():
    base = shard_indices(500, 0, 2, 0, 0)
    assert not np.array_equal(base, shard_indices(500, 0, 2, 1, 0))
    assert not np.array_equal(base, shard_indices(500, 0, 2, 0, 1))
    # Each epoch is a permutation: a different handful is dropped each time, none forever.
    seen = set()
    for epoch in range(20):
        for shard in range(3):
            seen.update(shard_indices(101, shard, 3, epoch, 0).tolist())
    assert seen == set(range(101))


def test_no_shuffle_keeps_order():
    assert shard_indices(10, 1, 3, 5, 9, shuffle=False).tolist() == [1, 4, 7]
    assert shard_indices(10, 1, 3, 5, 9, shuffle=False, layout="contiguous").tolist() == [3, 4, 5]


def test_strided_global_batches_do_not_depend_on_shard_count():
    """Global step t sees the same examples whether 1, 2 or 4 shards share the batch."""
    num_examples, global_batch = 256, 16
    reference = shard_indices(num_examples, 0, 1, 2, 5)
    for shard_count in (2, 4):
        local = global_batch // shard_count
        orders = [shard_indices(num_examples, i, shard_count, 2, 5) for i in range(shard_count)]
        for step in range(num_examples // global_batch):
            got = np.concatenate([o[step * local : (step + 1) * local] for o in orders])
            want = reference[step * global_batch : (step + 1) * global_batch]
            assert sorted(got.tolist()) == sorted(want.tolist())


def test_iterator_streams_epochs_back_to_back():
    it = ShardIterator(10, 1, 3, seed=4)
    indices, epochs = it.take(7)
    want = np.concatenate([shard_indices(10, 1, 3, e, 4) for e in range(3)])[:7]
    np.testing.assert_array_equal(indices, want)
    assert epochs.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert (it.epoch, it.position) == (2, 1)


def test_iterator_resumes_from_a_json_state():
    it = ShardIterator(50, 0, 2, seed=3)
    it.take(37)  # Crosses an epoch boundary (25 per epoch).
    state = json.loads(json.dumps(it.get_state()))
    rest, rest_epochs = it.take(60)
    resumed = ShardIterator(50, 0, 2, seed=3)
    resumed.set_state(state)
    again, again_epochs = resumed.take(60)
    np.testing.assert_array_equal(rest, again)
    np.testing.assert_array_equal(rest_epochs, again_epochs)


def test_finite_iterator_stops():
    it = ShardIterator(9, 0, 2, num_epochs=2, shuffle=False)
    assert list(it) == [0, 2, 4, 6] * 2
    assert it.exhausted
    assert len(it.take(5)[0]) == 0


def test_example_rng_is_separate_from_the_shuffle_stream():
    # Without domain tags, SeedSequence([s, e]) == SeedSequence([s, e, 0]).
    shuffle_draw = np.random.Generator(np.random.PCG64([sharding.SHUFFLE_DOMAIN, 1, 2])).random()
    assert sharding.example_rng(1, 2, 0).random() != shuffle_draw
    assert sharding.example_rng(1, 2, 0).random() == sharding.example_rng(1, 2, 0).random()
    assert sharding.example_rng(1, 2, 0).random() != sharding.example_rng(1, 3, 0).random()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(shard_index=4, shard_count=4), "shard_index must be < shard_count"),
        (dict(shard_index=-1), "shard_index must be >= 0"),
        (dict(shard_count=0), "shard_count must be >= 1"),
        (dict(num_examples=-5), "num_examples must be >= 0"),
        (dict(num_examples=3, shard_count=4, shard_index=0), "num_examples .* >= shard_count"),
        (dict(epoch=-1), "epoch must be >= 0"),
        (dict(seed=-2), "seed must be >= 0"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(shard_index=True), "shard_index must be an integer"),
        (dict(layout="diagonal"), "layout must be one of"),
        (dict(remainder="keep"), "remainder must be one of"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    args = dict(num_examples=10, shard_index=0, shard_count=2, epoch=0, seed=0)
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("layout", "remainder") if k in args}
    with pytest.raises(ValueError, match=match):
        shard_indices(
            args["num_examples"],
            args["shard_index"],
            args["shard_count"],
            args["epoch"],
            args["seed"],
            **extra,
        )


def test_set_state_rejects_a_state_from_another_configuration():
    state = ShardIterator(10, 0, 2, seed=1).get_state()
    with pytest.raises(ValueError, match=r"state.seed is 1 but this iterator has 2"):
        ShardIterator(10, 0, 2, seed=2).set_state(state)
    with pytest.raises(ValueError, match=r"state.shard_index"):
        ShardIterator(10, 1, 2, seed=1).set_state(state)
    with pytest.raises(ValueError, match=r"state.position must be < 5"):
        ShardIterator(10, 0, 2, seed=1).set_state({**state, "position": 5})
    with pytest.raises(ValueError, match=r"missing fields \['epoch'\]"):
        ShardIterator(10, 0, 2, seed=1).set_state({k: v for k, v in state.items() if k != "epoch"})


def test_examples_per_shard():
    assert [sharding.examples_per_shard(10, s) for s in (1, 3, 4)] == [10, 3, 2]
    assert [sharding.examples_per_shard(10, s, "pad") for s in (1, 3, 4)] == [10, 4, 3]
    assert list(itertools.islice(ShardIterator(4, shuffle=False), 6)) == [0, 1, 2, 3, 0, 1]
