"""Registry entries of the scores of logits and features, ODIN, GradNorm and the fitted
Mahalanobis, KNN, GMM and ReAct (``SCORES``; :mod:`ood_jax.scores.catalog` registers
them, first in the report's order).

Grids: OpenOOD v1.5 ``configs/postprocessors/<name>.yml``, the ``postprocessor_sweep``
of the detectors it searches (``APS_mode: True``).
"""

from __future__ import annotations

import numpy as np

from ood_jax.losses import l2_normalize
from ood_jax.scores import gaussian, knn, react
from ood_jax.scores import logit as L
from ood_jax.scores import model as M
from ood_jax.scores.registry import ArrayScore, FittedScore, ImageScore


def _msp(logits, features, head, *, temperature):
    return L.msp(logits, temperature=temperature)


def _energy(logits, features, head, *, temperature):
    return L.energy(logits, temperature=temperature)


def _max_logit(logits, features, head):
    return L.max_logit(logits)


def _neg_entropy(logits, features, head):
    return L.neg_entropy(logits)


def _feature_norm(logits, features, head):
    return L.feature_norm(features)


def _odin(apply_logits, images, std, *, temperature, epsilon, max_examples):
    return M.odin(apply_logits, images, temperature=temperature, epsilon=epsilon, std=std)


def _gradnorm(logits, features, head, *, temperature):
    return M.gradnorm(features, head.kernel, head.bias, temperature=temperature)


def _fit_mahalanobis(logits, features, labels):
    return gaussian.fit_mahalanobis(features, labels)


def _mahalanobis(params, logits, features, head):
    return gaussian.mahalanobis_score(params, features)


def _fit_mahalanobis_l2(logits, features, labels):
    return gaussian.fit_mahalanobis(l2_normalize(features), labels)


def _mahalanobis_l2(params, logits, features, head):
    return gaussian.mahalanobis_score(params, l2_normalize(features))


def _fit_gmm_l2(logits, features, labels):
    return gaussian.fit_gmm(l2_normalize(features), labels)


def _gmm_l2(params, logits, features, head):
    return gaussian.gmm_score(params, l2_normalize(features))


def _fit_knn(logits, features, labels, *, k, max_train, seed):
    if max_train is not None and len(features) > max_train:
        keep = np.random.default_rng(seed).choice(len(features), max_train, replace=False)
        features = features[np.sort(keep)]
    return knn.fit_knn(features)


def _knn(params, logits, features, head, *, k, max_train, seed):
    return knn.knn_score(params, features, k=k)


def _fit_gmm(logits, features, labels):
    return gaussian.fit_gmm(features, labels)


def _gmm(params, logits, features, head):
    return gaussian.gmm_score(params, features)


def _fit_react(logits, features, labels, *, percentile):
    return react.fit_react(features, percentile=percentile)


def _react(params, logits, features, head, *, percentile):
    return react.react_score(params, features, head.kernel, head.bias)


_T = {"sweep": "temperature", "sweep_label": "T"}
SCORES = (
    ArrayScore("msp", _msp, "MSP", {"temperature": 1.0}, **_T),
    ArrayScore("max_logit", _max_logit, "MaxLogit"),
    ArrayScore("energy", _energy, "Energy", {"temperature": 1.0}, **_T),
    ArrayScore("neg_entropy", _neg_entropy, "NegEntropy"),
    ArrayScore("feature_norm", _feature_norm, "FeatureNorm"),
    ImageScore(
        "odin",
        _odin,
        "ODIN",
        {"temperature": 1000.0, "epsilon": 0.0014, "max_examples": None},
        grid={"temperature": (1.0, 10.0, 100.0, 1000.0), "epsilon": (0.0014, 0.0028)},
    ),
    # Its own jitted function inside (chunked lax.map); the temperature is validated.
    ArrayScore("gradnorm", _gradnorm, "GradNorm", {"temperature": 1.0}, jit=False),
    FittedScore("mahalanobis", _mahalanobis, "Mahalanobis", fit=_fit_mahalanobis, jit=False),
    FittedScore(
        "knn",
        _knn,
        "KNN",
        {"k": 50, "max_train": None, "seed": 0},
        fit=_fit_knn,
        jit=False,
        grid={"k": (50, 100, 200, 500, 1000)},
    ),
    FittedScore("gmm", _gmm, "GMM", fit=_fit_gmm, jit=False),
    # The density scores on unit-length features z / ||z||: the class-conditional
    # Gaussians then model directions only, not the feature norm.
    FittedScore(
        "mahalanobis_l2", _mahalanobis_l2, "Mahalanobis (L2)", fit=_fit_mahalanobis_l2, jit=False
    ),
    FittedScore("gmm_l2", _gmm_l2, "GMM (L2)", fit=_fit_gmm_l2, jit=False),
    FittedScore(
        "react",
        _react,
        "ReAct",
        {"percentile": 90.0},
        fit=_fit_react,
        jit=False,
        grid={"percentile": (85.0, 90.0, 95.0, 99.0)},
    ),
)
