"""Relative Mahalanobis distance (RMDS, Ren et al., 2021) on training features.

The ``fit_*`` / ``*_score`` contract and shapes are those of :mod:`ood_jax.scores.fitted`.
"""

from __future__ import annotations

import flax.struct
import jax
import numpy as np
from jax.typing import ArrayLike

from ood_jax.scores.gaussian import MahalanobisParams, fit_mahalanobis, mahalanobis_score

__all__ = ["RMDSParams", "fit_rmds", "rmds_score"]


@flax.struct.dataclass
class RMDSParams:
    """The class-conditional and the background Gaussian.

    Attributes:
      classes: class means with a tied covariance (:func:`fit_mahalanobis`).
      background: one Gaussian of all training features.
    """

    classes: MahalanobisParams
    background: MahalanobisParams


def fit_rmds(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    *,
    num_classes: int | None = None,
    shrinkage: float = 1e-6,
) -> RMDSParams:
    r"""Fits RMDS's class Gaussians and its background Gaussian.

    Both covariances are maximum-likelihood estimates (divided by ``N``, as
    sklearn's ``EmpiricalCovariance`` in OpenOOD v1.5 ``rmds_postprocessor.py``),
    with the relative ridge ``shrinkage`` of :mod:`ood_jax.scores.gaussian`.
    pytorch-ood 0.4 (``detector/rmd.py``) inverts the background's *unnormalized*
    scatter ``sum_i (z_i - mu)(z_i - mu)^T + 1e-6 I``, which scales the background
    distance by ``1/N`` and changes the ranking.

    Args:
      train_features: ``[N, D]``.
      train_labels: ``[N]`` integer labels covering every class.
      num_classes: number of classes; default ``max(train_labels) + 1``.
      shrinkage: ``>= 0`` relative ridge of both covariances.

    Returns:
      :class:`RMDSParams` for :func:`rmds_score`.
    """
    one_class = np.zeros(np.shape(train_features)[0], np.int64)
    return RMDSParams(
        classes=fit_mahalanobis(
            train_features, train_labels, num_classes=num_classes, shrinkage=shrinkage
        ),
        background=fit_mahalanobis(train_features, one_class, shrinkage=shrinkage),
    )


@jax.jit
def rmds_score(params: RMDSParams, features: ArrayLike) -> jax.Array:
    r"""Relative Mahalanobis distance score.

    .. math:: s(z) = \max_c \big( -d_c(z) + d_0(z) \big)
        = -\min_c d_c(z) + d_0(z)

    with ``d_c`` the squared Mahalanobis distance to class ``c`` (tied
    covariance) and ``d_0`` to the background Gaussian of all training features.

    Args:
      params: from :func:`fit_rmds`.
      features: ``[..., D]``.

    Returns:
      ``[...]`` float32 scores.
    """
    return mahalanobis_score(params.classes, features) - mahalanobis_score(
        params.background, features
    )
