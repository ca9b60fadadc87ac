"""Deterministic sharding: which examples each shard (host) sees, in what order, per epoch.

Pure numpy; no JAX, no I/O. Every host computes the same global permutation for a given
``(seed, epoch)`` and takes its own slice of it, so no coordination is needed.

The recipe, for ``num_examples = N`` and ``shard_count = S``:

1. ``perm = Generator(PCG64(SeedSequence([SHUFFLE_DOMAIN, seed, epoch]))).permutation(N)``
   (or ``arange(N)`` when ``shuffle=False``).
2. With ``remainder='drop'`` (training), the last ``N % S`` entries of ``perm`` are dropped, so
   every shard sees exactly ``N // S`` examples per epoch. Because the permutation changes every
   epoch, a different handful of examples is left out each epoch, and none is left out forever.
   With ``remainder='pad'`` (evaluation), ``perm`` is padded with ``-1`` up to ``S * ceil(N / S)``
   so that no example is dropped, every shard still has the same count, and the ``-1`` entries
   mark padding that the caller masks out.
3. ``layout='strided'`` (default): shard ``i`` takes ``perm[i::S]``. ``layout='contiguous'``:
   shard ``i`` takes the ``i``-th contiguous block.

Why strided is the default: when each shard batches its own order with a local batch of ``b``,
global step ``t`` consumes exactly ``perm[t*S*b : (t+1)*S*b]``, whatever ``S`` is. So the
sequence of global batches depends only on the global batch size, not on how many hosts share
it, and a run on 8 hosts sees the same data as a run on 1.

Seeds: the shuffle uses entropy ``[SHUFFLE_DOMAIN, seed, epoch]`` and per-example randomness
(:func:`example_rng`) uses ``[EXAMPLE_DOMAIN, seed, epoch, index]``. The leading domain tags keep
the two streams apart: numpy's ``SeedSequence`` treats ``[a, b]`` and ``[a, b, 0]`` as the same
entropy, so without a tag example 0 would share the shuffle's stream.

Reproducibility across hosts relies on every host running the same numpy (the lock file pins
it): numpy does not promise that ``Generator.permutation`` streams never change between
releases.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

SHUFFLE_DOMAIN = 0x5348  # "SH": the per-epoch global permutation.
EXAMPLE_DOMAIN = 0x4558  # "EX": per-example preprocessing randomness.

LAYOUTS = ("strided", "contiguous")
REMAINDERS = ("drop", "pad")
PAD_INDEX = -1

_STATE_VERSION = 1


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Validates that ``value`` is an integer (not a bool) no smaller than ``minimum``.

    Args:
      name: argument name, used in the error message.
      value: the value to check.
      minimum: inclusive lower bound, or None for no bound.

    Returns:
      ``value`` as a Python int.

    Raises:
      ValueError: naming ``name`` and the reason.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    integer = int(value)
    if minimum is not None and integer < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {integer}")
    return integer


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")
    return value


def _check_shard(
    num_examples: Any, shard_index: Any, shard_count: Any, remainder: str
) -> tuple[int, int, int]:
    num_examples = check_int("num_examples", num_examples, minimum=0)
    shard_count = check_int("shard_count", shard_count, minimum=1)
    shard_index = check_int("shard_index", shard_index, minimum=0)
    if shard_index >= shard_count:
        raise ValueError(f"shard_index must be < shard_count ({shard_count}); got {shard_index}")
    if remainder == "drop" and num_examples < shard_count:
        raise ValueError(
            f"num_examples ({num_examples}) must be >= shard_count ({shard_count}) with "
            "remainder='drop', otherwise every shard would be empty"
        )
    if remainder == "pad" and num_examples == 0:
        raise ValueError("num_examples must be >= 1; got 0")
    return num_examples, shard_index, shard_count


def examples_per_shard(num_examples: int, shard_count: int, remainder: str = "drop") -> int:
    """Returns how many entries each shard gets per epoch.

    Args:
      num_examples: size of the dataset split.
      shard_count: number of shards.
      remainder: 'drop' (``N // S``, the tail of each epoch's permutation is dropped) or
        'pad' (``ceil(N / S)``, padded with ``PAD_INDEX``).

    Returns:
      The per-shard, per-epoch count (identical for every shard).
    """
    _check_choice("remainder", remainder, REMAINDERS)
    num_examples, _, shard_count = _check_shard(num_examples, 0, shard_count, remainder)
    if remainder == "drop":
        return num_examples // shard_count
    return math.ceil(num_examples / shard_count)


def epoch_permutation(num_examples: int, epoch: int, seed: int) -> np.ndarray:
    """Returns the global permutation of ``range(num_examples)`` for one epoch.

    Args:
      num_examples: size of the dataset split.
      epoch: epoch number (>= 0).
      seed: data seed (>= 0).

    Returns:
      int64 array, a permutation of ``arange(num_examples)``; identical on every host.
    """
    num_examples = check_int("num_examples", num_examples, minimum=0)
    epoch = check_int("epoch", epoch, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    rng = np.random.Generator(np.random.PCG64([SHUFFLE_DOMAIN, seed, epoch]))
    return rng.permutation(num_examples).astype(np.int64, copy=False)


def shard_indices(
    num_examples: int,
    shard_index: int,
    shard_count: int,
    epoch: int,
    seed: int,
    *,
    shuffle: bool = True,
    layout: str = "strided",
    remainder: str = "drop",
) -> np.ndarray:
    """Returns the example order one shard sees in one epoch.

    Args:
      num_examples: size of the dataset split (N).
      shard_index: this shard, in ``[0, shard_count)``.
      shard_count: number of shards (S), usually the number of hosts.
      epoch: epoch number (>= 0); each epoch has its own permutation.
      seed: data seed (>= 0).
      shuffle: permute per epoch; False keeps ``0..N-1`` order (evaluation).
      layout: 'strided' (shard i takes every S-th entry starting at i) or 'contiguous'.
      remainder: 'drop' (N // S each; the permutation's tail is dropped) or 'pad'
        (ceil(N / S) each, ``PAD_INDEX`` (-1) marks padding).

    Returns:
      int64 array of example indices of length ``examples_per_shard(N, S, remainder)``.

    Raises:
      ValueError: naming the offending argument.

    Example:
      >>> shard_indices(10, 0, 3, epoch=0, seed=0, shuffle=False).tolist()
      [0, 3, 6]
    """
    _check_choice("layout", layout, LAYOUTS)
    _check_choice("remainder", remainder, REMAINDERS)
    num_examples, shard_index, shard_count = _check_shard(
        num_examples, shard_index, shard_count, remainder
    )
    epoch = check_int("epoch", epoch, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    if shuffle:
        order = epoch_permutation(num_examples, epoch, seed)
    else:
        order = np.arange(num_examples, dtype=np.int64)
    per_shard = examples_per_shard(num_examples, shard_count, remainder)
    total = per_shard * shard_count
    if total <= num_examples:
        order = order[:total]
    else:
        order = np.concatenate([order, np.full(total - num_examples, PAD_INDEX, np.int64)])
    if layout == "strided":
        return order[shard_index::shard_count].copy()
    return order[shard_index * per_shard : (shard_index + 1) * per_shard].copy()


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Returns the random generator for one example's preprocessing in one epoch.

    Args:
      seed: data seed.
      epoch: epoch in which the example is drawn (augmentations differ per epoch).
      index: example index in the split.

    Returns:
      A ``np.random.Generator`` that depends only on ``(seed, epoch, index)``.
    """
    return np.random.Generator(np.random.PCG64([EXAMPLE_DOMAIN, seed, epoch, index]))


class ShardIterator:
    """Iterates one shard's example indices across epochs; resumable from (epoch, position).

    The stream is the concatenation of ``shard_indices(..., epoch=e, ...)`` for
    ``e = 0, 1, ...`` (forever, or ``num_epochs`` times). ``position`` counts entries already
    consumed within ``epoch``; the state is always normalised so that ``position`` is less
    than the per-epoch count.

    Args:
      num_examples: size of the dataset split.
      shard_index: this shard, in ``[0, shard_count)``.
      shard_count: number of shards.
      seed: data seed (>= 0).
      shuffle: permute per epoch.
      layout: 'strided' or 'contiguous' (see :func:`shard_indices`).
      remainder: 'drop' or 'pad' (see :func:`shard_indices`).
      num_epochs: stop after this many epochs; None repeats forever.

    Example:
      >>> it = ShardIterator(8, 0, 2, seed=1)
      >>> first, _ = it.take(3)
      >>> state = it.get_state()
      >>> rest, _ = it.take(5)
      >>> it.set_state(state)
      >>> bool((it.take(5)[0] == rest).all())
      True
    """

    def __init__(
        self,
        num_examples: int,
        shard_index: int = 0,
        shard_count: int = 1,
        *,
        seed: int = 0,
        shuffle: bool = True,
        layout: str = "strided",
        remainder: str = "drop",
        num_epochs: int | None = None,
    ):
        self._layout = _check_choice("layout", layout, LAYOUTS)
        self._remainder = _check_choice("remainder", remainder, REMAINDERS)
        self._num_examples, self._shard_index, self._shard_count = _check_shard(
            num_examples, shard_index, shard_count, remainder
        )
        self._seed = check_int("seed", seed, minimum=0)
        self._shuffle = bool(shuffle)
        self._num_epochs = (
            None if num_epochs is None else check_int("num_epochs", num_epochs, minimum=1)
        )
        self._per_epoch = examples_per_shard(self._num_examples, self._shard_count, remainder)
        self._epoch = 0
        self._position = 0
        self._cached_epoch = -1
        self._cached_order = np.empty(0, np.int64)

    @property
    def epoch(self) -> int:
        """The epoch the next index comes from."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many indices of the current epoch have been consumed."""
        return self._position

    @property
    def examples_per_epoch(self) -> int:
        """Indices this shard yields per epoch (padding included for remainder='pad')."""
        return self._per_epoch

    @property
    def num_epochs(self) -> int | None:
        """The epoch limit, or None for an endless stream."""
        return self._num_epochs

    @property
    def exhausted(self) -> bool:
        """Whether a finite stream has been fully consumed."""
        return self._num_epochs is not None and self._epoch >= self._num_epochs

    def order(self, epoch: int) -> np.ndarray:
        """Returns this shard's full index order for ``epoch`` (cached for the last one)."""
        if epoch != self._cached_epoch:
            self._cached_order = shard_indices(
                self._num_examples,
                self._shard_index,
                self._shard_count,
                epoch,
                self._seed,
                shuffle=self._shuffle,
                layout=self._layout,
                remainder=self._remainder,
            )
            self._cached_epoch = epoch
        return self._cached_order

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Consumes up to ``count`` indices, crossing epoch boundaries.

        Args:
          count: how many indices to take (>= 0).

        Returns:
          ``(indices, epochs)``: int64 arrays of equal length, the example indices and the
          epoch each was drawn in. Shorter than ``count`` only when a finite stream ends.
        """
        count = check_int("count", count, minimum=0)
        indices: list[np.ndarray] = []
        epochs: list[np.ndarray] = []
        remaining = count
        while remaining > 0 and not self.exhausted:
            order = self.order(self._epoch)
            chunk = order[self._position : self._position + remaining]
            indices.append(chunk)
            epochs.append(np.full(len(chunk), self._epoch, np.int64))
            remaining -= len(chunk)
            self._position += len(chunk)
            if self._position >= self._per_epoch:
                self._epoch += 1
                self._position = 0
        if not indices:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(indices), np.concatenate(epochs)

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        indices, _ = self.take(1)
        if len(indices) == 0:
            raise StopIteration
        return int(indices[0])

    def get_state(self) -> dict[str, Any]:
        """Returns the position as a JSON-serialisable dict (plain ints, strings, bools)."""
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "position": self._position,
            "num_examples": self._num_examples,
            "shard_index": self._shard_index,
            "shard_count": self._shard_count,
            "seed": self._seed,
            "shuffle": self._shuffle,
            "layout": self._layout,
            "remainder": self._remainder,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a position saved by :meth:`get_state`.

        Args:
          state: the dict from ``get_state()`` (possibly after a JSON round trip).

        Raises:
          ValueError: if the state is malformed or was saved by a differently configured
            iterator (another seed, shard, dataset size...), naming the field.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a mapping; got {type(state).__name__}")
        expected = self.get_state()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"state is missing fields {missing}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"state.version must be {_STATE_VERSION}; got {state['version']!r}")
        for key in (
            "num_examples",
            "shard_index",
            "shard_count",
            "seed",
            "shuffle",
            "layout",
            "remainder",
        ):
            if state[key] != expected[key]:
                raise ValueError(
                    f"state.{key} is {state[key]!r} but this iterator has {expected[key]!r}"
                )
        epoch = check_int("state.epoch", state["epoch"], minimum=0)
        position = check_int("state.position", state["position"], minimum=0)
        if position >= self._per_epoch:
            raise ValueError(
                f"state.position must be < {self._per_epoch} (indices per epoch); got {position}"
            )
        if self._num_epochs is not None and epoch > self._num_epochs:
            raise ValueError(f"state.epoch must be <= num_epochs ({self._num_epochs}); got {epoch}")
        self._epoch = epoch
        self._position = position
