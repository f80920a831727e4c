"""Scores of the last layer's geometry around the training mean: fDBD and NCI.

Both fit only the mean of the training features (the ``fit_*`` / ``*_score``
contract of :mod:`ood_jax.scores.fitted`) and read the head's weights at
scoring time.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ood_jax.scores.fitted import _check_unused_labels, _score_features, _train_features
from ood_jax.scores.logit import _as_float, _linear_head

__all__ = ["TrainMeanParams", "fdbd_score", "fit_train_mean", "nci_score"]


@flax.struct.dataclass
class TrainMeanParams:
    """Mean of the training features.

    Attributes:
      mean: ``[D]``.
    """

    mean: jax.Array


def fit_train_mean(
    train_features: ArrayLike, train_labels: ArrayLike | None = None
) -> TrainMeanParams:
    """The mean of the in-distribution training features (labels ignored), float64 on the host."""
    x = _train_features(train_features)
    _check_unused_labels(train_labels, x.shape[0])
    return TrainMeanParams(mean=jnp.asarray(x.mean(axis=0), jnp.float32))


def fdbd_score(
    params: TrainMeanParams,
    logits: ArrayLike,
    features: ArrayLike,
    head_kernel: ArrayLike,
    *,
    distance_as_normalizer: bool = True,
) -> jax.Array:
    r"""Feature distance to the decision boundaries (fDBD, Liu & Qin, ICML 2024).

    .. math:: s(z) = \frac{1}{\lVert z - \bar z \rVert}
        \sum_{c \ne \hat y} \frac{|f_{\hat y} - f_c|}{\lVert w_{\hat y} - w_c \rVert}

    with ``f`` the logits, ``hat y`` the predicted class, ``w_c`` the head's
    weight vector of class ``c`` and ``bar z`` the training mean; with
    ``distance_as_normalizer=False`` the denominator is ``||z||``. The paper
    averages over the ``K - 1`` classes (a constant factor). Default ``True``
    (OpenOOD v1.5 ``fdbd_postprocessor.py``, which also sweeps ``False``).

    Args:
      params: from :func:`fit_train_mean`.
      logits: ``[..., K]`` the model's logits.
      features: ``[..., D]`` penultimate features.
      head_kernel: ``[D, K]``.
      distance_as_normalizer: divide by ``||z - bar z||`` (else ``||z||``), static.

    Returns:
      ``[...]`` float32 scores (``>= 0``).
    """
    z = _score_features(features, params.mean.shape[0])
    f = _as_float(logits, "logits")
    kernel, _ = _linear_head(z.shape[-1], head_kernel, None)
    weights = kernel.T  # [K, D]
    gaps = jnp.linalg.norm(weights[:, None, :] - weights[None, :, :], axis=-1)
    gaps = jnp.where(jnp.eye(weights.shape[0], dtype=bool), 1.0, gaps)
    predicted = jnp.argmax(f, axis=-1)
    margins = jnp.abs(f - jnp.max(f, axis=-1, keepdims=True))
    distance = jnp.sum(margins / gaps[predicted], axis=-1)
    norm = jnp.linalg.norm(z - params.mean if distance_as_normalizer else z, axis=-1)
    return distance / norm


def nci_score(
    params: TrainMeanParams,
    logits: ArrayLike,
    features: ArrayLike,
    head_kernel: ArrayLike,
    *,
    alpha: ArrayLike = 1e-4,
) -> jax.Array:
    r"""Neural collapse inspired score (NCI, Liu & Qin, CVPR 2025).

    .. math:: s(z) = \frac{w_{\hat y}^\top (z - \bar z)}{\lVert z - \bar z \rVert}
        + \alpha \lVert z \rVert_1

    with ``hat y`` the predicted class, ``w_c`` the head's weight vector of
    class ``c`` and ``bar z`` the training mean. Default ``alpha = 1e-4``
    (OpenOOD v1.5 ``configs/postprocessors/nci.yml``; it sweeps
    ``[1e-4, 1e-3, 1e-2, 0.1]``).

    Args:
      params: from :func:`fit_train_mean`.
      logits: ``[..., K]`` the model's logits (for the prediction).
      features: ``[..., D]`` penultimate features.
      head_kernel: ``[D, K]``.
      alpha: weight of the L1 norm; may be traced (vmapped).

    Returns:
      ``[...]`` float32 scores.
    """
    z = _score_features(features, params.mean.shape[0])
    kernel, _ = _linear_head(z.shape[-1], head_kernel, None)
    predicted = jnp.argmax(_as_float(logits, "logits"), axis=-1)
    centered = z - params.mean
    projection = jnp.sum(kernel.T[predicted] * centered, axis=-1)
    return projection / jnp.linalg.norm(centered, axis=-1) + alpha * jnp.sum(jnp.abs(z), axis=-1)
