"""Scores of a rescaled or re-normalized last layer: logit scaling (LTS) and pNML.

LTS needs the logits and features only; pNML fits the training features' Gram
matrix (the ``fit_*`` / ``*_score`` contract of :mod:`ood_jax.scores.fitted`).
"""

from __future__ import annotations

import functools
import numbers

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ood_jax.losses import l2_normalize
from ood_jax.scores.fitted import HIGHEST, _check_unused_labels, _score_features, _train_features
from ood_jax.scores.logit import _as_float, _linear_head, energy
from ood_jax.scores.shaping import share_ratio

__all__ = ["PNMLParams", "fit_pnml", "lts_score", "pnml_score"]


@functools.partial(jax.jit, static_argnames=("p",))
def lts_score(logits: ArrayLike, features: ArrayLike, *, p: float = 0.05) -> jax.Array:
    r"""Energy of logits scaled by the features' top-activation share (LTS, Djurisic et al., 2025).

    .. math:: S(z) = \Big( \frac{\sum_d \max(z_d, 0)}{\sum_{d \in \mathrm{top}_k} \max(z_d, 0)}
        \Big)^2, \qquad s(x) = \log \sum_k e^{S(z) f_k(x)}

    with ``k = max(1, D - round((1 - p) D))``, and ``S(z) = 1`` where no activation
    is positive (the reference's 0 / 0 gives NaN there). Default ``p = 0.05`` (pytorch-ood 0.4
    ``detector/lts.py``, which follows the authors' code, ReLU included).

    Args:
      logits: ``[..., K]``.
      features: ``[..., D]``.
      p: fraction of top activations in ``(0, 1]``, static.

    Returns:
      ``[...]`` float32 scores.
    """
    if not isinstance(p, numbers.Real) or not 0 < p <= 1:
        raise ValueError(f"p must be a fraction in (0, 1], got {p!r}.")
    z = jnp.maximum(_as_float(features, "features"), 0.0)
    dim = z.shape[-1]
    # Python's round (half to even) as torch's round in the reference.
    k = max(1, dim - round(dim * (1 - p)))
    top, _ = jax.lax.top_k(z, k)
    # No positive activation: scale 1 (the reference's 0 / 0 is NaN), the logits kept.
    scale = jnp.square(share_ratio(jnp.sum(z, axis=-1), jnp.sum(top, axis=-1)))
    return energy(_as_float(logits, "logits") * scale[..., None])


@flax.struct.dataclass
class PNMLParams:
    """pNML's projector.

    Attributes:
      projector: ``[D, D]`` pseudo-inverse of the Gram matrix of the normalized training features.
    """

    projector: jax.Array


def fit_pnml(train_features: ArrayLike, train_labels: ArrayLike | None = None) -> PNMLParams:
    r"""Fits pNML's projector ``(X^T X)^+`` of the L2-normalized training features (float64).

    As pytorch-ood 0.4 ``detector/pnml.py`` (Bibas et al., NeurIPS 2021); labels ignored.
    """
    x = _train_features(train_features)
    _check_unused_labels(train_labels, x.shape[0])
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return PNMLParams(projector=jnp.asarray(np.linalg.pinv(x.T @ x), jnp.float32))


def pnml_score(
    params: PNMLParams,
    features: ArrayLike,
    head_kernel: ArrayLike,
    head_bias: ArrayLike | None = None,
    *,
    eps: float = 1e-12,
) -> jax.Array:
    r"""Negative normalized pNML regret of the single-layer pNML (Bibas et al., NeurIPS 2021).

    .. math:: \hat z = z / \lVert z \rVert, \quad p = \operatorname{softmax}(\hat z W + b),
        \quad g = \frac{\hat z^\top P \hat z}{1 + \hat z^\top P \hat z}, \quad
        s(x) = -\frac{1}{\log K} \log \sum_k \frac{p_k}{p_k + (1 - p_k) p_k^{g}}

    with ``P`` from :func:`fit_pnml` and ``p`` clamped to ``[eps, 1 - eps]``; the
    head is applied to the *normalized* features, as in pytorch-ood 0.4.

    Args:
      params: from :func:`fit_pnml`.
      features: ``[..., D]``.
      head_kernel: ``[D, K]``.
      head_bias: ``[K]`` or ``None``.
      eps: probability clamp.

    Returns:
      ``[...]`` float32 scores in ``[-1, 0]``.
    """
    z = l2_normalize(_score_features(features, params.projector.shape[0]))
    kernel, bias = _linear_head(z.shape[-1], head_kernel, head_bias)
    probs = jax.nn.softmax(jnp.matmul(z, kernel, precision=HIGHEST) + bias, axis=-1)
    probs = jnp.clip(probs, eps, 1.0 - eps)
    projected = jnp.sum(jnp.matmul(z, params.projector, precision=HIGHEST) * z, axis=-1)
    g = (projected / (1.0 + projected))[..., None]
    regret = jnp.log(jnp.sum(probs / (probs + (1.0 - probs) * probs**g), axis=-1))
    return -regret / jnp.log(float(probs.shape[-1]))
