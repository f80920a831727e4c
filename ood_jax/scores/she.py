"""Simplified Hopfield energy (SHE, Zhang et al., ICLR 2023): similarity to a class pattern.

The ``fit_*`` / ``*_score`` contract and shapes are those of :mod:`ood_jax.scores.fitted`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ood_jax.scores.fitted import _labels_below, _score_features, _train_features
from ood_jax.scores.logit import _as_float

__all__ = ["SHEParams", "fit_she", "she_score"]


@flax.struct.dataclass
class SHEParams:
    """Stored patterns.

    Attributes:
      patterns: ``[K, D]`` mean training feature of each class's correctly classified
        examples (zeros for a class with none).
    """

    patterns: jax.Array


def fit_she(
    train_logits: ArrayLike, train_features: ArrayLike, train_labels: ArrayLike
) -> SHEParams:
    r"""Stores SHE's class patterns.

    .. math:: m_c = \operatorname{mean} \{ z_i : y_i = c = \arg\max_k f_k(x_i) \}

    As OpenOOD v1.5 (``she_postprocessor.py``) and pytorch-ood 0.4
    (``detector/she.py``), on the training set; a class without a correctly
    classified example gets a zero pattern (the references' mean would be NaN).

    Args:
      train_logits: ``[N, K]``.
      train_features: ``[N, D]``.
      train_labels: ``[N]`` integer labels.

    Returns:
      :class:`SHEParams` for :func:`she_score`.
    """
    x = _train_features(train_features)
    f = _train_features(train_logits)
    labels = _labels_below(train_labels, x.shape[0], f.shape[1])
    correct = f.argmax(axis=1) == labels
    patterns = np.zeros((f.shape[1], x.shape[1]))
    for c in range(f.shape[1]):
        members = x[correct & (labels == c)]
        if len(members):
            patterns[c] = members.mean(axis=0)
    return SHEParams(patterns=jnp.asarray(patterns, jnp.float32))


@jax.jit
def she_score(params: SHEParams, logits: ArrayLike, features: ArrayLike) -> jax.Array:
    r"""Inner product of the features with the predicted class's pattern.

    .. math:: s(z) = z^\top m_{\hat y}, \qquad \hat y = \arg\max_k f_k(x)

    OpenOOD's default metric (``inner_product``); pytorch-ood returns its negative
    as an outlier score.

    Args:
      params: from :func:`fit_she`.
      logits: ``[..., K]``.
      features: ``[..., D]``.

    Returns:
      ``[...]`` float32 scores.
    """
    z = _score_features(features, params.patterns.shape[1])
    predicted = jnp.argmax(_as_float(logits, "logits"), axis=-1)
    return jnp.sum(z * params.patterns[predicted], axis=-1)
