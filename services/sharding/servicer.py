"""ShardingService: prepares datasets once and tells each worker which examples it reads.

The example order comes from :func:`batchlab.data.shard_indices` (deterministic from
``(split size, shard, shard count, epoch, seed, shuffle)``; strided layout; each epoch's
remainder is dropped so every shard sees the same count), so a worker can resume from any
position and two workers never see the same example in an epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Mapping

import numpy as np

from batchlab import data
from batchlab.proto.v1 import sharding_pb2, sharding_pb2_grpc
from batchlab.rpc.errors import FailedPrecondition, InvalidArgument, handle_errors, status_for
from services.sharding.datasets import DatasetCatalog

logger = logging.getLogger(__name__)

# Keeps a response well under gRPC's default 4 MiB message limit (an index is <= 3 bytes for
# ImageNet-sized splits); a client reads on from next_position until end_of_epoch.
MAX_INDICES_PER_RESPONSE = 1 << 19


@functools.lru_cache(maxsize=32)
def _shard_order(num_examples: int, shard_index: int, shard_count: int, epoch: int, seed: int,
                 shuffle: bool) -> np.ndarray:
    """One shard's order for one epoch, cached: workers ask for it piece by piece."""
    order = data.shard_indices(num_examples, shard_index, shard_count, epoch, seed,
                               shuffle=shuffle)
    order.flags.writeable = False
    return order


@dataclasses.dataclass(frozen=True)
class _Prepared:
    split_sizes: Mapping[str, int]
    built_at: float


class ShardingServicer(sharding_pb2_grpc.ShardingServiceServicer):
    """Serves dataset preparation and shard assignments.

    Args:
      catalog: where datasets are built and found.
      metrics: the ``ShardingMetrics`` of ``make_metrics(...).sharding``, or None.
      max_indices_per_response: cap on the indices of one GetShard answer.
    """

    def __init__(self, catalog: DatasetCatalog, *, metrics=None,
                 max_indices_per_response: int = MAX_INDICES_PER_RESPONSE):
        self._catalog = catalog
        self._metrics = metrics
        self._cap = max_indices_per_response
        self._prepared: dict[tuple[str, str], _Prepared] = {}
        self._configs: dict[tuple[str, str], str] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    # ----------------------------------------------------------------- helpers

    def _dataset(self, name: str) -> str:
        names = self._catalog.names()
        if name not in names:
            raise InvalidArgument("dataset", f"must be one of {names}; got {name!r}")
        return name

    def _key(self, dataset: str, config: str) -> tuple[str, str]:
        """Validates the names and returns ``(dataset, canonical config)``."""
        dataset = self._dataset(dataset)
        with self._guard:
            resolved = self._configs.get((dataset, config))
        if resolved is None:
            resolved = self._catalog.resolve_config(dataset, config)
            with self._guard:
                self._configs[(dataset, config)] = resolved
        return dataset, resolved

    def _lock_for(self, key: tuple[str, str]) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _count_error(self, dataset: str, exc: Exception) -> None:
        if self._metrics is not None:
            # Unknown names become "unknown": a label must not take arbitrary client values.
            label = dataset if dataset in self._catalog.names() else "unknown"
            self._metrics.errors.labels(dataset=label,
                                        reason=status_for(exc)[0].name.lower()).inc()

    def _info(self, key: tuple[str, str], sizes: Mapping[str, int]) -> sharding_pb2.DatasetInfo:
        return sharding_pb2.DatasetInfo(dataset=key[0], config=key[1],
                                        split_sizes=dict(sizes),
                                        data_dir=self._catalog.data_dir)

    # --------------------------------------------------------------------- RPCs

    @handle_errors
    def PrepareDataset(self, request, context):
        """Builds a dataset once (concurrent callers wait for the one build); its splits.

        Args:
          request: ``PrepareDatasetRequest`` (config "" = the default).
          context: the call context.

        Returns:
          ``DatasetInfo`` with the canonical config name and the split sizes.
        """
        try:
            key = self._key(request.dataset, request.config)
            arrived = time.monotonic()
            prepared = self._prepared.get(key)
            if prepared is not None and not request.rebuild:
                return self._info(key, prepared.split_sizes)
            with self._lock_for(key):
                prepared = self._prepared.get(key)
                # Another caller built it while this one waited (a rebuild too, if it started
                # after this request arrived): use theirs.
                if prepared is not None and (not request.rebuild or prepared.built_at > arrived):
                    return self._info(key, prepared.split_sizes)
                logger.info("preparing %s (%s)%s", key[0], key[1],
                            ", rebuilding" if request.rebuild else "")
                sizes = dict(self._catalog.prepare(key[0], key[1], rebuild=request.rebuild))
                self._prepared[key] = _Prepared(sizes, time.monotonic())
            return self._info(key, sizes)
        except Exception as exc:
            self._count_error(request.dataset, exc)
            raise

    def _split_sizes(self, key: tuple[str, str]) -> Mapping[str, int]:
        prepared = self._prepared.get(key)
        if prepared is not None:
            return prepared.split_sizes
        # Built by an earlier process (or by hand): no need to prepare again.
        sizes = self._catalog.find(*key)
        if sizes is None:
            raise FailedPrecondition(
                f"{key[0]} ({key[1] or 'default'}) is not prepared; call PrepareDataset first")
        with self._lock_for(key):
            self._prepared.setdefault(key, _Prepared(dict(sizes), time.monotonic()))
        return sizes

    @handle_errors
    def GetShard(self, request, context):
        """Returns one shard's example indices for an epoch, from a position.

        Args:
          request: ``GetShardRequest``.
          context: the call context.

        Returns:
          ``ShardAssignment``: at most ``max_indices`` (0 = the rest of the epoch, up to a
          server cap) indices, the position after them, the shard's per-epoch count and
          whether the epoch is done.
        """
        try:
            key = self._key(request.dataset, request.config)
            sizes = self._split_sizes(key)
            if request.split not in sizes:
                raise InvalidArgument("split", f"must be one of {sorted(sizes)}; "
                                               f"got {request.split!r}")
            num_examples = sizes[request.split]
            if request.shard_count < 1:
                raise InvalidArgument("shard_count", "must be >= 1")
            if request.shard_index >= request.shard_count:
                raise InvalidArgument("shard_index", f"must be < shard_count "
                                                     f"({request.shard_count}); "
                                                     f"got {request.shard_index}")
            if request.shard_count > num_examples:
                raise InvalidArgument("shard_count", f"must be <= the {num_examples} examples "
                                                     f"of split {request.split!r}")
            per_shard = data.examples_per_shard(num_examples, request.shard_count)
            start = request.start_position
            if start > per_shard:
                raise InvalidArgument("start_position", f"must be <= {per_shard} (examples "
                                                        f"per shard per epoch); got {start}")
            wanted = request.max_indices or per_shard
            end = min(per_shard, start + wanted, start + self._cap)
            order = _shard_order(num_examples, request.shard_index, request.shard_count,
                                 request.epoch, request.seed, request.shuffle)
            indices = order[start:end]
        except Exception as exc:
            self._count_error(request.dataset, exc)
            raise
        if self._metrics is not None:
            labels = {"dataset": key[0], "split": request.split}
            self._metrics.requests.labels(**labels).inc()
            self._metrics.examples.labels(**labels).inc(len(indices))
        return sharding_pb2.ShardAssignment(
            indices=indices.tolist(),
            next_position=end,
            examples_per_shard=per_shard,
            end_of_epoch=end >= per_shard,
        )
