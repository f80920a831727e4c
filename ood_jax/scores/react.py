"""ReAct (Sun et al., NeurIPS 2021): the energy score of logits from clipped features.

The ``fit_*`` / ``*_score`` contract and shapes are those of :mod:`ood_jax.scores.fitted`.
"""

from __future__ import annotations

import numbers

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ood_jax.scores.fitted import HIGHEST, _check_unused_labels, _train_features
from ood_jax.scores.logit import _as_float, _linear_head, energy

__all__ = ["ReActParams", "fit_react", "react_score"]


@flax.struct.dataclass
class ReActParams:
    """Fitted ReAct clipping threshold.

    Attributes:
      threshold: scalar ``c``; activations above it are clipped to it.
    """

    threshold: jax.Array


def fit_react(
    train_features: ArrayLike, train_labels: ArrayLike | None = None, *, percentile: float = 90.0
) -> ReActParams:
    r"""Chooses the ReAct clipping threshold (Sun et al., NeurIPS 2021).

    ``c`` is the ``percentile``-th percentile (NumPy's linear interpolation)
    of **all** entries of the training features, as in the authors' code.
    The paper uses ``p = 90`` for CIFAR and ImageNet.

    Args:
      train_features: ``[N, D]`` in-distribution penultimate activations.
      train_labels: ignored (uniform ``fit_*`` signature).
      percentile: in ``[0, 100]``.

    Returns:
      :class:`ReActParams` for :func:`react_score`.
    """
    if not isinstance(percentile, numbers.Real) or not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be a number in [0, 100], got {percentile!r}.")
    # float32 is exact enough for a percentile and halves the copy of [N, D] features.
    x = _train_features(train_features, np.float32)
    _check_unused_labels(train_labels, x.shape[0])
    return ReActParams(threshold=jnp.asarray(np.percentile(x, percentile), jnp.float32))


def react_score(
    params: ReActParams,
    features: ArrayLike,
    head_kernel: ArrayLike,
    head_bias: ArrayLike | None = None,
    *,
    temperature: ArrayLike = 1.0,
) -> jax.Array:
    r"""Energy score of the logits recomputed from clipped features (ReAct).

    .. math::
        s(z) = T \log \sum_k \exp\big( (\min(z, c) W + b)_k / T \big)

    Args:
      params: from :func:`fit_react`.
      features: ``[..., D]`` penultimate activations.
      head_kernel: ``[D, K]`` last-layer weight (``model.head.kernel``).
      head_bias: ``[K]`` last-layer bias or ``None``.
      temperature: ``T > 0`` of the energy score.

    Returns:
      ``[...]`` float32 scores.
    """
    z = _as_float(features, "features")
    kernel, bias = _linear_head(z.shape[-1], head_kernel, head_bias)
    clipped = jnp.minimum(z, params.threshold)
    logits = jnp.matmul(clipped, kernel, precision=HIGHEST) + bias
    return energy(logits, temperature=temperature)
