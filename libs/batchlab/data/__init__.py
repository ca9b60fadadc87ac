"""batchlab.data: datasets by name, deterministic sharding, and batch pipelines.

Datasets (see :data:`DATASETS` for their metadata):

* ``mnist1d``, ``digits``, ``mlm_corpus``: built offline into a tfds data folder by
  :func:`prepare` (once; reused afterwards) and read as array_record without TensorFlow.
* ``imagenet2012``: tfds' prepared ImageNet, read with ``tfds.data_source`` and preprocessed as
  in MLPerf (:mod:`batchlab.data.imagenet`).

``get_dataset`` returns a random-access source (``len`` and ``source[i]`` -> dict of numpy);
``input_pipeline`` returns a :class:`BatchIterator` of fixed-size numpy batches for one shard,
with the dataset's preprocessing (for ``mlm_corpus``: BERT pretraining examples).

Example:
  >>> from batchlab import data
  >>> it = data.input_pipeline("digits", "train", 32, data_dir="/tmp/tfds")  # doctest: +SKIP
  >>> batch = next(it)  # doctest: +SKIP
  >>> batch["image"].shape, batch["label"].dtype  # doctest: +SKIP
  ((32, 8, 8, 1), dtype('int32'))
"""

from __future__ import annotations

from typing import Any

from batchlab.data.loaders import get_dataset, in_memory_split, input_pipeline, mlm_tokenizer
from batchlab.data.paths import default_data_dir
from batchlab.data.pipeline import ArraySource, BatchIterator, collate
from batchlab.data.registry import DATASETS, DatasetInfo, dataset_info, list_datasets
from batchlab.data.sharding import (
    ShardIterator,
    epoch_permutation,
    example_rng,
    examples_per_shard,
    shard_indices,
)
from batchlab.data.tokenizer import WordPieceTokenizer

__all__ = [
    "DATASETS",
    "ArraySource",
    "BatchIterator",
    "DatasetInfo",
    "ShardIterator",
    "WordPieceTokenizer",
    "builder",
    "collate",
    "dataset_info",
    "default_data_dir",
    "epoch_permutation",
    "example_rng",
    "examples_per_shard",
    "get_dataset",
    "in_memory_split",
    "input_pipeline",
    "list_datasets",
    "make_config",
    "mlm_tokenizer",
    "prepare",
    "shard_indices",
]


# These need tensorflow-datasets; importing them lazily keeps `batchlab.data` (sharding,
# pipelines, preprocessing) importable with numpy alone, e.g. in the sharding service.
_FROM_BUILDERS = ("builder", "make_config", "prepare")


def __getattr__(name: str) -> Any:
    if name in _FROM_BUILDERS:
        from batchlab.data import builders

        return getattr(builders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
