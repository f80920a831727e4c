"""Post-hoc OOD scores: one value per example, **higher = more in-distribution**.

- ``logit``: scores of logits or features alone (MSP, max logit, energy,
  negative entropy, feature norm).
- ``fitted``: what the scores fitted on training features share (``fit_*`` on
  training features + pure ``*_score``): ``gaussian`` (Mahalanobis,
  class-conditional GMM density), ``knn``, ``react``.
- ``model``: scores that need gradients (ODIN, GradNorm).
- ``shaping``: activation shaping (ASH-P/B/S, SCALE) of the features or of the
  feature map before pooling, and RankFeat (the models' ``capture=`` intermediates).
- ``registry``: every score by name with what it consumes, its hyperparameters
  and display name; :func:`register_score` adds one (see that module).
"""

from ood_jax.scores.gaussian import (
    GMMParams,
    MahalanobisParams,
    fit_gmm,
    fit_mahalanobis,
    gmm_score,
    mahalanobis_score,
)
from ood_jax.scores.knn import KNNParams, fit_knn, knn_score
from ood_jax.scores.logit import energy, feature_norm, max_logit, msp, neg_entropy
from ood_jax.scores.model import CIFAR10_STD, gradnorm, odin
from ood_jax.scores.react import ReActParams, fit_react, react_score
from ood_jax.scores.registry import (
    Head,
    Score,
    available_scores,
    check_score_names,
    get_score,
    merge_hparams,
    register_score,
    resolve_hparams,
)
from ood_jax.scores.shaping import ash_b, ash_p, ash_s, rank1_removed, scale

__all__ = [
    "CIFAR10_STD",
    "GMMParams",
    "KNNParams",
    "MahalanobisParams",
    "Head",
    "ReActParams",
    "Score",
    "available_scores",
    "check_score_names",
    "get_score",
    "merge_hparams",
    "register_score",
    "resolve_hparams",
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
    "ash_b",
    "ash_p",
    "ash_s",
    "rank1_removed",
    "scale",
]
