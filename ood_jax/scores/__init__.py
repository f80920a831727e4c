"""Post-hoc OOD scores: one value per example, **higher = more in-distribution**.

- ``logit``: scores of logits or features alone (MSP, max logit, energy,
  negative entropy, feature norm).
- ``fitted``: what the scores fitted on training features share (``fit_*`` on
  training features + pure ``*_score``): ``gaussian`` (Mahalanobis,
  class-conditional GMM density), ``knn``, ``react``.
- ``model``: scores that need gradients (ODIN, GradNorm).
- ``shaping``: activation shaping (ASH-P/B/S, SCALE) of the features or of the
  feature map before pooling, and RankFeat (the models' ``capture=`` intermediates).
- ``registry``: every score by name, an instance of its kind (:class:`ArrayScore`,
  :class:`FittedScore`, :class:`ImageScore`, :class:`ActivationScore`) with its
  hyperparameters and display name; :func:`register_score` adds one (see that module).
- ``catalog``: the built-in scores' order (the report's), in which importing this
  package registers them.
"""

from ood_jax.scores import catalog  # noqa: F401  (registers the built-in scores, in catalog.ORDER)
from ood_jax.scores.bank import (
    NNGuideParams,
    RelationParams,
    fit_nnguide,
    fit_relation,
    nnguide_score,
    relation_score,
)
from ood_jax.scores.boundary import TrainMeanParams, fdbd_score, fit_train_mean, nci_score
from ood_jax.scores.clipping import VRAParams, dice_score, fit_vra, vra_score
from ood_jax.scores.dropout import mc_dropout
from ood_jax.scores.gaussian import (
    GMMParams,
    MahalanobisParams,
    fit_gmm,
    fit_mahalanobis,
    gmm_score,
    mahalanobis_score,
)
from ood_jax.scores.gram import GramParams, fit_gram, gram_score, gram_vectors
from ood_jax.scores.knn import KNNParams, fit_knn, knn_score
from ood_jax.scores.logit import (
    energy,
    feature_norm,
    max_logit,
    msp,
    neg_entropy,
    weighted_energy,
)
from ood_jax.scores.mds import mds_ensemble, preprocessed_mahalanobis
from ood_jax.scores.model import CIFAR10_STD, gradnorm, odin
from ood_jax.scores.openmax import OpenMaxParams, fit_openmax, openmax_score
from ood_jax.scores.posterior import (
    KLMatchingParams,
    TemperatureParams,
    fit_kl_matching,
    fit_temperature,
    gen_score,
    kl_matching_score,
    temperature_score,
)
from ood_jax.scores.react import ReActParams, fit_react, react_score
from ood_jax.scores.registry import (
    ActivationScore,
    ArrayScore,
    FittedScore,
    Head,
    ImageScore,
    ModelScore,
    Score,
    available_scores,
    check_score_names,
    get_score,
    merge_hparams,
    register_score,
    resolve_hparams,
)
from ood_jax.scores.rescaling import PNMLParams, fit_pnml, lts_score, pnml_score
from ood_jax.scores.rmds import RMDSParams, fit_rmds, rmds_score
from ood_jax.scores.shaping import ash_b, ash_p, ash_s, rank1_removed, scale
from ood_jax.scores.she import SHEParams, fit_she, she_score
from ood_jax.scores.vim import (
    ViMParams,
    ViMSubspace,
    fit_vim,
    residual_score,
    vim_score,
    vim_subspace,
)

__all__ = [
    "CIFAR10_STD",
    "GMMParams",
    "KNNParams",
    "MahalanobisParams",
    "Head",
    "ReActParams",
    "Score",
    "ArrayScore",
    "FittedScore",
    "ModelScore",
    "ImageScore",
    "ActivationScore",
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
    "weighted_energy",
    "react_score",
    "ash_b",
    "ash_p",
    "ash_s",
    "rank1_removed",
    "scale",
    "GramParams",
    "fit_gram",
    "gram_score",
    "gram_vectors",
    "mc_dropout",
    "mds_ensemble",
    "preprocessed_mahalanobis",
    "KLMatchingParams",
    "NNGuideParams",
    "OpenMaxParams",
    "PNMLParams",
    "RMDSParams",
    "RelationParams",
    "SHEParams",
    "TemperatureParams",
    "TrainMeanParams",
    "VRAParams",
    "ViMParams",
    "ViMSubspace",
    "dice_score",
    "fdbd_score",
    "fit_kl_matching",
    "fit_nnguide",
    "fit_openmax",
    "fit_pnml",
    "fit_relation",
    "fit_rmds",
    "fit_she",
    "fit_temperature",
    "fit_train_mean",
    "fit_vim",
    "fit_vra",
    "gen_score",
    "kl_matching_score",
    "lts_score",
    "nci_score",
    "nnguide_score",
    "openmax_score",
    "pnml_score",
    "relation_score",
    "residual_score",
    "rmds_score",
    "she_score",
    "temperature_score",
    "vim_score",
    "vim_subspace",
    "vra_score",
]
