"""Post-hoc OOD scores: one value per example, **higher = more in-distribution**.

- ``logit``: scores of logits or features alone (MSP, max logit, energy,
  negative entropy, feature norm).
- ``fitted``: ``fit_*`` on training features + pure ``*_score`` (Mahalanobis,
  KNN, class-conditional GMM density, ReAct).
- ``model``: scores that need gradients (ODIN, GradNorm).
"""

from ood_jax.scores.fitted import (
    GMMParams,
    KNNParams,
    MahalanobisParams,
    ReActParams,
    fit_gmm,
    fit_knn,
    fit_mahalanobis,
    fit_react,
    gmm_score,
    knn_score,
    mahalanobis_score,
    react_score,
)
from ood_jax.scores.logit import energy, feature_norm, max_logit, msp, neg_entropy
from ood_jax.scores.model import CIFAR10_STD, gradnorm, odin

__all__ = [
    "CIFAR10_STD",
    "GMMParams",
    "KNNParams",
    "MahalanobisParams",
    "ReActParams",
    "energy",
    "feature_norm",
    "fit_gmm",
    "fit_knn",
    "fit_mahalanobis",
    "fit_react",
    "gmm_score",
    "gradnorm",
    "knn_score",
    "mahalanobis_score",
    "max_logit",
    "msp",
    "neg_entropy",
    "odin",
    "react_score",
]
