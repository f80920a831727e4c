"""Randomness conventions of ood_jax.rng."""

import os
import subprocess
import sys
import zlib

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
    # CRC32, not Python's salted hash(): the same key in processes with different hash
    # seeds, and equal to fold_in with the index computed here by the documented rule.
    code = (
        "import jax, numpy as np\n"
        "from ood_jax import rng\n"
        "k = jax.random.key_data(rng.stream_key(rng.root_key(0), 'my_custom_stream'))\n"
        "print(' '.join(str(int(v)) for v in np.asarray(k)))\n"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.split())
    assert outputs[0] == outputs[1]
    index = len(rng.STREAMS) + zlib.crc32(b"my_custom_stream") % (2**31 - len(rng.STREAMS))
    expected = jax.random.key_data(jax.random.fold_in(jax.random.key(0), index))
    assert [int(v) for v in outputs[0]] == [int(v) for v in np.asarray(expected)]


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        rng.root_key(seed)
