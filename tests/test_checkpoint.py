"""Orbax checkpoints: round trip, keep-last-K, restore onto another mesh, clear errors."""

import os

import jax
import numpy as np
import pytest
from flax import nnx
from toy_models import FlatLinear

from ood_jax import sharding
from ood_jax.checkpoint import (
    Checkpointer,
    CheckpointError,
    CorruptCheckpointError,
    DiskFullError,
    abstract_like,
)
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
    with pytest.raises(CorruptCheckpointError, match="checkpoint 1 .* is corrupt: .*metadata/"):
        Checkpointer(tmp_path).restore(abstract_like(state), expected_model=IDENTITY)
    os.remove(tmp_path / "1" / "ood_jax_sha256.json")  # an older checkpoint: orbax says it
    with pytest.raises(CorruptCheckpointError, match="metadata of checkpoint 1 .* unreadable"):
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


def data_files(step_dir):
    """The files holding a checkpoint's array bytes, largest first."""
    files = [
        os.path.join(d, f)
        for d, _, fs in os.walk(step_dir / "state")
        for f in fs
        if os.path.basename(d) == "d"
    ]
    return sorted(files, key=os.path.getsize, reverse=True)


def raw_orbax_restore(directory, step, like):
    """What orbax alone reads back (a fresh manager: a saving one caches the bytes)."""
    import orbax.checkpoint as ocp

    manager = Checkpointer(directory)._manager
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(like)))
    return manager.restore(step, args=args).state


FRACTIONS = (0.5, 0.3, 0.7, 0.4, 0.6)


def corrupt_silently(directory, step, saved, count=8):
    """Flips ``count`` bytes in the middle of one data file of checkpoint ``step``
    such that orbax restores it without complaint but with changed values.

    Returns the names of the changed arrays. (Flips that orbax notices, or that land
    on bytes no array uses, are undone and the next place is tried. Arrays over
    1 KiB are stored apart from orbax's checksummed index: that is where flips go
    unnoticed.)
    """
    attempts = [(path, frac) for path in data_files(directory / str(step)) for frac in FRACTIONS]
    for path, frac in attempts:
        with open(path, "rb") as f:
            original = f.read()
        at = int(len(original) * frac)
        flipped = bytes(b ^ 0xFF for b in original[at : at + count])
        with open(path, "wb") as f:
            f.write(original[:at] + flipped + original[at + count :])
        try:
            raw = raw_orbax_restore(directory, step, saved)
        except Exception:
            raw = None
        if raw is not None:
            changed = [
                jax.tree_util.keystr(p)
                for (p, a), b in zip(
                    jax.tree_util.tree_flatten_with_path(raw)[0],
                    jax.tree.leaves(saved),
                    strict=True,
                )
                if not np.array_equal(np.asarray(a), np.asarray(b))
            ]
            if changed:
                return changed
        with open(path, "wb") as f:
            f.write(original)
    raise AssertionError("no byte flip changed the restored values silently")


def truncate_data_files(step_dir):
    for path in data_files(step_dir):
        with open(path, "r+b") as f:
            f.truncate(10)


def test_flipped_bytes_are_caught_by_the_hashes_saved_with_the_checkpoint(tmp_path):
    state = perturbed(tiny_state(width=32), 0.37)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state, {"model": IDENTITY})
    # Orbax alone reads the flipped bytes back without complaint: the values changed.
    changed = corrupt_silently(tmp_path, 1, state)
    assert len(changed) == 1, changed
    # The hashes of the checkpoint's files, checked before orbax reads anything:
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint 1 .* is corrupt: 1 file\(s\)"):
        Checkpointer(tmp_path).restore(abstract_like(state), expected_model=IDENTITY)
    # Without them (a run killed right after orbax's commit, or an older checkpoint),
    # the hashes of the arrays, checked after reading:
    os.remove(tmp_path / "1" / "ood_jax_sha256.json")
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint 1 .* is corrupt: 1 saved array"):
        Checkpointer(tmp_path).restore(abstract_like(state), expected_model=IDENTITY)


def test_resume_skips_corrupt_newest_checkpoints_with_a_warning(tmp_path):
    state = tiny_state(width=32)
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, perturbed(state, step), {"model": IDENTITY})
    corrupt_silently(tmp_path / "ckpt", 3, perturbed(state, 3))  # changed bytes
    truncate_data_files(tmp_path / "ckpt" / "2")
    mesh = sharding.make_mesh(1)
    with pytest.warns(UserWarning) as caught:
        restored, _ = restore_or_initialize(state, mesh, ckpt, expected_model=IDENTITY)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("skipping corrupt checkpoint step 3") for m in messages), messages
    assert any(m.startswith("skipping corrupt checkpoint step 2") for m in messages), messages
    assert_trees_equal(sharding.fetch(restored), perturbed(state, 1))
    # Both moved aside (kept for inspection); saving those steps again works.
    assert sorted(os.listdir(tmp_path / "ckpt.corrupt")) == ["2", "3"]
    assert ckpt.all_steps() == [1]
    ckpt.save(2, perturbed(state, 20), {"model": IDENTITY})
    again, _ = Checkpointer(tmp_path / "ckpt").restore(abstract_like(state))
    assert_trees_equal(again, perturbed(state, 20))


def test_no_intact_checkpoint_left_is_an_error_not_a_fresh_start(tmp_path):
    state = tiny_state(width=32)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, perturbed(state, 1), {"model": IDENTITY})
    corrupt_silently(tmp_path / "ckpt", 1, perturbed(state, 1))
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint step 1"):
        with pytest.raises(CorruptCheckpointError, match=r"no intact checkpoint.*\[1\]"):
            restore_or_initialize(state, sharding.make_mesh(1), ckpt)


def test_too_little_free_space_is_one_clear_error_before_writing(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    state = tiny_state()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state, {"model": IDENTITY})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(DiskFullError) as info:
        ckpt.save(2, perturbed(state, 2), {"model": IDENTITY})
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert message.startswith(f"no space left on device for checkpoint step 2 in {tmp_path}")
    assert "checkpoint step 1 is intact" in message and "\n" not in message
    assert sorted(os.listdir(tmp_path)) == ["1"]  # nothing half-written


def test_running_out_of_space_mid_save_hides_orbax_thread_noise(tmp_path, monkeypatch, capfd):
    state = tiny_state()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state, {"model": IDENTITY})

    def failing_save(*args, **kwargs):
        # What orbax does when tensorstore hits ENOSPC: threads print to fd 2, then raise.
        for _ in range(50):
            os.write(2, b"RuntimeError: Event loop is closed\n")
        raise ValueError(
            "RESOURCE_EXHAUSTED: Error writing local file: No space left on device "
            "[os_error_code='28']"
        )

    monkeypatch.setattr(ckpt._manager, "save", failing_save)
    with pytest.raises(DiskFullError, match="step 2 .*ran out of space"):
        ckpt.save(2, state, {"model": IDENTITY})
    assert "Event loop is closed" not in capfd.readouterr().err

    # Any other failure keeps what was printed, and its own exception.
    def other_failure(*args, **kwargs):
        os.write(2, b"orbax says why\n")
        raise RuntimeError("permission denied")

    monkeypatch.setattr(ckpt._manager, "save", other_failure)
    with pytest.raises(RuntimeError, match="permission denied"):
        ckpt.save(3, state, {"model": IDENTITY})
    assert "orbax says why" in capfd.readouterr().err
