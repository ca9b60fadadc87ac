"""A training run over only the first N examples of a split (workload hyperparameter
`train_examples`), for several epochs over a small training set."""

from __future__ import annotations

import numpy as np
import pytest

from batchlab import data
from batchlab.data import loaders


def _rows(batches):
    return {tuple(np.round(row, 6)) for batch in batches for row in batch["x"]}


def test_only_the_first_examples_are_read_every_epoch(data_dir):
    reference = data.input_pipeline("mnist1d", "train", 200, data_dir=data_dir, config="small",
                                    train=False, num_epochs=1)
    with reference:
        head = _rows([next(iter(reference))])  # the split's first 200 examples, in order
    assert len(head) == 200
    limited = data.input_pipeline("mnist1d", "train", 50, data_dir=data_dir, config="small",
                                  train=True, seed=3, num_epochs=3, max_examples=200)
    with limited:
        batches = list(limited)
    assert len(batches) == 3 * 200 // 50  # three epochs of the 200 examples
    for epoch in range(3):  # every epoch is a shuffle of exactly those 200
        assert _rows(batches[4 * epoch: 4 * epoch + 4]) == head


def test_more_examples_than_the_split_is_an_error(data_dir):
    with pytest.raises(ValueError, match="max_examples"):
        data.input_pipeline("mnist1d", "train", 50, data_dir=data_dir, config="small",
                            max_examples=10**6)


def test_train_examples_is_a_checked_workload_hyperparameter():
    from batchlab.train.workloads import get_workload

    workload = get_workload("mnist1d_resnet1d")
    assert workload.hyperparameters({"train_examples": 4000})["train_examples"] == 4000
    assert workload.hyperparameters(None)["train_examples"] == 0
    with pytest.raises(ValueError, match="train_examples"):
        workload.hyperparameters({"train_examples": -1})
    with pytest.raises(ValueError, match="train_examples"):
        workload.hyperparameters({"train_examples": 2.5})


def test_a_split_is_read_from_disk_once_per_process(data_dir, monkeypatch):
    """Every run of a worker trains and evaluates on one in-memory copy of a small split."""
    first = data.in_memory_split("mnist1d", "validation", data_dir, config="small")
    reads = []
    monkeypatch.setattr(loaders, "get_dataset", lambda *a, **k: reads.append(a))
    again = data.in_memory_split("mnist1d", "validation", data_dir, config="small")
    head = data.in_memory_split("mnist1d", "validation", data_dir, config="small", max_examples=30)
    assert again is first and reads == []
    assert len(head) == 30
    np.testing.assert_array_equal(head.arrays["x"], first.arrays["x"][:30])
    assert first.arrays["x"].dtype == np.float32 and first.arrays["label"].dtype == np.int32


def test_in_memory_split_refuses_what_does_not_fit_or_does_not_exist(data_dir):
    with pytest.raises(ValueError, match="name: 'imagenet2012'"):
        data.in_memory_split("imagenet2012", "train", data_dir)
    with pytest.raises(ValueError, match="max_examples"):
        data.in_memory_split("mnist1d", "validation", data_dir, config="small", max_examples=10**6)
