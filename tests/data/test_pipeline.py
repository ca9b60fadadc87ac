"""BatchIterator: fixed shapes, determinism regardless of threads, exact resume, eval padding."""

from __future__ import annotations

import gc
import json
import threading

import numpy as np
import pytest

from batchlab.data import sharding
from batchlab.data.pipeline import BatchIterator, collate


class CountingSource:
    """A random-access source of small examples that counts reads."""

    def __init__(self, size: int):
        self._size = size
        self.reads = 0
        self._lock = threading.Lock()

    def __len__(self):
        return self._size

    def __getitem__(self, index):
        with self._lock:
            self.reads += 1
        return {"index": np.int64(index), "x": np.full((3,), index, np.float32)}


def noisy(example, rng):
    """Preprocessing that uses its rng, so results expose the per-example seed."""
    return {**example, "noise": np.float32(rng.random())}


def batches(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_batches_have_fixed_shapes_and_follow_the_shard_order():
    with BatchIterator(CountingSource(50), 8, shard_index=1, shard_count=2, seed=3) as it:
        got = batches(it, 7)  # 25 per shard and epoch: crosses two epoch boundaries.
    for batch in got:
        assert batch["x"].shape == (8, 3) and batch["x"].dtype == np.float32
        assert batch["index"].shape == (8,)
    want = np.concatenate([sharding.shard_indices(50, 1, 2, e, 3) for e in range(3)])[:56]
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in got]), want)


@pytest.mark.parametrize("prefetch,num_workers", [(0, 1), (1, 1), (3, 4)])
def test_batches_do_not_depend_on_threads(prefetch, num_workers):
    reference = BatchIterator(CountingSource(40), 6, seed=9, preprocess=noisy, prefetch=0)
    with BatchIterator(
        CountingSource(40),
        6,
        seed=9,
        preprocess=noisy,
        prefetch=prefetch,
        num_workers=num_workers,
    ) as it:
        assert_same_batches(batches(reference, 12), batches(it, 12))


def test_preprocess_gets_the_examples_seeded_rng():
    with BatchIterator(CountingSource(20), 4, seed=5, preprocess=noisy) as it:
        for _ in range(8):  # Two epochs.
            batch = next(it)
    state = it.get_state()["indices"]
    assert state["epoch"] == 1 and state["position"] == 12
    # The last batch came from epoch 1: check its noise against example_rng directly.
    for index, noise in zip(batch["index"], batch["noise"], strict=True):
        assert noise == np.float32(sharding.example_rng(5, 1, int(index)).random())


def test_resume_from_a_saved_state_gives_the_same_remaining_batches():
    source = CountingSource(30)
    it = BatchIterator(source, 4, seed=1, preprocess=noisy, prefetch=3)
    batches(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # Must survive JSON.
    rest = batches(it, 10)
    it.close()
    resumed = BatchIterator(CountingSource(30), 4, seed=1, preprocess=noisy, prefetch=2)
    resumed.set_state(state)
    assert_same_batches(rest, batches(resumed, 10))
    resumed.close()


def test_set_state_rewinds_a_running_iterator():
    it = BatchIterator(CountingSource(30), 4, seed=2, prefetch=4)
    state = it.get_state()
    first = batches(it, 3)
    it.set_state(state)
    assert_same_batches(first, batches(it, 3))
    it.close()


@pytest.mark.parametrize("shard_count", [1, 3])
def test_eval_mode_pads_and_masks_so_every_example_is_seen_once(shard_count):
    seen = []
    counts = set()
    for shard in range(shard_count):
        with BatchIterator(
            CountingSource(23),
            4,
            shard_index=shard,
            shard_count=shard_count,
            shuffle=False,
            num_epochs=1,
            drop_remainder=False,
        ) as it:
            assert it.num_batches == len(
                list(
                    BatchIterator(
                        CountingSource(23),
                        4,
                        shard_index=shard,
                        shard_count=shard_count,
                        shuffle=False,
                        num_epochs=1,
                        drop_remainder=False,
                        prefetch=0,
                    )
                )
            )
            got = list(it)
        counts.add(len(got))
        for batch in got:
            assert batch["x"].shape == (4, 3) and batch["mask"].dtype == bool
            assert not batch["x"][~batch["mask"]].any()  # Padding is zeros.
            seen.extend(batch["index"][batch["mask"]].tolist())
    assert sorted(seen) == list(range(23))
    assert len(counts) == 1  # Every shard runs the same number of batches.


def test_finite_training_stream_drops_the_last_partial_batch():
    it = BatchIterator(CountingSource(10), 4, num_epochs=1, prefetch=1)
    assert it.num_batches == 2
    assert len(list(it)) == 2
    with pytest.raises(StopIteration):
        next(it)
    it.close()


def test_errors_in_preprocessing_reach_the_consumer():
    def broken(example, rng):
        raise KeyError("no such feature")

    with BatchIterator(CountingSource(10), 2, preprocess=broken) as it:
        with pytest.raises(KeyError, match="no such feature"):
            next(it)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(prefetch=-1), "prefetch must be >= 0"),
        (dict(num_workers=0), "num_workers must be >= 1"),
        (dict(drop_remainder=False), "num_epochs must be set"),
        (dict(shard_index=2, shard_count=2), "shard_index must be < shard_count"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(batch_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BatchIterator(CountingSource(10), args.pop("batch_size"), **args)


def test_set_state_rejects_another_batch_size():
    state = BatchIterator(CountingSource(10), 2).get_state()
    with pytest.raises(ValueError, match="state.batch_size is 2 but this iterator has 3"):
        BatchIterator(CountingSource(10), 3).set_state(state)


def test_collate_rejects_mismatched_keys():
    with pytest.raises(ValueError, match="different keys"):
        collate([{"a": 1}, {"b": 2}])


def test_an_iterator_dropped_without_close_stops_its_thread():
    it = BatchIterator(CountingSource(100), 2, prefetch=2)
    next(it)
    thread = it._thread
    assert thread is not None and thread.is_alive()
    del it
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
