"""Fixed-size numpy batches for one shard, with per-example preprocessing and prefetch.

A :class:`BatchIterator` reads a random-access source (anything with ``len`` and
``__getitem__`` returning a dict of numpy values, e.g. a tfds array_record data source) in the
order given by :class:`batchlab.data.sharding.ShardIterator`, applies ``preprocess(example,
rng)`` with ``rng = example_rng(seed, epoch, index)``, stacks fixed-size batches, and prepares
the next ones in a background thread. Sources with ``__getitems__`` (tfds data sources) are
read a batch at a time; an :class:`ArraySource` (a split held in memory as arrays) without
per-example preprocessing is gathered with one fancy-index per feature, which is what makes
small datasets such as mnist1d fast enough to feed a CPU model.

Everything a batch contains is a function of ``(seed, shard, step)``: neither thread timing nor
the number of workers changes it, and ``get_state()`` / ``set_state()`` resume exactly.

Why not grain's DataLoader: grain would do the same job, but its shuffle and sharding are its own
(a version-dependent index shuffle and its own state format), while batchlab needs the sharding
math spelled out and shared with the sharding service, and a plain-dict state that survives
JSON. The remaining work (a thread, a queue, a pool) is small enough to own.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from batchlab.data import sharding

logger = logging.getLogger(__name__)

Example = dict[str, Any]
Preprocess = Callable[[Example, np.random.Generator], Example]

MASK_KEY = "mask"
_STATE_VERSION = 1
_END = object()


class RandomAccessSource(Protocol):
    """What a :class:`BatchIterator` reads from: ``len`` and ``__getitem__`` -> dict."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


def collate(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Stacks a list of examples (dicts with the same keys) into a dict of arrays.

    Args:
      examples: examples with identical keys and per-key shapes.

    Returns:
      dict mapping each key to an array with a leading batch dimension.

    Raises:
      ValueError: if the examples do not have the same keys.
    """
    if not examples:
        raise ValueError("examples must not be empty")
    keys = list(examples[0])
    for example in examples[1:]:
        if list(example) != keys:
            raise ValueError(f"examples have different keys: {keys} vs {list(example)}")
    return {key: np.stack([np.asarray(example[key]) for example in examples]) for key in keys}


class ArraySource:
    """A split held in memory as a dict of arrays with a leading example axis.

    Args:
      arrays: feature name -> array; all with the same length.

    Example:
      >>> source = ArraySource({"x": np.zeros((5, 2)), "label": np.arange(5)})
      >>> len(source), source[3]["label"], source.gather(np.array([4, 0]))["label"].tolist()
      (5, np.int64(3), [4, 0])
    """

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = {key: np.asarray(value) for key, value in arrays.items()}
        lengths = {len(value) for value in self.arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"arrays must have the same length; got {sorted(lengths)}")
        self._length = lengths.pop()

    @classmethod
    def from_source(cls, source: RandomAccessSource, *, chunk_size: int = 4096) -> ArraySource:
        """Reads a whole random-access source into memory.

        Args:
          source: e.g. a tfds data source of fixed-shape numeric features.
          chunk_size: examples read per ``__getitems__`` call.

        Returns:
          The in-memory source, in the same order.
        """
        getitems = getattr(source, "__getitems__", None)
        examples: list[Mapping[str, Any]] = []
        for start in range(0, len(source), chunk_size):
            keys = list(range(start, min(start + chunk_size, len(source))))
            examples.extend(getitems(keys) if getitems else [source[i] for i in keys])
        return cls(collate(examples))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: value[index] for key, value in self.arrays.items()}

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Returns the examples at ``indices`` as a batch (one fancy-index per feature)."""
        return {key: value[indices] for key, value in self.arrays.items()}


class BatchIterator:
    """Yields fixed-size numpy batches of one shard; resumable; prefetches in a thread.

    Training (``drop_remainder=True``): the shard order drops each epoch's remainder and the
    stream runs across epoch boundaries, so every batch is full and every shard yields the same
    number of batches. Evaluation (``drop_remainder=False``, finite ``num_epochs``): nothing is
    dropped; the shard order and the final batch are padded with zero examples, and every batch
    carries a boolean ``'mask'`` that is False on padding.

    Args:
      source: random-access source of examples (dicts of numpy values).
      batch_size: examples per batch on this shard (the global batch is
        ``batch_size * shard_count``).
      shard_index: this shard, in ``[0, shard_count)``.
      shard_count: number of shards.
      seed: data seed: drives the per-epoch permutation and per-example randomness.
      shuffle: permute each epoch (False for evaluation).
      num_epochs: number of epochs, or None to repeat forever.
      preprocess: ``fn(example, rng) -> example``, or None to batch examples as read. Must
        depend only on its arguments so batches are reproducible.
      drop_remainder: see above. False requires a finite ``num_epochs``.
      layout: 'strided' or 'contiguous' shard layout (see ``sharding.shard_indices``).
      prefetch: batches prepared ahead in the background; 0 disables the thread.
      num_workers: threads applying ``preprocess`` within a batch (PIL and numpy release the
        GIL, so this helps JPEG decoding); 1 runs it in the prefetch thread itself.
      index_stream: when the shard's index stream comes from elsewhere (e.g. the sharding
        service: ``batchlab.rpc.sharding_client.ServiceShardIterator``): called with the
        source's length, it returns a stream with the interface and state format of
        ``sharding.ShardIterator``. None computes the stream here from the shard arguments.
      index_key: also put each example's index in the batch under this key (padding: -1),
        e.g. to log which examples a run read; None leaves it out.

    Example:
      >>> source = [{"x": np.float32(i)} for i in range(10)]
      >>> with BatchIterator(source, 4, seed=0) as it:
      ...     batch = next(it)
      >>> batch["x"].shape
      (4,)
    """

    def __init__(
        self,
        source: RandomAccessSource,
        batch_size: int,
        *,
        shard_index: int = 0,
        shard_count: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        preprocess: Preprocess | None = None,
        drop_remainder: bool = True,
        layout: str = "strided",
        prefetch: int = 2,
        num_workers: int = 1,
        index_stream: Callable[[int], Any] | None = None,
        index_key: str | None = None,
    ):
        batch_size = sharding.check_int("batch_size", batch_size, minimum=1)
        self._prefetch = sharding.check_int("prefetch", prefetch, minimum=0)
        num_workers = sharding.check_int("num_workers", num_workers, minimum=1)
        if not drop_remainder and num_epochs is None:
            raise ValueError(
                "num_epochs must be set when drop_remainder=False: padding only makes sense "
                "at the end of a finite stream"
            )
        seed = sharding.check_int("seed", seed, minimum=0)
        if index_stream is None:
            indices = sharding.ShardIterator(
                len(source),
                shard_index,
                shard_count,
                seed=seed,
                shuffle=shuffle,
                layout=layout,
                remainder="drop" if drop_remainder else "pad",
                num_epochs=num_epochs,
            )
        else:
            indices = index_stream(len(source))
            if indices.get_state().get("num_examples") != len(source):
                raise ValueError(
                    f"index_stream: indexes {indices.get_state().get('num_examples')} "
                    f"examples but the source holds {len(source)}"
                )
        self._producer = _Producer(
            source,
            indices,
            batch_size,
            seed,
            preprocess,
            bool(drop_remainder),
            num_workers,
            index_key,
        )
        if self.num_batches == 0:
            logger.warning(
                "no batch of %d fits in the %d examples this shard sees in %s epoch(s)",
                batch_size,
                indices.examples_per_epoch,
                num_epochs,
            )
        self._state = indices.get_state()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[Any] | None = None
        self._stop: threading.Event | None = None
        self._stop_on_collect: weakref.finalize[[], BatchIterator] | None = None
        self._closed = False

    # ------------------------------------------------------------------ public API

    @property
    def batch_size(self) -> int:
        """Examples per batch on this shard."""
        return self._producer.batch_size

    @property
    def num_batches(self) -> int | None:
        """Batches in the whole (finite) stream from the start, or None when endless."""
        indices = self._producer.indices
        if indices.num_epochs is None:
            return None
        total = indices.examples_per_epoch * indices.num_epochs
        if self._producer.drop_remainder:
            return total // self.batch_size
        return -(-total // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("BatchIterator is closed")
        if self._prefetch == 0:
            item = self._producer.produce()
        else:
            self._ensure_thread()
            assert self._queue is not None
            item = self._queue.get()
        if item is _END:
            # Keep returning the end marker to later calls too.
            if self._queue is not None:
                self._queue.put(_END)
            raise StopIteration
        if isinstance(item, BaseException):
            self._stop_thread()
            raise item
        batch: dict[str, np.ndarray]
        batch, state = item
        self._state = state
        return batch

    def get_state(self) -> dict[str, Any]:
        """Returns the position after the last batch returned, as a JSON-serialisable dict."""
        return {
            "version": _STATE_VERSION,
            "batch_size": self.batch_size,
            "drop_remainder": self._producer.drop_remainder,
            "indices": dict(self._state),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resumes from a dict saved by :meth:`get_state`; the next batch is the one after it.

        Args:
          state: the dict from ``get_state()``.

        Raises:
          ValueError: if the state is malformed or belongs to a differently configured pipeline.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a mapping; got {type(state).__name__}")
        for key in ("version", "batch_size", "drop_remainder", "indices"):
            if key not in state:
                raise ValueError(f"state is missing field {key!r}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"state.version must be {_STATE_VERSION}; got {state['version']!r}")
        for key, mine in (
            ("batch_size", self.batch_size),
            ("drop_remainder", self._producer.drop_remainder),
        ):
            if state[key] != mine:
                raise ValueError(f"state.{key} is {state[key]} but this iterator has {mine}")
        self._stop_thread()
        self._producer.indices.set_state(state["indices"])
        self._state = self._producer.indices.get_state()

    def close(self) -> None:
        """Stops the prefetch thread and the worker pool. Idempotent."""
        self._stop_thread()
        self._producer.shutdown()
        self._closed = True

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ prefetch thread

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._stop = threading.Event()
        # The thread holds the producer, not this iterator, so an iterator dropped without
        # close() is still collected, and collecting it stops the thread.
        self._stop_on_collect = weakref.finalize(self, self._stop.set)
        self._thread = threading.Thread(
            target=_run,
            args=(self._producer, self._queue, self._stop),
            name="batchlab-prefetch",
            daemon=True,
        )
        self._thread.start()

    def _stop_thread(self) -> None:
        if self._thread is None:
            return
        assert self._stop is not None and self._stop_on_collect is not None
        self._stop.set()
        self._thread.join()
        self._stop_on_collect.detach()
        self._thread = self._queue = self._stop = self._stop_on_collect = None
        # The producer ran ahead; rewind it to the last batch handed out.
        self._producer.indices.set_state(self._state)


class _Producer:
    """Builds batches in shard order; owned by one BatchIterator and used by one thread."""

    def __init__(
        self,
        source: RandomAccessSource,
        indices: sharding.ShardIterator,
        batch_size: int,
        seed: int,
        preprocess: Preprocess | None,
        drop_remainder: bool,
        num_workers: int,
        index_key: str | None = None,
    ):
        self.source = source
        self.index_key = index_key
        self.indices = indices
        self.batch_size = batch_size
        self.seed = seed
        self.preprocess = preprocess
        self.drop_remainder = drop_remainder
        self.num_workers = num_workers
        self.template: dict[str, np.ndarray] | None = None
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _map(self, fn: Callable[..., Example], *args: Sequence[Any]) -> list[Example]:
        if self.num_workers > 1 and len(args[0]) > 1:
            if self.pool is None:
                self.pool = concurrent.futures.ThreadPoolExecutor(
                    self.num_workers, thread_name_prefix="batchlab-data"
                )
            return list(self.pool.map(fn, *args))
        return [fn(*arg) for arg in zip(*args, strict=True)]

    def read(self, indices: np.ndarray, epochs: np.ndarray) -> dict[str, np.ndarray]:
        """Reads, preprocesses and stacks the examples at ``indices`` (no padding)."""
        gather = getattr(self.source, "gather", None)
        if self.preprocess is None and gather is not None:
            gathered: dict[str, np.ndarray] = gather(indices)
            return gathered
        keys = [int(i) for i in indices]
        getitems = getattr(self.source, "__getitems__", None)
        examples = getitems(keys) if getitems is not None else [self.source[i] for i in keys]
        if self.preprocess is not None:
            preprocess, seed = self.preprocess, self.seed

            def apply(example: Mapping[str, Any], index: int, epoch: int) -> Example:
                return preprocess(dict(example), sharding.example_rng(seed, int(epoch), index))

            examples = self._map(apply, examples, keys, epochs.tolist())
        return collate(examples)

    def produce(self) -> Any:
        """Builds the next batch and the shard state after it, or returns ``_END``."""
        indices, epochs = self.indices.take(self.batch_size)
        if len(indices) == 0 or (self.drop_remainder and len(indices) < self.batch_size):
            return _END
        real = np.zeros(self.batch_size, bool)
        real[: len(indices)] = indices != sharding.PAD_INDEX
        if real.all():
            batch = self.read(indices, epochs)
        else:
            # Padding (evaluation): zeros where there is no example, flagged by the mask.
            kept = real[: len(indices)]
            if self.template is None:
                self.template = self.read(np.zeros(1, np.int64), np.zeros(1, np.int64))
            batch = {
                key: np.zeros((self.batch_size, *value.shape[1:]), value.dtype)
                for key, value in self.template.items()
            }
            if kept.any():
                for key, value in self.read(indices[kept], epochs[kept]).items():
                    batch[key][real] = value
        if self.template is None:
            self.template = {key: value[:1] for key, value in batch.items()}
        if not self.drop_remainder:
            batch[MASK_KEY] = real
        if self.index_key is not None:
            ids = np.full(self.batch_size, sharding.PAD_INDEX, np.int64)
            ids[: len(indices)] = indices
            batch[self.index_key] = ids
        return batch, self.indices.get_state()

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


def _run(producer: _Producer, out: queue.Queue[Any], stop: threading.Event) -> None:
    """Prefetch thread: produce batches into ``out`` until the end, an error, or ``stop``."""
    while not stop.is_set():
        try:
            item = producer.produce()
        except Exception as error:  # handed to the consumer and re-raised there
            logger.exception("data pipeline failed")
            item = error
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if item is _END or isinstance(item, BaseException):
            return
