"""Activation shaping: ASH-P, ASH-B, ASH-S (Djurisic et al., ICLR 2023) and SCALE
(Xu et al., ICLR 2024), then the energy of the logits the head gives.

Each transform keeps, per example, the ``k = n - round(n * percentile / 100)``
largest of the ``n`` activations (all axes but the batch flattened) and zeroes
the rest; the variants differ in what the kept ones become, with ``s1`` the
example's sum before pruning and ``s2`` after:

- ASH-P: the kept values (pruning only);
- ASH-B: every kept entry set to ``s1 / k`` (binarized, same sum);
- ASH-S: the kept values times ``exp(s1 / s2)``;
- SCALE: *all* values (unpruned) times ``exp(s1 / s2)``.

The score is ``logsumexp(head(shaped))``. OpenOOD v1.5
(``openood/networks/ash_net.py``, ``scale_net.py``) shapes the pooled
penultimate features (as ``[B, D, 1, 1]``); pytorch-ood 0.4
(``src/pytorch_ood/detector/ash.py``) shapes whatever its ``backbone`` returns,
the feature map before pooling in its example, then runs ``head``. Both pick the
kept entries with ``torch.topk``; here ties go to the lower flat index (an
argsort rank), which matters for ASH-B only (where the fill lands among equal
values, e.g. zeros after a ReLU when fewer than ``k`` entries are positive).
The rank is computed with sorts rather than ``lax.top_k`` so that the
percentile can be vmapped (``k`` is traced). Where the kept entries sum to zero
(an all-zero feature vector) ``s1 / s2`` is taken as 1 (:func:`share_ratio`):
the references' 0 / 0 gives NaN there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ood_jax.scores.logit import energy
from ood_jax.scores.registry import ActivationScore, ArrayScore, Head


def top_mask(x: jax.Array, percentile) -> jax.Array:
    """``[B, n]`` bool: the ``n - round(n * percentile / 100)`` largest entries of each row.

    ``x``: ``[B, ...]`` (flattened per example, row-major); ties go to the lower index.
    """
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[1]
    k = n - jnp.round(n * jnp.asarray(percentile, jnp.float32) / 100.0).astype(jnp.int32)
    order = jnp.argsort(-flat, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return rank < k


def _sums(x: jax.Array, percentile) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(flat x [B, n], kept mask [B, n], s1 [B, 1])``."""
    flat = x.reshape(x.shape[0], -1)
    return flat, top_mask(x, percentile), flat.sum(axis=-1, keepdims=True)


def ash_p(x: jax.Array, *, percentile) -> jax.Array:
    """ASH-P of ``x [B, ...]``: the largest ``100 - percentile`` % kept, the rest zero."""
    flat, keep, _ = _sums(x, percentile)
    return jnp.where(keep, flat, 0.0).reshape(x.shape)


def ash_b(x: jax.Array, *, percentile) -> jax.Array:
    """ASH-B of ``x [B, ...]``: the kept entries set to ``sum(x) / k``, the rest zero."""
    flat, keep, s1 = _sums(x, percentile)
    fill = s1 / keep.sum(axis=-1, keepdims=True)
    return jnp.where(keep, fill, 0.0).reshape(x.shape)


def share_ratio(total: jax.Array, kept: jax.Array) -> jax.Array:
    """``total / kept``, and 1 where ``kept`` is 0.

    ``kept == 0`` is an example whose largest activations are all zero (after a
    ReLU: an all-zero feature vector, which ACET's models give some OOD images).
    The references divide anyway and score it NaN; 1 is the ratio's lower bound
    for non-negative activations (all the mass in the kept entries), and for an
    all-zero vector the shaped features are zero whatever the factor, so the
    score is the energy of the head's bias."""
    empty = kept == 0
    return jnp.where(empty, 1.0, total / jnp.where(empty, 1.0, kept))


def ash_s(x: jax.Array, *, percentile) -> jax.Array:
    """ASH-S of ``x [B, ...]``: the kept entries times ``exp(s1 / s2)``, the rest zero."""
    flat, keep, s1 = _sums(x, percentile)
    pruned = jnp.where(keep, flat, 0.0)
    ratio = share_ratio(s1, pruned.sum(axis=-1, keepdims=True))
    return (pruned * jnp.exp(ratio)).reshape(x.shape)


def scale(x: jax.Array, *, percentile) -> jax.Array:
    """SCALE of ``x [B, ...]``: all of ``x`` times ``exp(s1 / s2)`` (``s2``: the kept sum)."""
    flat, keep, s1 = _sums(x, percentile)
    s2 = jnp.where(keep, flat, 0.0).sum(axis=-1, keepdims=True)
    return (flat * jnp.exp(share_ratio(s1, s2))).reshape(x.shape)


SHAPINGS = {"ash_p": ash_p, "ash_b": ash_b, "ash_s": ash_s, "scale": scale}


def rank1_removed(feature_map: jax.Array) -> jax.Array:
    """RankFeat (Song et al., NeurIPS 2022): ``[B, H, W, C]`` minus its rank-1 part.

    Each example's ``[H*W, C]`` matrix loses ``s_1 u_1 v_1^T`` (its largest singular
    value and vectors, exact SVD: OpenOOD's ``accelerate: False``); the transpose
    that OpenOOD's ``[C, H*W]`` view takes has the same rank-1 part.
    """
    b, h, w, c = feature_map.shape
    m = feature_map.reshape(b, h * w, c)
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    top = s[:, :1, None] * (u[:, :, :1] @ vt[:, :1, :])
    return (m - top).reshape(b, h, w, c)


def _rank1_removed_f32(x: jax.Array) -> jax.Array:
    return rank1_removed(x.astype(jnp.float32)).astype(x.dtype)


# --- Registry entries (``SCORES``; ood_jax.scores.catalog registers them). ---


def _head_logits(head: Head, z: jax.Array) -> jax.Array:
    logits = z @ head.kernel
    return logits if head.bias is None else logits + head.bias


def _on_features(shaping):
    def fn(logits, features, head, *, percentile):
        return energy(_head_logits(head, shaping(features, percentile=percentile)))

    return fn


def _on_pre_pool(shaping):
    def fn(out, to_logits, *, percentile):
        return energy(to_logits(shaping(out["pre_pool"], percentile=percentile)))

    return fn


def _rankfeat(out, to_logits, *, temperature):
    return energy(to_logits(rank1_removed(out["pre_pool"])), temperature=temperature)


def _rankfeat_fused(out, to_logits, *, temperature):
    # OpenOOD's fusion: the mean of the block-4 path's logits and those of the last stage
    # run again on the rank-1-removed block-3 map (the block before the last).
    block4 = to_logits(rank1_removed(out["pre_pool"]))
    block3 = to_logits.edited(len(out["blocks"]) - 2, _rank1_removed_f32)
    return energy((block4 + block3) / 2, temperature=temperature)


# Defaults: OpenOOD v1.5 configs/postprocessors/ash.yml (ASH-B, percentile 90) and
# scale.yml (85); pytorch-ood 0.4 detector/ash.py for ASH-P and ASH-S (0.65 = 65 %).
_PERCENTILES = {"ash_p": 65.0, "ash_b": 90.0, "ash_s": 65.0, "scale": 85.0}
_DISPLAY = {"ash_p": "ASH-P", "ash_b": "ASH-B", "ash_s": "ASH-S", "scale": "SCALE"}
_P = {"sweep": "percentile", "sweep_label": "p"}
# OpenOOD searches ASH-B's and SCALE's percentile over this grid (APS_mode: True).
_GRIDS = {"ash_b": {"percentile": (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)}}
_GRIDS["scale"] = _GRIDS["ash_b"]
# Each shaping of the pooled features, then of the feature map, then RankFeat.
SCORES = (
    *(
        ArrayScore(
            name,
            _on_features(shaping),
            _DISPLAY[name],
            {"percentile": _PERCENTILES[name]},
            grid=_GRIDS.get(name, {}),
            **_P,
        )
        for name, shaping in SHAPINGS.items()
    ),
    *(
        ActivationScore(
            f"{name}_map",
            _on_pre_pool(shaping),
            f"{_DISPLAY[name]} (map)",
            {"percentile": _PERCENTILES[name]},
            captures=("pre_pool",),
            **_P,
        )
        for name, shaping in SHAPINGS.items()
    ),
    # OpenOOD configs/postprocessors/rankfeat.yml: temperature 1, exact SVD.
    ActivationScore(
        "rankfeat", _rankfeat, "RankFeat", {"temperature": 1.0}, captures=("pre_pool",)
    ),
    ActivationScore(
        "rankfeat_fused",
        _rankfeat_fused,
        "RankFeat (blocks 3+4)",
        {"temperature": 1.0},
        captures=("pre_pool", "blocks"),
    ),
)
