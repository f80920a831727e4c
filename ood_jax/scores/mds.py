"""Mahalanobis scores with input preprocessing (Lee et al., NeurIPS 2018): one layer
(``mahalanobis_odin``) and the multi-layer ensemble (``mds_ensemble``, MDSEns).

Per layer ``l`` with features ``h_l(x)``: class means ``μ_lc`` and a shared covariance
``Σ_l`` from the training set (:func:`ood_jax.scores.gaussian.fit_mahalanobis`: ÷N,
ridge ``1e-6 · trace/D``), ``M_l(x) = −min_c (h_l(x) − μ_lc)ᵀ Σ_l⁻¹ (h_l(x) − μ_lc)``. The
input is first moved to decrease that distance,

    x' = x − ε · sign(∇_x min_c d_lc(x)²) / σ     (σ: the per-channel std, as ODIN),

and the score is ``M_l(x')``; MDSEns sums ``α_l M_l(x'_l)`` over the layers, each with
its own perturbed input, with ``h_l`` the channel mean of block ``l``'s output
(``out["blocks"]``: the stem and every stage). The references' per-layer score is
``max_c −½ d²``: half of ours (the same ranking; the weights scale alike).

References: pytorch-ood 0.4 ``src/pytorch_ood/detector/mahalanobis.py``
(``MahalanobisODIN``, ``eps=0.002``) and ``mmahalanobis.py`` (``MultiMahalanobis``,
uniform ``alpha``, no preprocessing); OpenOOD v1.5
``openood/postprocessors/mds_ensemble_postprocessor.py`` (``noise=0.0014``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax.scores.gaussian import (
    ClassMoments,
    MahalanobisParams,
    fit_mahalanobis,
    mahalanobis_score,
)
from ood_jax.scores.registry import ImageScore


def preprocessed_mahalanobis(
    params: MahalanobisParams,
    feature_fn: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    *,
    eps: float,
    std: Sequence[float],
) -> jax.Array:
    """``[B]`` :func:`mahalanobis_score` of ``feature_fn(x')``, ``x'`` the preprocessed input.

    ``feature_fn``: ``images [B, H, W, C] -> [B, D]``, batch-independent (eval mode), so
    the gradient of the summed distances is each example's own; ``std``: ``[C]`` (the
    step is ``eps / std`` in normalized units).
    """
    x = jnp.asarray(images, jnp.float32)

    def distances(inputs):
        return -jnp.sum(mahalanobis_score(params, feature_fn(inputs)))

    step = jnp.sign(jax.grad(distances)(x)) / jnp.asarray(std, jnp.float32)
    return mahalanobis_score(params, feature_fn(jax.lax.stop_gradient(x - eps * step)))


def channel_means(out) -> tuple[jax.Array, ...]:
    """``[B, C_l]`` spatial mean of every block output ``[B, H, W, C_l]`` in ``out["blocks"]``."""
    return tuple(block.mean(axis=(1, 2)) for block in out["blocks"])


def fit_layers(stream: Iterable[tuple[Sequence[np.ndarray], np.ndarray]]) -> tuple:
    """One :class:`~ood_jax.scores.gaussian.MahalanobisParams` per layer, streamed over
    ``(per-layer features [B, D_l], labels [B])`` batches."""
    moments = None
    for layers, labels in stream:
        moments = moments or [ClassMoments() for _ in layers]
        for moment, x in zip(moments, layers, strict=True):
            moment.add(x, labels)
    if moments is None:
        raise ValueError("train: the training set yielded no batches.")
    return tuple(moment.fit() for moment in moments)


def mds_ensemble(
    params: Sequence[MahalanobisParams],
    apply_out: Callable[[jax.Array], dict],
    images: jax.Array,
    *,
    noise: float,
    alpha: Sequence[float] | None,
    std: Sequence[float],
) -> jax.Array:
    """``[B]`` ``Σ_l α_l M_l(x'_l)`` over the blocks (module docstring); ``alpha=None``: all 1."""
    weights = (1.0,) * len(params) if alpha is None else tuple(alpha)
    if len(weights) != len(params):
        raise ValueError(f"alpha: expected one weight per block ({len(params)}), got {weights}.")
    total = 0.0
    for layer, (layer_params, weight) in enumerate(zip(params, weights, strict=True)):

        def feature_fn(x, layer=layer):
            return channel_means(apply_out(x))[layer]

        total = total + weight * preprocessed_mahalanobis(
            layer_params, feature_fn, images, eps=noise, std=std
        )
    return total


# --- Registry entries (``SCORES``; ood_jax.scores.catalog registers them). ---


def _fit_mahalanobis_odin(logits, features, labels, *, eps, max_examples):
    return fit_mahalanobis(features, labels)


def _mahalanobis_odin(params, apply_out, images, std, *, eps, max_examples):
    return preprocessed_mahalanobis(
        params, lambda x: apply_out(x)["features"], images, eps=eps, std=std
    )


def _mds_features(out, *, noise, alpha, max_examples):
    return channel_means(out)


def _fit_mds(stream, *, noise, alpha, max_examples):
    return fit_layers(stream)


def _mds_ensemble(params, apply_out, images, std, *, noise, alpha, max_examples):
    return mds_ensemble(params, apply_out, images, noise=noise, alpha=alpha, std=std)


# eps: pytorch-ood MahalanobisODIN's 0.002; noise: OpenOOD mds_ensemble.yml's 0.0014 (its
# alpha_list [1] weighs one layer; equal weights over every block here). max_examples: a
# CPU budget, as ODIN's (each layer costs a gradient and a forward pass).
SCORES = (
    ImageScore(
        "mahalanobis_odin",
        _mahalanobis_odin,
        "Mahalanobis (preprocessed)",
        {"eps": 0.002, "max_examples": None},
        fit=_fit_mahalanobis_odin,
    ),
    ImageScore(
        "mds_ensemble",
        _mds_ensemble,
        "MDSEns",
        {"noise": 0.0014, "alpha": None, "max_examples": None},
        captures=("blocks",),
        fit=_fit_mds,
        fit_features=_mds_features,
    ),
)
