"""Data parallelism over every device with jit and named shardings.

The batch is split along its leading axis over a 1-D mesh ('data'); the state is
replicated. The program is written for the global batch, so the result matches a
single device up to float reassociation. Virtual-batch BN splits the global batch
into consecutive sub-batches of ``virtual_batch_size``; when each device's share is
a multiple of it, no sub-batch straddles two devices, so every device normalises
exactly the examples it holds, as the paper's per-core virtual batches do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["DataParallel"]

_Tree = TypeVar("_Tree")


class DataParallel:
    """Mesh, shardings and host-to-device transfer for data-parallel training.

    Args:
      devices: the devices to use (default: all, across every process).
    """

    def __init__(self, devices: Iterable[jax.Device] | None = None):
        devices = list(jax.devices() if devices is None else devices)
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch = NamedSharding(self.mesh, PartitionSpec("data"))
        self.num_devices = len(devices)
        #: How many of them this process drives (its share of a batch is theirs).
        self.num_local_devices = sum(d.process_index == jax.process_index() for d in devices)

    def check_batch_size(self, batch_size: int, virtual_batch_size: int | None, *, field: str = "batch_size") -> None:
        """Raise ValueError (naming the field) unless the batch splits evenly over devices and virtual batches."""
        if batch_size % self.num_devices:
            raise ValueError(
                f"{field}: {batch_size} is not divisible by the {self.num_devices} devices"
            )
        per_device = batch_size // self.num_devices
        if virtual_batch_size and per_device % virtual_batch_size:
            raise ValueError(
                f"{field}: the per-device batch {per_device} is not a multiple of "
                f"virtual_batch_size {virtual_batch_size}"
            )

    def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Send a host batch to the devices, split along the leading axis.

        With several processes, each passes its own share and the global array is assembled.
        """
        if jax.process_count() > 1:
            return {
                k: jax.make_array_from_process_local_data(self.batch, np.asarray(v))
                for k, v in batch.items()
            }
        arrays: dict[str, jax.Array] = jax.device_put(dict(batch), self.batch)
        return arrays

    def put_replicated(self, tree: _Tree) -> _Tree:
        """Replicate a pytree on every device (the same structure, now of device arrays)."""
        replicated: _Tree = jax.device_put(tree, self.replicated)
        return replicated
