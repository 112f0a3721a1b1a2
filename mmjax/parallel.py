"""Data parallelism helpers for the pmap path.

Since JAX 0.10 ``jax.pmap`` is ``jit(shard_map)`` and ``device_put_replicated`` is gone, so the
replicated layout is built here explicitly: a leading axis of size ``local_device_count`` whose
slices live one per device. Checkpoints always hold the single (unreplicated) copy, which is what
lets a run resume on a different device count.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def _device_axis_sharding() -> NamedSharding:
    mesh = Mesh(np.asarray(jax.local_devices()), (AXIS,))
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicate(tree: Any) -> Any:
    """Copies every leaf to all local devices, stacked on a new leading device axis."""
    n = jax.local_device_count()
    sharding = _device_axis_sharding()

    def put(x: Any) -> jax.Array:
        x = np.asarray(jax.device_get(x))
        return jax.device_put(np.broadcast_to(x, (n, *x.shape)), sharding)

    return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a replicated tree (still on device)."""
    return jax.tree.map(lambda x: x[0], tree)


def shard_batch(batch: Any) -> Any:
    """Splits a per-process batch [B, ...] into [local_devices, B / local_devices, ...] on device.

    The transfer starts immediately (asynchronously), so calling this for the next batch before
    the current step finishes overlaps input copy with compute.
    """
    n = jax.local_device_count()
    sharding = _device_axis_sharding()

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(
                f"per-process batch of {x.shape[0]} does not split over {n} local devices "
                "(batch_size must be a multiple of the device count)"
            )
        return jax.device_put(x.reshape(n, x.shape[0] // n, *x.shape[1:]), sharding)

    return jax.tree.map(put, batch)
