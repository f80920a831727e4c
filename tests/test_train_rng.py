"""Randomness conventions of ood_jax.rng."""

import jax
import numpy as np
import pytest

from ood_jax import rng


def test_step_key_is_fold_in_of_root():
    root = rng.root_key(7)
    expected = jax.random.key_data(jax.random.fold_in(jax.random.key(7), 5))
    np.testing.assert_array_equal(np.asarray(rng.step_key(root, 5)), np.asarray(expected))
    # Works on a traced step (inside jit) and gives the same key.
    jitted = jax.jit(rng.step_key)(root, np.int32(5))
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(expected))


def test_streams_and_steps_give_distinct_keys():
    root = rng.root_key(0)
    keys = {
        tuple(np.asarray(jax.random.key_data(rng.stream_key(rng.step_key(root, s), name))))
        for s in range(3)
        for name in ("dropout", "augment", "my_custom_stream")
    }
    assert len(keys) == 9


def test_custom_stream_key_is_stable():
    # CRC32, not Python's salted hash(): the same in every process.
    a = jax.random.key_data(rng.stream_key(rng.root_key(0), "my_custom_stream"))
    b = jax.random.key_data(rng.stream_key(rng.root_key(0), "my_custom_stream"))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        rng.root_key(seed)
