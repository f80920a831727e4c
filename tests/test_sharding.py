"""Mesh, shardings and host-local -> global batches (8 virtual CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ood_jax import sharding


def test_make_mesh_sizes_and_errors():
    assert sharding.make_mesh().devices.size == len(jax.devices()) == 8
    mesh = sharding.make_mesh(3)
    assert mesh.axis_names == ("data",)
    assert list(mesh.devices.flat) == jax.devices()[:3]
    for bad in (0, 9):
        with pytest.raises(ValueError, match="num_devices must be between 1 and 8"):
            sharding.make_mesh(bad)


def test_global_batch_splits_rows_over_devices_in_order():
    mesh = sharding.make_mesh(4)
    local = {
        "image": np.arange(8 * 2, dtype=np.float32).reshape(8, 2),
        "label": np.arange(8, dtype=np.int32),
    }
    batch = sharding.global_batch(local, mesh)
    for name, value in local.items():
        np.testing.assert_array_equal(np.asarray(batch[name]), value)
        assert batch[name].sharding.spec == jax.sharding.PartitionSpec("data")
        # Device i holds rows [2i, 2i + 2): the batch axis is split, not replicated.
        shards = sorted(batch[name].addressable_shards, key=lambda s: s.index[0].start)
        for i, shard in enumerate(shards):
            np.testing.assert_array_equal(np.asarray(shard.data), value[2 * i : 2 * i + 2])
    with pytest.raises(ValueError, match="leading batch axis"):
        sharding.global_batch({"x": np.float32(1.0)}, mesh)


def test_local_batch_size():
    mesh = sharding.make_mesh(8)
    assert sharding.local_batch_size(128, mesh) == 128  # one process holds the whole batch
    with pytest.raises(ValueError, match="divisible by the number of devices"):
        sharding.local_batch_size(12, mesh)


def test_replicate_copies_to_every_device_and_survives_donation():
    mesh = sharding.make_mesh(8)
    tree = {"w": jnp.arange(3.0), "step": jnp.zeros((), jnp.int32)}
    placed = sharding.replicate(tree, mesh)
    for leaf, original in zip(jax.tree.leaves(placed), jax.tree.leaves(tree), strict=True):
        assert leaf.sharding.is_fully_replicated
        assert len(leaf.addressable_shards) == 8
        for shard in leaf.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(original))
    jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)(placed)
    assert not any(x.is_deleted() for x in jax.tree.leaves(tree))


def test_fetch_returns_numpy():
    mesh = sharding.make_mesh(2)
    fetched = sharding.fetch(sharding.replicate({"a": jnp.ones(2)}, mesh))
    assert isinstance(fetched["a"], np.ndarray)
    np.testing.assert_array_equal(fetched["a"], np.ones(2))
