"""Gram-matrix deviations (Sastry & Oore, ICML 2020): per-layer feature correlations
of orders ``p`` against per-class bounds seen in training.

For a block output ``F [H*W, C]`` and a power ``p``, the Gram vector is the row sum of
the ``p``-th order Gram matrix, ``g_p = sign(G) |G|^(1/p)`` with ``G = (F^p)ᵀ (F^p) 1``
(``[C]``; ``F^p`` elementwise). Fit: per class ``c``, block ``l`` and power ``p``, the
elementwise minimum and maximum of ``g_p`` over the training examples of class ``c``
(a seeded ``holdout`` fraction left out), and per block the mean total deviation
``E_l`` of the held-out examples from their class's bounds. Score, with ``ŷ`` the
predicted class:

    δ(g; lo, hi) = Σ_i relu(lo_i − g_i) / |lo_i + 1e-6| + relu(g_i − hi_i) / |hi_i + 1e-6|,
    s(x) = −(Σ_l Σ_p δ(g_lp(x); lo_lŷp, hi_lŷp) / E_l) / max softmax(f(x)).

The layers are the model's ``out["blocks"]`` (the stem and every stage). References:
OpenOOD v1.5 ``openood/postprocessors/gram_postprocessor.py`` (``gram.yml``: powers
1..5; it hooks every ReLU and Conv2d output and divides by the confidence, as here) and
pytorch-ood 0.4 ``src/pytorch_ood/detector/gram.py`` (the layers a user names, no
confidence division). Both hold out 10 % of each class (``random.sample`` /
``torch.randperm``); here each training example is held out with probability
``holdout`` from a seeded stream, so the fit streams over the batches and keeps only
the held-out examples' Gram vectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ood_jax.scores.fitted import HIGHEST
from ood_jax.scores.registry import ActivationScore


def gram_vectors(x: jax.Array, power: int) -> jax.Array:
    """``[B, C]`` Gram vectors of order ``power`` of ``x [B, H, W, C]`` (module docstring)."""
    f = (x.astype(jnp.float32) ** power).reshape(x.shape[0], -1, x.shape[-1])
    # Row sums of FᵀF without the C x C matrix: Fᵀ (F 1).
    g = jnp.einsum("bnc,bn->bc", f, f.sum(axis=-1), precision=HIGHEST)
    return jnp.sign(g) * jnp.abs(g) ** (1.0 / power)


def deviation(g, lo, hi):
    """``[B]`` δ of Gram vectors ``g [B, C]`` from bounds ``lo, hi`` ``[B, C]`` (NumPy or JAX)."""
    xp = jnp if isinstance(g, jax.Array) else np
    below = xp.maximum(lo - g, 0.0) / xp.abs(lo + 1e-6)
    above = xp.maximum(g - hi, 0.0) / xp.abs(hi + 1e-6)
    return (below + above).sum(axis=-1)


@flax.struct.dataclass
class GramParams:
    """Fitted Gram bounds: per block ``lows``/``highs`` ``[K, P, C_l]`` and ``norms [L]``."""

    lows: tuple
    highs: tuple
    norms: jax.Array


def fit_gram(
    stream: Iterable[tuple[Sequence[np.ndarray], np.ndarray]], *, holdout: float, seed: int
) -> GramParams:
    """Streams over ``(per-block Gram vectors [B, P, C_l], labels [B])`` batches."""
    draw = np.random.default_rng(seed)
    lows, highs, held = None, None, []
    for blocks, labels in stream:
        out = draw.random(len(labels)) < holdout
        held.append(([b[out] for b in blocks], labels[out]))
        lows = lows or [{} for _ in blocks]
        highs = highs or [{} for _ in blocks]
        for layer, block in enumerate(blocks):
            for c in np.unique(labels[~out]):
                rows = block[~out & (labels == c)]
                lows[layer][c] = np.minimum(lows[layer].get(c, np.inf), rows.min(axis=0))
                highs[layer][c] = np.maximum(highs[layer].get(c, -np.inf), rows.max(axis=0))
    if lows is None:
        raise ValueError("train: the training set yielded no batches.")
    classes = int(max(lows[0], default=-1)) + 1
    missing = sorted(set(range(classes)) - set(lows[0]))
    if missing or not classes:
        raise ValueError(f"train: every class needs fitted training examples; none for {missing}.")
    lows = [np.stack([d[c] for c in range(classes)]) for d in lows]
    highs = [np.stack([d[c] for c in range(classes)]) for d in highs]
    norms = []
    for layer in range(len(lows)):
        devs = [
            deviation(blocks[layer], lows[layer][y], highs[layer][y]).sum(axis=-1)
            for blocks, y in held
            if len(y)
        ]
        mean = float(np.concatenate(devs).mean()) if devs else 0.0
        # No held-out deviation to normalize by (none held out, or all inside the bounds).
        norms.append(mean if mean > 0 else 1.0)
    return GramParams(
        tuple(jnp.asarray(x, jnp.float32) for x in lows),
        tuple(jnp.asarray(x, jnp.float32) for x in highs),
        jnp.asarray(norms, jnp.float32),
    )


def gram_score(
    params: GramParams, logits: jax.Array, blocks: Sequence[jax.Array], *, powers: Sequence[int]
) -> jax.Array:
    """``[B]`` Gram score (module docstring) of the block outputs ``[B, H, W, C_l]``."""
    pred = jnp.argmax(logits, axis=-1)
    total = 0.0
    for layer, block in enumerate(blocks):
        lo, hi = params.lows[layer][pred], params.highs[layer][pred]  # [B, P, C]
        dev = sum(
            deviation(gram_vectors(block, p), lo[:, i], hi[:, i]) for i, p in enumerate(powers)
        )
        total = total + dev / params.norms[layer]
    return -total / jax.nn.softmax(logits.astype(jnp.float32), axis=-1).max(axis=-1)


# --- Registry entry (``SCORES``; ood_jax.scores.catalog registers it). ---


def _gram_features(out, *, powers, holdout, seed):
    return tuple(
        jnp.stack([gram_vectors(block, p) for p in powers], axis=1) for block in out["blocks"]
    )


def _fit_gram(stream, *, powers, holdout, seed):
    return fit_gram(stream, holdout=holdout, seed=seed)


def _gram(params, out, to_logits, *, powers, holdout, seed):
    return gram_score(params, out["logits"], out["blocks"], powers=tuple(powers))


# OpenOOD gram.yml: powers [1, 2, 3, 4, 5]; both references hold out 10 %.
SCORES = (
    ActivationScore(
        "gram",
        _gram,
        "Gram",
        {"powers": (1, 2, 3, 4, 5), "holdout": 0.1, "seed": 0},
        captures=("blocks",),
        fit=_fit_gram,
        fit_features=_gram_features,
    ),
)
