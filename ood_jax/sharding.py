"""Device mesh, shardings, and host-local -> global batches.

The training and evaluation steps run under ``jax.jit`` over a 1-D mesh with a
``data`` axis: the batch is split over it, the train state is replicated. The
same code runs on 1 CPU, 8 virtual CPU devices, a GPU, a TPU slice, or several
hosts (one process per host after ``jax.distributed.initialize()``), because
every process only ever hands over its own slice of the batch and
``jax.make_array_from_process_local_data`` assembles the global array.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh ``("data",)`` over the first ``num_devices`` devices (all if None).

    With several processes ``num_devices`` must be None: every process has to
    take part in the mesh. ``devices``: the devices to choose from (default
    ``jax.devices()``), e.g. compile-only TPU devices from
    ``jax.experimental.topologies``.
    """
    devices = jax.devices() if devices is None else list(devices)
    if num_devices is None:
        num_devices = len(devices)
    if not 1 <= num_devices <= len(devices):
        raise ValueError(
            f"num_devices must be between 1 and {len(devices)} (the devices JAX sees), "
            f"got {num_devices}."
        )
    if num_devices != len(devices) and jax.process_count() > 1:
        raise ValueError(
            "num_devices must be None (all devices) when running with several processes, "
            f"got {num_devices} of {len(devices)}."
        )
    return jax.make_mesh(
        (num_devices,),
        (DATA_AXIS,),
        devices=devices[:num_devices],
        axis_types=(jax.sharding.AxisType.Auto,),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (parameters, optimizer state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Examples each process must supply per step for a ``global_batch_size`` batch.

    The global batch must split evenly over the devices of the mesh.
    """
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        raise ValueError(
            f"batch_size {global_batch_size} must be divisible by the number of devices "
            f"({num_devices}); choose a multiple of {num_devices}."
        )
    return global_batch_size // jax.process_count()


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble a global, batch-sharded ``jax.Array`` per key from this process's slice.

    ``local`` maps names to NumPy arrays ``[B_local, ...]``; the result has the
    same keys with arrays ``[B_local * process_count, ...]`` sharded on ``data``.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, value in local.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"batch[{name!r}] must have a leading batch axis, got a scalar.")
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` fully replicated on ``mesh``.

    Every process must pass identical values (e.g. initialized from the same seed).
    Always copies: the train step donates its state, which must not delete the
    caller's arrays (``device_put`` alone may reuse a buffer already on a device).
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(jax.tree.map(lambda x: np.array(x, copy=True), tree), sharding)
    # device_put cannot build a multi-process array from host values; each process
    # contributes its (identical) copy instead.
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)),
        tree,
    )


def fetch(tree: Any) -> Any:
    """Copy a (replicated or fully addressable) tree of arrays to host NumPy."""
    return jax.tree.map(_to_numpy, tree)


def _to_numpy(x: Any) -> Any:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        # Replicated arrays spanning several processes: any local shard is the whole value.
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)
