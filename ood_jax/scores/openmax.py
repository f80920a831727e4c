"""OpenMax (Bendale & Boult, CVPR 2016): extreme-value recalibration of the logits.

The ``fit_*`` / ``*_score`` contract of :mod:`ood_jax.scores.fitted`, on logits.
Defaults and recipe are pytorch-ood 0.4's (``detector/openmax/numpy.py`` with its
scipy Weibull fit ``libnotmr.py``, checked there against libMR).
"""

from __future__ import annotations

import functools
import numbers

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from jax.typing import ArrayLike

from ood_jax.scores.fitted import HIGHEST, _labels_below, _train_features
from ood_jax.scores.logit import _as_float

__all__ = ["OpenMaxParams", "fit_openmax", "openmax_score"]

# libMR shifts every tail by this constant before the Weibull fit (kept by pytorch-ood).
_TRANSLATION = 10000.0
# pytorch-ood caps the revised activations before exp.
_MAX_ACTIVATION = 709.0


@flax.struct.dataclass
class OpenMaxParams:
    """Class means of the logits and a Weibull model of each class's largest distances.

    Attributes:
      centers: ``[K, K]`` mean logit vector of each class.
      shape: ``[K]`` Weibull shapes ``c``.
      scale: ``[K]`` Weibull scales.
      offset: ``[K]`` ``translation - min(tail) - scale`` (float64 on the host): the CDF
        is evaluated as ``(d + offset) / scale`` through ``log1p``, since ``d + 10000``
        in float32 would round away the distances' differences.
      euclid_weight: scalar weight of the Euclidean distance (``1 -`` it weighs the cosine one).
      fitted: ``[K]`` bool, whether the class had the two training examples a tail needs.
    """

    centers: jax.Array
    shape: jax.Array
    scale: jax.Array
    offset: jax.Array
    euclid_weight: jax.Array
    fitted: jax.Array


def _distances(x: ArrayLike, centers: ArrayLike, euclid_weight: float, xp=jnp):
    """``[..., K]`` OpenMax distances of logits ``x`` to every class center."""
    euclid = xp.linalg.norm(x[..., None, :] - centers, axis=-1)
    products = x @ centers.T if xp is np else jnp.matmul(x, centers.T, precision=HIGHEST)
    cosine = 1.0 - products / (
        xp.linalg.norm(x, axis=-1, keepdims=True) * xp.linalg.norm(centers, axis=-1)
    )
    return euclid_weight * euclid + (1.0 - euclid_weight) * cosine


def fit_openmax(
    train_logits: ArrayLike,
    train_labels: ArrayLike,
    *,
    tailsize: int = 25,
    euclid_weight: float = 1.0,
) -> OpenMaxParams:
    r"""Fits OpenMax's class centers and Weibull tails (host, scipy).

    For each class ``c``: ``mu_c`` the mean logit vector of its training examples,
    ``d_i`` their distances to it (``euclid_weight * ||f - mu_c|| + (1 -
    euclid_weight) * cosine distance``), and a two-parameter Weibull (location 0)
    fitted by maximum likelihood to the ``tailsize`` largest ``d_i``, each
    shifted by ``10000 - min(tail)`` as libMR does. Defaults ``tailsize = 25``,
    ``euclid_weight = 1`` (pytorch-ood 0.4); OpenOOD v1.5 uses libMR with a tail
    of 20 on the correctly classified examples only.

    Args:
      train_logits: ``[N, K]``.
      train_labels: ``[N]`` integer labels; a class with fewer than two examples gets no
        Weibull model and its ``w_c = 1`` (pytorch-ood leaves it out, with the same effect).
      tailsize: ``>= 2`` largest distances per class to fit.
      euclid_weight: in ``[0, 1]``.

    Returns:
      :class:`OpenMaxParams` for :func:`openmax_score`.
    """
    if not isinstance(tailsize, numbers.Integral) or tailsize < 2:
        raise ValueError(f"tailsize must be an integer >= 2, got {tailsize!r}.")
    if not isinstance(euclid_weight, numbers.Real) or not 0 <= euclid_weight <= 1:
        raise ValueError(f"euclid_weight must be in [0, 1], got {euclid_weight!r}.")
    f = _train_features(train_logits)
    labels = _labels_below(train_labels, f.shape[0], f.shape[1])
    num_classes = f.shape[1]
    fitted = np.bincount(labels, minlength=num_classes) >= 2
    centers = np.ones((num_classes, num_classes))  # (unused where not fitted)
    shape, scale, shift = np.ones(num_classes), np.ones(num_classes), np.zeros(num_classes)
    for c in np.flatnonzero(fitted):
        centers[c] = f[labels == c].mean(axis=0)
        dists = _distances(f[labels == c], centers[c : c + 1], euclid_weight, xp=np)[:, 0]
        tail = np.sort(dists)[-tailsize:]
        shift[c] = _TRANSLATION - tail.min()
        _, shape[c], _, scale[c] = scipy.stats.exponweib.fit(tail + shift[c], floc=0, f0=1)
    as32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return OpenMaxParams(
        centers=as32(centers),
        shape=as32(shape),
        scale=as32(scale),
        offset=as32(shift - scale),
        euclid_weight=as32(euclid_weight),
        fitted=jnp.asarray(fitted),
    )


@functools.partial(jax.jit, static_argnames=("alpha",))
def openmax_score(params: OpenMaxParams, logits: ArrayLike, *, alpha: int = 10) -> jax.Array:
    r"""Minus OpenMax's probability of the unknown class.

    With ``w_c = 1 - exp(-((d_c + shift_c) / scale_c)^{shape_c})`` the Weibull CDF of the
    distance to class ``c`` and ``r_c = (alpha + 1 - rank_c) / alpha`` for the
    ``alpha`` largest logits (0 for the others):

    .. math:: \hat f_c = f_c (1 - w_c r_c), \qquad \hat f_0 = \sum_c f_c w_c r_c, \qquad
        s(x) = -\operatorname{softmax}(\min(\hat f, 709))_0

    Default ``alpha = 10`` (pytorch-ood 0.4; ``min(alpha, K)``). pytorch-ood
    computes the distance to a class only if some example *of the same batch*
    predicts it (0 otherwise); here every distance is computed.

    Args:
      params: from :func:`fit_openmax`.
      logits: ``[..., K]``.
      alpha: number of top classes revised, ``>= 1``, static.

    Returns:
      ``[...]`` float32 scores in ``[-1, 0]``.
    """
    if not isinstance(alpha, numbers.Integral) or alpha < 1:
        raise ValueError(f"alpha must be a positive integer, got {alpha!r}.")
    f = _as_float(logits, "logits")
    alpha = min(alpha, f.shape[-1])
    dists = _distances(f, params.centers, params.euclid_weight)
    # ((d + shift) / scale)^c = exp(c log1p((d + shift - scale) / scale)).
    log_ratio = jnp.log1p(jnp.maximum((dists + params.offset) / params.scale, -1.0))
    weibull = 1.0 - jnp.exp(-jnp.exp(params.shape * log_ratio))
    # As pytorch-ood: a class without a Weibull model counts as fully unknown (w = 1).
    weibull = jnp.where(params.fitted, weibull, 1.0)
    _, top = jax.lax.top_k(f, alpha)
    rank_weights = (alpha - jnp.arange(alpha, dtype=f.dtype)) / alpha
    ranked = jnp.sum(jax.nn.one_hot(top, f.shape[-1], dtype=f.dtype) * rank_weights[:, None], -2)
    revised = f * (1.0 - weibull * ranked)
    unknown = jnp.sum(f * weibull * ranked, axis=-1, keepdims=True)
    activations = jnp.minimum(jnp.concatenate([unknown, revised], axis=-1), _MAX_ACTIVATION)
    return -jax.nn.softmax(activations, axis=-1)[..., 0]
