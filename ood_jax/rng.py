"""Randomness conventions: one seed per run, one key per step, one key per stream.

Every random draw in training is a pure function of ``(seed, step, stream)``,
which is what makes resumed runs bitwise identical to uninterrupted ones: no
random state has to be saved besides the root key, and the root key never
changes during training.

    root      = root_key(seed)                       # uint32[2], stored in TrainState
    key(step) = fold_in(root, step)                  # per training step
    key(step, stream) = fold_in(key(step), index)    # e.g. dropout, augmentation

Keys are kept as raw ``uint32[2]`` key data (not typed ``key<fry>`` arrays) so
that orbax saves and restores them like any other array.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
from flax import nnx

# Fixed stream indices. Append new streams at the end so that existing runs keep
# their random numbers.
STREAMS: tuple[str, ...] = ("dropout", "default", "params", "augment", "outliers")


def root_key(seed: int) -> jax.Array:
    """Return the run's root key as raw ``uint32[2]`` key data for ``seed``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}; pass e.g. seed=0.")
    return jax.random.key_data(jax.random.key(seed))


def step_key(root: jax.Array, step: jax.Array | int) -> jax.Array:
    """Key of training step ``step``: ``fold_in(root, step)``, raw ``uint32[2]``.

    ``step`` may be traced, so this works inside ``jax.jit``.
    """
    key = jax.random.wrap_key_data(jnp.asarray(root, jnp.uint32))
    return jax.random.key_data(jax.random.fold_in(key, step))


def stream_key(key: jax.Array, stream: str) -> jax.Array:
    """Typed key of the named ``stream`` under ``key``: ``fold_in(key, STREAMS.index(stream))``.

    Unknown stream names are hashed deterministically (a stable CRC32 of the
    name), so a model with its own stream name still gets a reproducible key.
    """
    if stream in STREAMS:
        index = STREAMS.index(stream)
    else:
        # CRC32 is stable across processes, unlike Python's salted hash().
        index = len(STREAMS) + zlib.crc32(stream.encode()) % (2**31 - len(STREAMS))
    typed = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    return jax.random.fold_in(typed, index)


def reseeded(state, key: jax.Array | None):
    """``state`` (an nnx state) as new Variables, its RNG streams re-seeded from ``key``.

    Every ``RngKey`` becomes :func:`stream_key` ``(key, its stream)`` (kept when ``key``
    is None) and every ``RngCount`` 0, so that the draws depend on ``(key, stream)``
    only. New Variable objects on every call: variables captured from outside a jax
    trace cannot be mutated inside it.
    """

    def fresh(variable):
        if isinstance(variable, nnx.RngKey) and key is not None:
            return variable.replace(stream_key(key, variable.tag))
        if isinstance(variable, nnx.RngCount):
            return variable.replace(jnp.zeros_like(variable.get_value()))
        return variable.replace(variable.get_value())

    return jax.tree.map(fresh, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
