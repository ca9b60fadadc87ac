"""Client side of the sharding service, on a trainer's training path.

`ShardingClient` prepares datasets, asks for a trial's shard assignment and records hosts'
positions at checkpoints, retrying what a restart or a brief outage of the service explains
(UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED) with exponential backoff.
Whatever still fails is a `ShardingError`: an infrastructure failure of the attempt (the
controller retries the attempt), never a warning the run trains past.

`ServiceShardIterator` is the example-index stream of one host, each epoch's order read from
the service with ``GetShard``: a `batchlab.data.ShardIterator` (what
`batchlab.data.BatchIterator` reads) whose state is the same JSON dict, so checkpoints stay
interchangeable with locally computed streams.

Example:
  >>> client = ShardingClient(channel(peer_address("sharding")))  # doctest: +SKIP
  >>> shards = client.assign(trial, "mnist1d", "small", "train", num_hosts=1, seed=0)  # doctest: +SKIP
  >>> indices = ServiceShardIterator(client, shards.hosts[0])  # doctest: +SKIP
  >>> indices.take(4)[0]  # doctest: +SKIP
  array([31516, 10387,  2114,  1200])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from batchlab.data.sharding import ShardIterator
from batchlab.proto.v1 import sharding_pb2, sharding_pb2_grpc

__all__ = ["RETRIED_CODES", "ServiceShardIterator", "ShardingClient", "ShardingError"]

log = logging.getLogger(__name__)

# What a restarting or overloaded service answers: worth another try.
RETRIED_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
})


class ShardingError(RuntimeError):
    """The sharding service could not say what to read: the attempt fails as infrastructure.

    Attributes:
      infrastructure: always True (read by the training loop and the trainer to tell an
        infrastructure failure from the run's own).
      code: the last gRPC status code, if the service answered one.
    """

    infrastructure = True

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class ShardingClient:
    """Calls the sharding service with retries.

    Args:
      channel: a channel to the service (see batchlab.rpc.client.channel).
      timeout_s: deadline of one call.
      attempts: tries per call for a retried status code.
      backoff_s: the first wait between tries (doubled each time, at most 10 s).
      sleep: time.sleep (tests pass a fake).
    """

    def __init__(self, channel: grpc.Channel, *, timeout_s: float = 60.0, attempts: int = 6,
                 backoff_s: float = 0.5, sleep: Callable[[float], None] = time.sleep):
        self._stub = sharding_pb2_grpc.ShardingServiceStub(channel)
        self.timeout_s = timeout_s
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self._sleep = sleep

    def _call(self, method: str, request: Any, *, timeout_s: float | None = None) -> Any:
        wait = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return getattr(self._stub, method)(request, timeout=timeout_s or self.timeout_s)
            except grpc.RpcError as error:
                code = error.code() if callable(getattr(error, "code", None)) else None
                details = error.details() if callable(getattr(error, "details", None)) else error
                if code not in RETRIED_CODES or attempt == self.attempts:
                    tries = f" after {attempt} tries" if attempt > 1 else ""
                    raise ShardingError(f"sharding service {method} failed{tries}: "
                                        f"{getattr(code, 'name', code)}: {details}",
                                        code) from None
                log.warning("sharding service %s: %s (%s); try %d of %d in %.1f s", method,
                            getattr(code, "name", code), details, attempt + 1, self.attempts,
                            wait)
                self._sleep(wait)
                wait = min(wait * 2, 10.0)
        raise AssertionError("unreachable")

    def prepare(self, dataset: str, config: str = "") -> sharding_pb2.DatasetInfo:
        """Build the dataset if it is missing (the service builds each once).

        Args:
          dataset: a registered dataset name.
          config: its builder config ("" = the default).
        """
        info: sharding_pb2.DatasetInfo = self._call(
            "PrepareDataset", sharding_pb2.PrepareDatasetRequest(dataset=dataset, config=config),
            timeout_s=max(self.timeout_s, 1800.0))
        return info

    def assign(self, trial: str, dataset: str, config: str, split: str, *, num_hosts: int,
               seed: int, shuffle: bool = True, resume_step: int | None = None,
               num_examples: int | None = None) -> sharding_pb2.TrialShards:
        """Every host's shard of a trial and where it starts.

        Args:
          trial: the trial resource name.
          dataset: the dataset name.
          config: its builder config.
          split: the split the trial trains on.
          num_hosts: trainer processes of the trial.
          seed: the data seed.
          shuffle: whether each epoch is permuted.
          resume_step: the checkpoint step the attempt restored, or None for a fresh start.
          num_examples: examples indexed when derived from the split (BERT instances).
        """
        request = sharding_pb2.AssignShardsRequest(
            trial=trial, dataset=dataset, config=config, split=split, num_hosts=num_hosts,
            seed=seed, shuffle=shuffle)
        if resume_step is not None:
            request.resume_step = resume_step
        if num_examples is not None:
            request.num_examples = num_examples
        shards: sharding_pb2.TrialShards = self._call("AssignShards", request)
        return shards

    def record(self, trial: str, step: int, hosts: Sequence[sharding_pb2.HostShard]) -> int:
        """Record hosts' positions at a checkpoint step; returns how many were stored."""
        response: sharding_pb2.RecordPositionsResponse = self._call(
            "RecordPositions",
            sharding_pb2.RecordPositionsRequest(trial=trial, step=step, hosts=list(hosts)))
        return response.recorded

    def get_shard(self, host: sharding_pb2.HostShard, epoch: int, start: int,
                  max_indices: int) -> sharding_pb2.ShardAssignment:
        """Indices of a host's shard in one epoch from a position (at most max_indices)."""
        request = sharding_pb2.GetShardRequest(
            dataset=host.dataset, config=host.config, split=host.split,
            shard_index=host.shard_index, shard_count=host.shard_count, epoch=epoch,
            seed=host.seed, shuffle=host.shuffle, start_position=start,
            max_indices=max_indices)
        if host.HasField("num_examples"):
            request.num_examples = host.num_examples
        assignment: sharding_pb2.ShardAssignment = self._call("GetShard", request)
        return assignment


class ServiceShardIterator(ShardIterator):
    """One host's endless training index stream, each epoch's order read from the service.

    A `batchlab.data.ShardIterator` (the same ``take``, state format and checks) whose
    per-epoch order comes from the sharding service (GetShard, read whole once per epoch)
    instead of being computed here, starting where the host's assignment says.

    Args:
      client: the ShardingClient.
      host: the host's HostShard (from AssignShards): its stream and where it starts.
      num_examples: the examples indexed (the local source's length).

    Raises:
      ShardingError: the service's shard does not fit the local source.
    """

    def __init__(self, client: ShardingClient, host: sharding_pb2.HostShard, num_examples: int):
        super().__init__(num_examples, host.shard_index, host.shard_count, seed=int(host.seed),
                         shuffle=host.shuffle)
        if self.examples_per_epoch != host.examples_per_shard:
            raise ShardingError(f"the sharding service's shard has {host.examples_per_shard} "
                                f"examples per epoch; {num_examples} local examples in "
                                f"{host.shard_count} shards give {self.examples_per_epoch}")
        self._client = client
        self.host = sharding_pb2.HostShard()
        self.host.CopyFrom(host)
        self._epoch_order: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))
        self.set_state({**self.get_state(), "epoch": int(host.epoch),
                        "position": int(host.position)})

    def order(self, epoch: int) -> np.ndarray:
        """This shard's order for ``epoch``, from the service (kept for the last epoch)."""
        cached, values = self._epoch_order
        if cached == epoch:
            return values
        pieces, position = [], 0
        while position < self.examples_per_epoch:
            answer = self._client.get_shard(self.host, epoch, position, 0)
            if answer.examples_per_shard != self.examples_per_epoch:
                raise ShardingError(f"the sharding service now gives {answer.examples_per_shard} "
                                    f"examples per shard, not {self.examples_per_epoch}: the "
                                    "dataset changed under a running trial")
            if answer.next_position <= position:
                raise ShardingError(f"the sharding service returned no indices for epoch "
                                    f"{epoch} from position {position}")
            pieces.append(np.asarray(answer.indices, np.int64))
            position = answer.next_position
        values = np.concatenate(pieces)
        values.flags.writeable = False
        self._epoch_order = (epoch, values)
        return values

    def host_at(self, state: Mapping[str, Any]) -> sharding_pb2.HostShard:
        """This host's HostShard at a position of this stream (what RecordPositions stores).

        Args:
          state: a get_state() dict: a BatchIterator's ``get_state()["indices"]`` is the
            position after the last batch it handed out (its prefetch thread reads ahead of
            that, so this iterator's own position is further on).

        Raises:
          ValueError: the state belongs to another stream.
        """
        mine = self.get_state()
        for key in ("shard_index", "shard_count", "seed", "shuffle", "num_examples"):
            if state.get(key) != mine[key]:
                raise ValueError(f"state.{key} is {state.get(key)!r}, not this stream's")
        host = sharding_pb2.HostShard()
        host.CopyFrom(self.host)
        host.epoch = int(state["epoch"])
        host.position = int(state["position"])
        return host
