"""Datasets by name: random-access sources, small splits held in memory, and the input
pipeline of each dataset (fixed-size numpy batches for one shard)."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from batchlab.data import bert, imagenet
from batchlab.data.pipeline import (
    ArraySource,
    BatchIterator,
    Preprocess,
    RandomAccessSource,
)
from batchlab.data.registry import dataset_info
from batchlab.data.tokenizer import WordPieceTokenizer

__all__ = ["get_dataset", "in_memory_split", "input_pipeline", "mlm_tokenizer"]


def _check_kwargs(name: str, kwargs: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(
            f"unknown keyword arguments {unknown} for {name}; allowed: {sorted(allowed)}"
        )


def _offline_builder(
    name: str, data_dir: str | os.PathLike[str] | None, config: Any, build: bool
) -> Any:
    """The tfds builder of an offline dataset (tfds is untyped: Any), built if asked."""
    from batchlab.data import builders

    if build:
        return builders.prepare(name, data_dir, config=config)
    result = builders.builder(name, data_dir, config=config)
    if not result.data_path.exists():
        raise FileNotFoundError(
            f"{name} is not built at {result.data_dir}; call prepare({name!r}, ...) first"
        )
    return result


def get_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    config: Any = None,
    build: bool = True,
    **kwargs: Any,
) -> RandomAccessSource:
    """Returns a random-access source of one split: ``len(source)``, ``source[i]`` -> dict.

    Args:
      name: one of :func:`list_datasets`.
      split: 'train' or 'validation'.
      data_dir: tfds data folder; :func:`default_data_dir` when None.
      config: builder config (name or object) of an offline dataset, e.g. 'small'.
      build: build an offline dataset if it is missing (never rebuilds).
      **kwargs: imagenet2012 only: ``manual_dir`` (tar files, to prepare it) and ``decode``
        (True for tfds-decoded arrays instead of JPEG bytes).

    Returns:
      The source. Features: mnist1d {'x' float32 (40,), 'label' int64}; digits {'image'
      float32 (8, 8, 1), 'label' int64}; mlm_corpus {'token_ids' int32 (n,),
      'sentence_lengths' int32 (s,), 'path' bytes}; imagenet2012 {'image' JPEG bytes,
      'label' int64, 'file_name' bytes}. tfds hands scalar int64 features (labels) back as
      Python ints; they become int64 arrays once batched.

    Raises:
      ValueError: for an unknown name, split or keyword argument.
      FileNotFoundError: when ``build=False`` (or for imagenet2012) and nothing is prepared.
    """
    dataset_info(name)  # Rejects unknown names, listing the allowed ones.
    if name == "imagenet2012":
        _check_kwargs(name, kwargs, {"manual_dir", "decode"})
        if config is not None:
            raise ValueError("imagenet2012 takes no config")
        if split not in imagenet.SPLIT_SIZES:
            raise ValueError(f"split must be one of {sorted(imagenet.SPLIT_SIZES)}; got {split!r}")
        imagenet_source: RandomAccessSource = imagenet.data_source(split, data_dir, **kwargs)
        return imagenet_source
    _check_kwargs(name, kwargs, set())
    prepared = _offline_builder(name, data_dir, config, build)
    splits = sorted(prepared.info.splits.keys())
    if split not in splits:
        raise ValueError(f"split must be one of {splits}; got {split!r}")
    source: RandomAccessSource = prepared.as_data_source(split)
    return source


def mlm_tokenizer(
    data_dir: str | os.PathLike[str] | None = None, *, config: Any = None, build: bool = True
) -> WordPieceTokenizer:
    """Returns the WordPiece tokenizer saved with the `mlm_corpus` dataset.

    Args:
      data_dir: tfds data folder; :func:`default_data_dir` when None.
      config: `mlm_corpus` config (name or object).
      build: build the corpus if it is missing.

    Returns:
      The tokenizer (its vocabulary file is ``<dataset dir>/vocab.txt``).
    """
    tokenizer: WordPieceTokenizer = _offline_builder("mlm_corpus", data_dir, config, build).tokenizer()
    return tokenizer


@functools.lru_cache(maxsize=16)
def _in_memory_split(name: str, split: str, data_dir: str | None, config: str | None) -> ArraySource:
    """A small classification split held in memory, loaded once per process.

    Studies run many short trials on the same split; reading it from disk once per
    process instead of once per pipeline keeps input off the critical path.
    """
    source = get_dataset(name, split, data_dir, config=config)
    return _in_memory_classification(source, dataset_info(name).input_key)


def in_memory_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    config: Any = None,
    max_examples: int | None = None,
) -> ArraySource:
    """A small classification split in memory: float32 inputs and int32 labels.

    A split named by a config name (or none) is read from disk once per process and shared
    by every later call (training and evaluation of every run in a worker alike); a config
    object is read each time.

    Args:
      name: an offline classification dataset (not mlm_corpus or imagenet2012).
      split: 'train' or 'validation'.
      data_dir: tfds data folder; :func:`default_data_dir` when None.
      config: builder config (name or object).
      max_examples: only the first this many examples (None or 0: all of them).

    Returns:
      The split, in its stored order.

    Raises:
      ValueError: for a dataset that does not fit in memory, an unknown name or split, or
        ``max_examples`` beyond the split's size.
    """
    if name in ("mlm_corpus", "imagenet2012"):
        raise ValueError(f"name: {name!r} is not an in-memory classification dataset")
    if config is None or isinstance(config, str):
        source = _in_memory_split(name, split, None if data_dir is None else os.fspath(data_dir), config)
    else:
        source = _in_memory_classification(get_dataset(name, split, data_dir, config=config),
                                           dataset_info(name).input_key)
    if max_examples:
        if max_examples > len(source):
            raise ValueError(f"max_examples: {name} {split} has {len(source)} examples, "
                             f"got {max_examples}")
        source = ArraySource({k: v[:max_examples] for k, v in source.arrays.items()})
    return source


def _in_memory_classification(source: Any, input_key: str) -> ArraySource:
    """Loads a small classification split into memory as float32 inputs and int32 labels."""
    arrays = ArraySource.from_source(source).arrays
    return ArraySource(
        {
            input_key: arrays[input_key].astype(np.float32, copy=False),
            "label": arrays["label"].astype(np.int32),
        }
    )


def input_pipeline(
    name: str,
    split: str,
    batch_size: int,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    config: Any = None,
    train: bool | None = None,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    drop_remainder: bool | None = None,
    preprocess: Preprocess | None = None,
    prefetch: int = 2,
    num_workers: int = 1,
    state: Mapping[str, Any] | None = None,
    index_stream: Any = None,
    index_key: str | None = None,
    max_examples: int | None = None,
    **kwargs: Any,
) -> BatchIterator:
    """Returns a :class:`BatchIterator` of preprocessed fixed-size batches for one shard.

    Training mode shuffles per epoch, augments (ImageNet), repeats forever and drops each
    epoch's remainder. Evaluation mode keeps order, runs one epoch and pads the last batch,
    adding a boolean 'mask'.

    Args:
      name: one of :func:`list_datasets`.
      split: 'train' or 'validation'.
      batch_size: examples per batch on this shard.
      data_dir: tfds data folder; :func:`default_data_dir` when None.
      config: offline builder config (name or object), e.g. 'small'.
      train: training mode; defaults to ``split == 'train'``.
      seed: data seed (order, augmentation, and for mlm_corpus the pretraining examples).
      shard_index: this shard, in ``[0, shard_count)``.
      shard_count: number of shards (hosts).
      num_epochs: epochs to run; default None (forever) in training, 1 in evaluation.
      drop_remainder: default True in training, False (pad + mask) in evaluation.
      preprocess: override the dataset's ``fn(example, rng) -> example``.
      prefetch: batches prepared ahead in a background thread (0: none).
      num_workers: threads applying preprocessing within a batch.
      state: a ``get_state()`` dict to resume from.
      index_stream: ``fn(num_examples) -> stream``: this shard's index stream from elsewhere
        (see :class:`BatchIterator`), e.g. the sharding service's; None computes it from the
        shard arguments.
      index_key: also put each example's index in the batches under this key.
      max_examples: use only the first this many examples of the split (in-memory
        classification datasets; None or 0: all of them).
      **kwargs: imagenet2012: ``manual_dir``; mlm_corpus: ``max_seq_length`` (128),
        ``max_predictions_per_seq``, ``dupe_factor``, ``masked_lm_prob``, ``short_seq_prob``.

    Returns:
      The iterator; batches are dicts of numpy arrays with a leading ``batch_size`` axis:
      mnist1d {'x' float32, 'label' int32}; digits and imagenet2012 {'image' float32,
      'label' int32}; mlm_corpus the int32 BERT features of :mod:`batchlab.data.bert`.

    Raises:
      ValueError: for an unknown name, split, keyword argument or bad shard/batch argument.
    """
    dataset_info(name)  # Rejects unknown names, listing the allowed ones.
    train = (split == "train") if train is None else bool(train)
    if num_epochs is None and not train:
        num_epochs = 1
    if drop_remainder is None:
        drop_remainder = train
    source: RandomAccessSource
    if name == "mlm_corpus":
        bert_args = {
            "max_seq_length",
            "max_predictions_per_seq",
            "dupe_factor",
            "masked_lm_prob",
            "short_seq_prob",
        }
        _check_kwargs(name, kwargs, bert_args)
        documents = get_dataset(name, split, data_dir, config=config)
        tokenizer = mlm_tokenizer(data_dir, config=config)
        source = bert.BertPretrainingSource(
            documents, vocab_size=tokenizer.vocab_size, seed=seed, **kwargs
        )
        default_preprocess = None
    elif name == "imagenet2012":
        source = get_dataset(name, split, data_dir, config=config, **kwargs)
        default_preprocess = imagenet.train_preprocess if train else imagenet.eval_preprocess
    else:
        # Small enough to hold in memory; batches are then gathered, not built per example.
        _check_kwargs(name, kwargs, set())
        source = in_memory_split(name, split, data_dir, config=config, max_examples=max_examples)
        default_preprocess = None
    if max_examples and name in ("mlm_corpus", "imagenet2012"):
        raise ValueError(f"max_examples: supported for in-memory datasets only, not {name!r}")
    iterator = BatchIterator(
        source,
        batch_size,
        shard_index=shard_index,
        shard_count=shard_count,
        seed=seed,
        shuffle=train,
        num_epochs=num_epochs,
        preprocess=preprocess or default_preprocess,
        drop_remainder=drop_remainder,
        prefetch=prefetch,
        num_workers=num_workers,
        index_stream=index_stream,
        index_key=index_key,
    )
    if state is not None:
        iterator.set_state(state)
    return iterator
