"""Scores against a bank of training examples: neural relation graph and NNGuide.

The ``fit_*`` / ``*_score`` contract and shapes are those of :mod:`ood_jax.scores.fitted`;
scoring runs through chunks of test examples, so memory is ``chunk_size x N_bank``.
"""

from __future__ import annotations

import functools
import math
import numbers

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ood_jax.losses import l2_normalize
from ood_jax.scores.fitted import HIGHEST, _score_features, _train_features
from ood_jax.scores.logit import _as_float, _check_chunk_size, energy

__all__ = [
    "NNGuideParams",
    "RelationParams",
    "fit_nnguide",
    "fit_relation",
    "nnguide_score",
    "relation_score",
]


def _chunked(fn, *rows: jax.Array, chunk_size: int) -> jax.Array:
    """``fn`` of each row of ``rows`` (flattened to ``[M, .]``), ``chunk_size`` rows at a time."""
    _check_chunk_size(chunk_size)
    batch_shape = rows[0].shape[:-1]
    flat = tuple(r.reshape(-1, r.shape[-1]) for r in rows)
    if flat[0].shape[0] == 0:
        return jnp.zeros(batch_shape, jnp.float32)
    out = jax.lax.map(lambda a: fn(*a), flat, batch_size=min(chunk_size, flat[0].shape[0]))
    return out.reshape(batch_shape)


@flax.struct.dataclass
class RelationParams:
    """The relation graph's training nodes.

    Attributes:
      features: ``[N, D]`` L2-normalized training features.
      probs: ``[N, K]`` their softmax probabilities.
    """

    features: jax.Array
    probs: jax.Array


def fit_relation(train_logits: ArrayLike, train_features: ArrayLike) -> RelationParams:
    """Normalized training features and softmax probabilities (OpenOOD v1.5 ``relation``)."""
    x = _train_features(train_features, np.float32)
    f = _train_features(train_logits, np.float32)
    if f.shape[0] != x.shape[0]:
        raise ValueError(f"train_logits has {f.shape[0]} rows, train_features {x.shape[0]}.")
    return RelationParams(
        features=l2_normalize(jnp.asarray(x)), probs=jax.nn.softmax(jnp.asarray(f), axis=-1)
    )


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def relation_score(
    params: RelationParams,
    logits: ArrayLike,
    features: ArrayLike,
    *,
    power: ArrayLike = 1.0,
    threshold: float = 0.03,
    chunk_size: int = 256,
) -> jax.Array:
    r"""Sum of relation-graph edges to the training set (Kim et al., NeurIPS 2023).

    .. math:: r_i = \max(\hat z^\top \hat z_i, 0) \; p^\top p_i, \qquad
        s(x) = \sum_i [r_i > \tau] \, r_i^{\,\mathrm{power}}

    with ``hat z`` the L2-normalized features and ``p`` the softmax
    probabilities. Defaults ``power = 1`` (swept over ``[1, 2, 4, 6, 8]``) and
    ``tau = 0.03`` (OpenOOD v1.5 ``relation_postprocessor.py``).

    Args:
      params: from :func:`fit_relation`.
      logits: ``[..., K]``.
      features: ``[..., D]``.
      power: edge exponent; may be traced (vmapped).
      threshold: edges at or below it are dropped.
      chunk_size: test examples per chunk, static.

    Returns:
      ``[...]`` float32 scores (``>= 0``).
    """
    z = l2_normalize(_score_features(features, params.features.shape[1]))
    p = jax.nn.softmax(_as_float(logits, "logits"), axis=-1)

    def one(query: jax.Array, prob: jax.Array) -> jax.Array:
        similarity = jnp.maximum(jnp.matmul(params.features, query, precision=HIGHEST), 0.0)
        edges = similarity * jnp.matmul(params.probs, prob, precision=HIGHEST)
        kept = edges > threshold
        return jnp.sum(jnp.where(kept, jnp.where(kept, edges, 1.0) ** power, 0.0))

    return _chunked(one, z, p, chunk_size=chunk_size)


@flax.struct.dataclass
class NNGuideParams:
    """NNGuide's bank.

    Attributes:
      guide: ``[M, D]`` normalized bank features scaled by their energy.
    """

    guide: jax.Array


def fit_nnguide(
    train_logits: ArrayLike, train_features: ArrayLike, *, alpha: float = 0.01, seed: int = 0
) -> NNGuideParams:
    r"""NNGuide's guided bank (Park et al., ICCV 2023) from a fraction of the training set.

    .. math:: g_i = \hat z_i \, \log \sum_k e^{f_k(x_i)}

    for a seeded random ``ceil(alpha N)`` of the training examples. Default
    ``alpha = 0.01`` (OpenOOD v1.5 ``configs/postprocessors/nnguide.yml``; OpenOOD
    takes the first batches of its shuffled training loader, a multiple of the
    batch size).

    Args:
      train_logits: ``[N, K]``.
      train_features: ``[N, D]``.
      alpha: fraction of the training set in the bank, in ``(0, 1]``.
      seed: of the subset.

    Returns:
      :class:`NNGuideParams` for :func:`nnguide_score`.
    """
    if not isinstance(alpha, numbers.Real) or not 0 < alpha <= 1:
        raise ValueError(f"alpha must be a fraction in (0, 1], got {alpha!r}.")
    x = _train_features(train_features, np.float32)
    f = _train_features(train_logits, np.float32)
    size = math.ceil(alpha * x.shape[0])
    keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], size, replace=False))
    confidence = energy(jnp.asarray(f[keep]))
    return NNGuideParams(guide=l2_normalize(jnp.asarray(x[keep])) * confidence[:, None])


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def nnguide_score(
    params: NNGuideParams,
    logits: ArrayLike,
    features: ArrayLike,
    *,
    k: int = 100,
    chunk_size: int = 256,
) -> jax.Array:
    r"""Energy times the mean similarity to the ``k`` nearest guided bank entries (NNGuide).

    .. math:: s(x) = \log \sum_k e^{f_k(x)} \cdot
        \operatorname{mean}_{i \in \mathrm{top}_k} \hat z^\top g_i

    Default ``k = 100`` (OpenOOD v1.5); a bank smaller than ``k`` uses all of it.

    Args:
      params: from :func:`fit_nnguide`.
      logits: ``[..., K]``.
      features: ``[..., D]``.
      k: neighbours, ``>= 1``, static.
      chunk_size: test examples per chunk, static.

    Returns:
      ``[...]`` float32 scores.
    """
    if not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    k = min(k, params.guide.shape[0])
    z = l2_normalize(_score_features(features, params.guide.shape[1]))

    def one(query: jax.Array) -> jax.Array:
        top, _ = jax.lax.top_k(jnp.matmul(params.guide, query, precision=HIGHEST), k)
        return jnp.mean(top)

    return energy(_as_float(logits, "logits")) * _chunked(one, z, chunk_size=chunk_size)
