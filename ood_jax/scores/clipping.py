"""Energy of a pruned last layer: DICE (sparsified weights) and VRA (clipped activations).

The ``fit_*`` / ``*_score`` contract and shapes are those of :mod:`ood_jax.scores.fitted`.
"""

from __future__ import annotations

import numbers

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ood_jax.scores.boundary import TrainMeanParams
from ood_jax.scores.fitted import HIGHEST, _check_unused_labels, _train_features
from ood_jax.scores.logit import _as_float, _linear_head, energy

__all__ = ["VRAParams", "dice_score", "fit_vra", "vra_score"]


def dice_score(
    params: TrainMeanParams,
    features: ArrayLike,
    head_kernel: ArrayLike,
    head_bias: ArrayLike | None = None,
    *,
    percentile: ArrayLike = 90.0,
) -> jax.Array:
    r"""Energy of the logits of a sparsified head (DICE, Sun & Li, ECCV 2022).

    .. math:: c_{dk} = \bar z_d W_{dk}, \qquad
        \tilde W = W \odot [c > \mathrm{percentile}_p(c)], \qquad
        s(z) = \log \sum_k e^{(z \tilde W + b)_k}

    with ``bar z`` the training mean (:func:`ood_jax.scores.fit_train_mean`)
    and the percentile taken over all ``D x K`` contributions (NumPy's linear
    interpolation). Default ``p = 90`` (OpenOOD v1.5
    ``configs/postprocessors/dice.yml``; pytorch-ood 0.4 ``detector/dice.py``
    has no default).

    Args:
      params: from :func:`ood_jax.scores.fit_train_mean`.
      features: ``[..., D]``.
      head_kernel: ``[D, K]``.
      head_bias: ``[K]`` or ``None``.
      percentile: ``p`` in ``[0, 100]``; may be traced (vmapped).

    Returns:
      ``[...]`` float32 scores.
    """
    z = _as_float(features, "features")
    kernel, bias = _linear_head(z.shape[-1], head_kernel, head_bias)
    contribution = params.mean[:, None] * kernel
    masked = jnp.where(contribution > jnp.percentile(contribution, percentile), kernel, 0.0)
    return energy(jnp.matmul(z, masked, precision=HIGHEST) + bias)


@flax.struct.dataclass
class VRAParams:
    """VRA's activation bounds.

    Attributes:
      low: scalar lower clipping bound.
      high: scalar upper clipping bound.
    """

    low: jax.Array
    high: jax.Array


def fit_vra(
    train_features: ArrayLike,
    train_labels: ArrayLike | None = None,
    *,
    percentile_low: float = 10.0,
    percentile_high: float = 90.0,
) -> VRAParams:
    """VRA's bounds: percentiles of all training activations (labels ignored).

    Defaults ``10`` and ``90`` (OpenOOD v1.5 ``configs/postprocessors/vra.yml``).
    """
    for name, value in (("percentile_low", percentile_low), ("percentile_high", percentile_high)):
        if not isinstance(value, numbers.Real) or not 0 <= value <= 100:
            raise ValueError(f"{name} must be a number in [0, 100], got {value!r}.")
    x = _train_features(train_features, np.float32)
    _check_unused_labels(train_labels, x.shape[0])
    low, high = np.percentile(x, [percentile_low, percentile_high])
    return VRAParams(low=jnp.asarray(low, jnp.float32), high=jnp.asarray(high, jnp.float32))


def vra_score(
    params: VRAParams,
    features: ArrayLike,
    head_kernel: ArrayLike,
    head_bias: ArrayLike | None = None,
) -> jax.Array:
    r"""Energy of the logits of clipped activations (VRA, OpenOOD v1.5 ``vra_postprocessor.py``).

    .. math:: s(z) = \log \sum_k e^{(\operatorname{clip}(z, l, h) W + b)_k}

    This is OpenOOD's VRA: clipping to ``[l, h]``. The paper's VRA-P
    (Xu et al., NeurIPS 2023) sets activations below ``l`` to zero instead of
    to ``l``; that variant is not implemented.

    Args:
      params: from :func:`fit_vra`.
      features: ``[..., D]``.
      head_kernel: ``[D, K]``.
      head_bias: ``[K]`` or ``None``.

    Returns:
      ``[...]`` float32 scores.
    """
    z = _as_float(features, "features")
    kernel, bias = _linear_head(z.shape[-1], head_kernel, head_bias)
    clipped = jnp.clip(z, params.low, params.high)
    return energy(jnp.matmul(clipped, kernel, precision=HIGHEST) + bias)
