"""The dataset registry and input_pipeline on the offline datasets."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from batchlab import data


def test_metadata():
    assert data.list_datasets() == ["digits", "imagenet2012", "mlm_corpus", "mnist1d"]
    info = data.dataset_info("imagenet2012")
    assert (info.num_classes, info.input_shape, info.splits["train"]) == (
        1000,
        (224, 224, 3),
        1_281_167,
    )
    assert data.dataset_info("mnist1d").splits == {"train": 40_000, "validation": 10_000}
    assert data.dataset_info("digits").input_key == "image"
    with pytest.raises(ValueError, match=r"name must be one of \['digits', 'imagenet2012'"):
        data.dataset_info("mnist")


@pytest.mark.parametrize(
    "name,config,key,shape",
    [("mnist1d", "small", "x", (40,)), ("digits", None, "image", (8, 8, 1))],
)
def test_training_batches(data_dir, name, config, key, shape):
    with data.input_pipeline(name, "train", 64, data_dir=data_dir, config=config, seed=1) as it:
        batch = next(it)
    assert set(batch) == {key, "label"}
    assert batch[key].shape == (64, *shape) and batch[key].dtype == np.float32
    assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32


def test_evaluation_covers_each_validation_example_once_across_shards(data_dir):
    source = data.get_dataset("digits", "validation", data_dir)
    expected = np.stack([source[i]["image"] for i in range(len(source))])
    rows, batch_counts = [], set()
    for shard in range(3):
        with data.input_pipeline(
            "digits", "validation", 50, data_dir=data_dir, shard_index=shard, shard_count=3
        ) as it:
            batches = list(it)
        batch_counts.add(len(batches))
        for batch in batches:
            rows.extend(batch["image"][batch["mask"]])
    assert len(batch_counts) == 1
    got = np.stack(rows)
    assert len(got) == len(expected) == 359
    order = np.lexsort(got.reshape(len(got), -1).T)
    want_order = np.lexsort(expected.reshape(len(expected), -1).T)
    np.testing.assert_array_equal(got[order], expected[want_order])


def test_pipeline_resumes_from_state(data_dir):
    kwargs = dict(data_dir=data_dir, config="small", seed=5)
    with data.input_pipeline("mnist1d", "train", 100, **kwargs) as it:
        for _ in range(20):  # Crosses the 1,600-example epoch boundary.
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        rest = [next(it) for _ in range(5)]
    with data.input_pipeline("mnist1d", "train", 100, state=state, **kwargs) as resumed:
        for want in rest:
            got = next(resumed)
            np.testing.assert_array_equal(got["x"], want["x"])
            np.testing.assert_array_equal(got["label"], want["label"])


def test_pipelines_are_deterministic_and_seed_dependent(data_dir):
    def first_labels(seed):
        with data.input_pipeline("digits", "train", 32, data_dir=data_dir, seed=seed) as it:
            return next(it)["label"]

    np.testing.assert_array_equal(first_labels(0), first_labels(0))
    assert not np.array_equal(first_labels(0), first_labels(1))


def test_input_pipeline_argument_errors(data_dir):
    with pytest.raises(ValueError, match="shard_index must be < shard_count"):
        data.input_pipeline("digits", "train", 8, data_dir=data_dir, shard_index=3, shard_count=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        data.input_pipeline("digits", "train", 0, data_dir=data_dir)
    with pytest.raises(ValueError, match=r"unknown keyword arguments \['max_seq_length'\]"):
        data.input_pipeline("digits", "train", 8, data_dir=data_dir, max_seq_length=128)


def test_importing_the_package_needs_only_numpy():
    """Sharding, pipelines and preprocessing import without tfds, PIL, sklearn or JAX."""
    code = (
        "import sys\n"
        "import batchlab.data, batchlab.data.bert, batchlab.data.imagenet\n"
        "heavy = [m for m in ('tensorflow_datasets', 'PIL', 'sklearn', 'mnist1d', 'jax')\n"
        "         if m in sys.modules]\n"
        "sys.exit(f'imported {heavy}' if heavy else 0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
