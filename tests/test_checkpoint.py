"""Orbax checkpoints: round trip, keep-last-K, restore onto another mesh, clear errors."""

import os

import jax
import numpy as np
import pytest
from flax import nnx
from toy_models import FlatLinear

from ood_jax import sharding
from ood_jax.checkpoint import Checkpointer, CheckpointError, abstract_like
from ood_jax.models import create_model
from ood_jax.train import create_train_state, make_optimizer
from ood_jax.train.loop import restore_or_initialize

IDENTITY = {"name": "tiny", "num_classes": 10, "options": {"width": 4, "dropout_rate": 0.3}}


def tiny_state(width=4, seed=0):
    model = create_model("tiny", num_classes=10, rngs=nnx.Rngs(seed), width=width)
    return create_train_state(model, make_optimizer(0.1), seed=seed)[1]


def perturbed(state, k):
    # Distinct, non-trivial values per step (a fresh momentum buffer is all zeros).
    return jax.tree.map(lambda x: x + k if x.dtype == np.float32 else x, state)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


def test_round_trip_keep_last_and_restore_onto_one_device(tmp_path):
    mesh8 = sharding.make_mesh(8)
    state = sharding.replicate(tiny_state(), mesh8)
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, perturbed(state, step), {"model": IDENTITY, "data": {"step": step}})
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.latest_step() == 3

    mesh1 = sharding.make_mesh(1)
    target = abstract_like(state, sharding.replicated(mesh1))
    restored, metadata = Checkpointer(tmp_path / "ckpt").restore(target, expected_model=IDENTITY)
    assert_trees_equal(restored, sharding.fetch(perturbed(state, 3)))
    assert metadata["data"] == {"step": 3}
    assert metadata["model"] == IDENTITY
    leaf = jax.tree.leaves(restored)[0]
    assert leaf.sharding.mesh.devices.size == 1

    older, _ = ckpt.restore(target, step=2)
    assert_trees_equal(older, sharding.fetch(perturbed(state, 2)))
    with pytest.raises(CheckpointError, match="no checkpoint for step 1"):
        ckpt.restore(target, step=1)


def linear_state(num_classes):
    model = FlatLinear(12, num_classes, rngs=nnx.Rngs(0))
    return create_train_state(model, make_optimizer(0.1), seed=0)[1]


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    state = linear_state(4)
    identity = {"name": "flat_linear", "num_classes": 4, "options": {}}
    ckpt = Checkpointer(tmp_path)
    ckpt.save(5, state, {"model": identity})
    other = {**identity, "name": "wrn40_2"}
    with pytest.raises(CheckpointError, match="of another model"):
        ckpt.restore(abstract_like(state), expected_model=other)
    # Without the metadata check the tree still does not fit: a clear error naming it.
    with pytest.raises(CheckpointError, match="different shapes.*head/kernel"):
        ckpt.restore(abstract_like(linear_state(5)))
    with pytest.raises(CheckpointError, match="missing.*bn1"):
        ckpt.restore(abstract_like(tiny_state()))


def test_directory_without_checkpoint_but_with_files_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Checkpointer(tmp_path).latest_step()
    with pytest.raises(CheckpointError):
        restore_or_initialize(tiny_state(), sharding.make_mesh(1), Checkpointer(tmp_path))


def test_leftover_temporary_directory_is_ignored(tmp_path):
    # What a process killed during its first save leaves behind: start from scratch.
    (tmp_path / "7.orbax-checkpoint-tmp-1234").mkdir()
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() is None
    state, restored = restore_or_initialize(tiny_state(), sharding.make_mesh(1), ckpt)
    assert restored is None
    assert int(state.step) == 0


def test_corrupt_checkpoint_files_raise(tmp_path):
    state = tiny_state()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state, {"model": IDENTITY})
    # Overwrite every file of the saved arrays with garbage.
    state_dir = tmp_path / "1" / "state"
    files = [os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs]
    assert files
    for path in files:
        with open(path, "wb") as f:
            f.write(b"\x00garbage" * 3)
    with pytest.raises(CheckpointError, match="checkpoint 1"):
        Checkpointer(tmp_path).restore(abstract_like(state))


def test_corrupt_metadata_raises(tmp_path):
    state = tiny_state()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state, {"model": IDENTITY})
    metadata_dir = tmp_path / "1" / "metadata"
    for name in os.listdir(metadata_dir):
        (metadata_dir / name).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        Checkpointer(tmp_path).restore(abstract_like(state), expected_model=IDENTITY)


def test_save_same_step_twice_is_a_no_op(tmp_path):
    state = tiny_state()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(4, state, {"model": IDENTITY})
    ckpt.save(4, perturbed(state, 1), {"model": IDENTITY})
    restored, _ = ckpt.restore(abstract_like(state))
    assert_trees_equal(restored, state)


def test_bad_max_to_keep(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)
