"""ShardingService: prepares datasets once and tells each worker which examples it reads.

The example order comes from :func:`batchlab.data.shard_indices` (deterministic from
``(split size, shard, shard count, epoch, seed, shuffle)``; strided layout; each epoch's
remainder is dropped so every shard sees the same count), so a worker can resume from any
position and two workers never see the same example in an epoch.

The service is the authority for what a trial's processes read: `AssignShards` gives every
host of a trial its shard (index ``i`` of ``num_hosts``) and where it starts, trainers read
their examples with `GetShard`, and each host records its position with every checkpoint
(`RecordPositions`, kept in a `PositionStore`). A resumed or re-placed attempt asks for the
positions recorded with the checkpoint it restored, so it reads exactly the examples an
undisturbed run reads.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc
import numpy as np
from google.protobuf import json_format

from batchlab import data, limits
from batchlab.limits import shorten
from batchlab.proto.v1 import sharding_pb2, sharding_pb2_grpc
from batchlab.rpc.errors import FailedPrecondition, InvalidArgument, handle_errors, status_for
from services.sharding.datasets import DatasetCatalog
from services.sharding.positions import PositionStore

if TYPE_CHECKING:
    from batchlab.rpc.metrics import ShardingMetrics

logger = logging.getLogger(__name__)

# Keeps a response well under gRPC's default 4 MiB message limit (an index is <= 3 bytes for
# ImageNet-sized splits); a client reads on from next_position until end_of_epoch.
MAX_INDICES_PER_RESPONSE = 1 << 19
MAX_HOSTS = 4096
MAX_TRIAL_LENGTH = 512
# Examples derived from a split (BERT instances from its documents) are at most this many per
# record of the split, and at most MAX_DERIVED_EXAMPLES: each epoch's order is computed whole.
MAX_DERIVED_PER_RECORD = 100
MAX_DERIVED_EXAMPLES = 1 << 28
# The fields that say which stream a position belongs to: a position recorded for another
# stream (another seed, shard count, dataset...) must never be served as this one's.
_STREAM_FIELDS = ("dataset", "config", "split", "shard_count", "seed", "shuffle",
                  "examples_per_shard", "num_examples")


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
      positions: where hosts' positions at checkpoints are kept (AssignShards and
        RecordPositions answer FAILED_PRECONDITION without one).
    """

    def __init__(self, catalog: DatasetCatalog, *, metrics: ShardingMetrics | None = None,
                 max_indices_per_response: int = MAX_INDICES_PER_RESPONSE,
                 positions: PositionStore | None = None):
        self._catalog = catalog
        self._positions = positions
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
            raise InvalidArgument("dataset", f"must be one of {names}; got {shorten(name)}")
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
    def PrepareDataset(self, request: sharding_pb2.PrepareDatasetRequest,
                       context: grpc.ServicerContext) -> sharding_pb2.DatasetInfo:
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

    def _stream(self, request: sharding_pb2.GetShardRequest | sharding_pb2.AssignShardsRequest,
                shard_count: int,
                count_field: str = "shard_count") -> tuple[tuple[str, str], int, int]:
        """Validates a request's (dataset, config, split, shard count, num_examples).

        Returns:
          ((dataset, config), the examples indexed, examples per shard per epoch).
        """
        key = self._key(request.dataset, request.config)
        sizes = self._split_sizes(key)
        if request.split not in sizes:
            raise InvalidArgument("split", f"must be one of {sorted(sizes)}; "
                                           f"got {shorten(request.split)}")
        num_examples = sizes[request.split]
        if request.HasField("num_examples"):
            most = min(MAX_DERIVED_EXAMPLES, MAX_DERIVED_PER_RECORD * num_examples)
            if not 1 <= request.num_examples <= most:
                raise InvalidArgument("num_examples", f"must be in [1, {most}] for split "
                                                      f"{request.split!r} of {num_examples} "
                                                      f"records; got {request.num_examples}")
            num_examples = request.num_examples
        if shard_count < 1:
            raise InvalidArgument(count_field, "must be >= 1")
        if shard_count > num_examples:
            raise InvalidArgument(count_field, f"must be <= the {num_examples} examples "
                                               f"of split {request.split!r}")
        return key, num_examples, data.examples_per_shard(num_examples, shard_count)

    @handle_errors
    def GetShard(self, request: sharding_pb2.GetShardRequest,
                 context: grpc.ServicerContext) -> sharding_pb2.ShardAssignment:
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
            key, num_examples, per_shard = self._stream(request, request.shard_count)
            if request.shard_index >= request.shard_count:
                raise InvalidArgument("shard_index", f"must be < shard_count "
                                                     f"({request.shard_count}); "
                                                     f"got {request.shard_index}")
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

    # ------------------------------------------------------ trials' shards and positions

    def _store(self) -> PositionStore:
        if self._positions is None:
            raise FailedPrecondition("this sharding service keeps no positions (it was started "
                                     "without a state folder)")
        return self._positions

    @staticmethod
    def _trial(trial: str, field: str = "trial") -> str:
        if not trial or len(trial) > MAX_TRIAL_LENGTH or not trial.isprintable():
            raise InvalidArgument(field, f"must be a trial resource name of at most "
                                         f"{MAX_TRIAL_LENGTH} printable characters")
        return trial

    @handle_errors
    def AssignShards(self, request: sharding_pb2.AssignShardsRequest,
                     context: grpc.ServicerContext) -> sharding_pb2.TrialShards:
        """Every host's shard of a trial, at the start or at a recorded checkpoint.

        Args:
          request: ``AssignShardsRequest``.
          context: the call context.

        Returns:
          ``TrialShards``: host ``i`` reads shard ``i`` of ``num_hosts`` (strided, so the
          global batches do not depend on the number of hosts), from epoch 0 position 0, or
          from the positions recorded at ``resume_step``.

        Raises:
          FailedPrecondition: a host has no position recorded at ``resume_step``, or the
            recorded one belongs to another stream (seed, hosts, dataset...).
        """
        try:
            trial = self._trial(request.trial)
            if not 1 <= request.num_hosts <= MAX_HOSTS:
                raise InvalidArgument("num_hosts", f"must be in [1, {MAX_HOSTS}]; "
                                                   f"got {request.num_hosts}")
            key, num_examples, per_shard = self._stream(request, request.num_hosts,
                                                        "num_hosts")
            base = sharding_pb2.HostShard(
                dataset=key[0], config=key[1], split=request.split,
                shard_count=request.num_hosts, seed=request.seed, shuffle=request.shuffle,
                examples_per_shard=per_shard)
            if request.HasField("num_examples"):
                base.num_examples = num_examples
            hosts = []
            for index in range(request.num_hosts):
                host = sharding_pb2.HostShard()
                host.CopyFrom(base)
                host.shard_index = index
                hosts.append(host)
            step = request.resume_step if request.HasField("resume_step") else 0
            if step > limits.MAX_STEPS:
                raise InvalidArgument("resume_step", f"must be at most {limits.MAX_STEPS} "
                                                     f"(batchlab.limits); got {step}")
            if step:
                recorded = self._store().at(trial, step)
                missing = [h.shard_index for h in hosts if h.shard_index not in recorded]
                if missing:
                    raise FailedPrecondition(
                        f"{trial}: no position recorded at step {step} for hosts {missing} "
                        f"(recorded: {sorted(recorded)})")
                for host in hosts:
                    saved = recorded[host.shard_index]
                    wanted = json_format.MessageToDict(host, preserving_proto_field_name=True,
                                                       always_print_fields_with_no_presence=True)
                    for field in _STREAM_FIELDS:
                        if str(saved.get(field)) != str(wanted.get(field)):
                            raise FailedPrecondition(
                                f"{trial}: host {host.shard_index}'s position at step {step} "
                                f"belongs to another stream ({field} {saved.get(field)!r}, "
                                f"asked {wanted.get(field)!r})")
                    host.epoch = int(saved.get("epoch", 0))
                    host.position = int(saved.get("position", 0))
        except Exception as exc:
            self._count_error(request.dataset, exc)
            raise
        logger.info("%s: %d host(s) of %s/%s %s from step %d", trial, len(hosts), key[0],
                    key[1] or "default", request.split, step)
        return sharding_pb2.TrialShards(trial=trial, hosts=hosts, step=step)

    @handle_errors
    def RecordPositions(self, request: sharding_pb2.RecordPositionsRequest,
                        context: grpc.ServicerContext
                        ) -> sharding_pb2.RecordPositionsResponse:
        """Stores hosts' positions at a checkpoint step (what AssignShards serves on resume).

        Args:
          request: ``RecordPositionsRequest``.
          context: the call context.

        Returns:
          ``RecordPositionsResponse`` with how many were stored.
        """
        trial = self._trial(request.trial)
        if not 1 <= len(request.hosts) <= MAX_HOSTS:
            raise InvalidArgument("hosts", f"must hold 1 to {MAX_HOSTS} hosts' positions; "
                                           f"got {len(request.hosts)}")
        if request.step > limits.MAX_STEPS:
            raise InvalidArgument("step", f"must be at most {limits.MAX_STEPS} "
                                          f"(batchlab.limits); got {request.step}")
        rows = []
        for i, host in enumerate(request.hosts):
            if host.shard_count < 1 or host.shard_index >= host.shard_count:
                raise InvalidArgument(f"hosts[{i}].shard_index",
                                      f"must be < shard_count ({host.shard_count}); "
                                      f"got {host.shard_index}")
            if host.examples_per_shard < 1 or host.position >= host.examples_per_shard:
                raise InvalidArgument(f"hosts[{i}].position",
                                      f"must be < examples_per_shard "
                                      f"({host.examples_per_shard}); got {host.position}")
            rows.append(json_format.MessageToDict(host, preserving_proto_field_name=True,
                                                  always_print_fields_with_no_presence=True))
        recorded = self._store().record(trial, request.step, rows)
        return sharding_pb2.RecordPositionsResponse(recorded=recorded)
