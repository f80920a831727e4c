"""OOD scores that need statistics fitted on in-distribution training features.

Each method is a pair: ``fit_*(train_features, train_labels, ...) -> params``
runs once on the host in float64 NumPy (it is *not* jit-able: it validates
labels and factorizes covariances; KNN and ReAct ignore the labels), and
``*_score(params, features, ...)`` is a pure JAX function, safe under
``jax.jit`` and ``jax.vmap``, returning one float32 value per example.
**Higher means more in-distribution** for every score. ``params`` are
``flax.struct`` dataclasses of arrays (pytrees), so they can be saved, sharded
or passed through ``jit``.

Shapes: ``train_features [N, D]``, ``train_labels [N]`` integer in
``[0, num_classes)``, scored ``features [..., D]`` -> scores ``[...]``.

Covariance regularization (Mahalanobis, GMM): a covariance ``S`` with
eigenvalues ``lambda_i`` is replaced by ``S + r I`` with the ridge
``r = shrinkage * trace(S) / D`` (``shrinkage`` times the mean eigenvalue;
``r = shrinkage`` when ``S = 0``). A singular ``S`` (a constant feature,
``D > N``, a class with one example) therefore gives finite scores: moving
along a direction never seen in training costs ``delta^2 / r``, a large but
finite distance. Factorizations are float64 Cholesky decompositions of
``S + r I`` (an eigendecomposition when ``r = 0``, with eigenvalues floored at
``D * eps * lambda_max`` as a pseudo-inverse would); the scorer applies a
whitening matrix ``L`` with ``L L^T = (S + r I)^{-1}`` so that a squared
Mahalanobis distance is a sum of squares (never negative). Matmuls use
``Precision.HIGHEST`` so accelerators do not silently round to bfloat16.
"""

from __future__ import annotations

import functools
import numbers
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ood_jax.losses import l2_normalize
from ood_jax.scores.logit import _as_float, _check_chunk_size, _linear_head, energy

__all__ = [
    "GMMParams",
    "KNNParams",
    "MahalanobisParams",
    "ReActParams",
    "fit_gmm",
    "fit_knn",
    "fit_mahalanobis",
    "fit_react",
    "gmm_score",
    "knn_score",
    "mahalanobis_score",
    "react_score",
]

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- checks


def _train_features(train_features: ArrayLike, dtype: type = np.float64) -> np.ndarray:
    x = np.asarray(train_features, dtype=dtype)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(
            f"train_features must be a non-empty 2-D array [num_examples, feature_dim], "
            f"got shape {x.shape}. Flatten or stack your features first."
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("train_features contains NaN or Inf; remove or fix those examples.")
    return x


def _train_labels(
    train_labels: ArrayLike, num_examples: int, num_classes: int | None
) -> tuple[np.ndarray, int]:
    """Validates labels and returns them with the number of classes."""
    labels = np.asarray(train_labels)
    if labels.shape != (num_examples,):
        raise ValueError(
            f"train_labels must have shape [{num_examples}] (one label per row of "
            f"train_features), got shape {labels.shape}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"train_labels must be integers, got dtype {labels.dtype}.")
    if labels.min() < 0:
        raise ValueError(
            "train_labels contains negative values (e.g. -1 for 'no label'); fit only on "
            "labelled in-distribution examples."
        )
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    elif labels.max() >= num_classes:
        raise ValueError(
            f"train_labels contains {int(labels.max())} but num_classes={num_classes}; "
            f"labels must lie in [0, num_classes)."
        )
    counts = np.bincount(labels, minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise ValueError(
            f"train_labels do not cover all {num_classes} classes: no examples for class(es) "
            f"{missing.tolist()[:20]}. Fit on a set with every class, or pass the right "
            f"num_classes."
        )
    return labels, num_classes


def _check_unused_labels(train_labels: ArrayLike | None, num_examples: int) -> None:
    """Catches ``fit_react(x, 95)``: a hyperparameter passed where the labels go."""
    if train_labels is not None and np.shape(train_labels) != (num_examples,):
        raise ValueError(
            f"train_labels (unused here) must be None or have shape [{num_examples}], got "
            f"{train_labels!r:.60}. Hyperparameters are keyword-only, e.g. percentile=95."
        )


def _check_shrinkage(shrinkage: float) -> None:
    if not isinstance(shrinkage, numbers.Real) or not shrinkage >= 0:
        raise ValueError(f"shrinkage must be a real number >= 0, got {shrinkage!r}.")


def _score_features(features: ArrayLike, feature_dim: int) -> jax.Array:
    """Upcasts ``features`` and checks their last axis against the fitted dimension."""
    z = _as_float(features, "features")
    if z.shape[-1] != feature_dim:
        raise ValueError(
            f"features have dimension {z.shape[-1]} (shape {z.shape}) but the params were "
            f"fitted on {feature_dim}-dimensional features; use the same layer's features."
        )
    return z


# --------------------------------------------------------------------------- linear algebra


def _regularized_whitener(cov: np.ndarray, shrinkage: float) -> tuple[np.ndarray, float]:
    """Returns ``(L, log det(S + r I))`` with ``L L^T = (S + r I)^{-1}``, in float64."""
    dim = cov.shape[0]
    mean_eig = float(np.trace(cov)) / dim
    ridge = shrinkage * mean_eig if mean_eig > 0 else shrinkage
    if ridge > 0:
        # S + rI = R R^T is positive definite, so L = R^{-T}; Cholesky + triangular
        # inverse is ~2x faster than eigh, which matters for one covariance per class.
        try:
            chol = np.linalg.cholesky(cov + ridge * np.eye(dim))
        except np.linalg.LinAlgError:
            pass  # ridge below rounding of a huge spectrum: fall through to eigh
        else:
            return np.linalg.inv(chol).T, 2.0 * float(np.sum(np.log(np.diag(chol))))
    eigvals, eigvecs = np.linalg.eigh(cov)
    # eigh of a PSD matrix can return tiny negative eigenvalues from rounding; the floor
    # (relative to the spectrum) keeps shrinkage=0 on a singular matrix finite.
    floor = max(float(eigvals.max()) * dim * np.finfo(np.float64).eps, 1e-300)
    regularized = np.maximum(np.clip(eigvals, 0.0, None) + ridge, floor)
    return eigvecs / np.sqrt(regularized), float(np.sum(np.log(regularized)))


def _class_means(x: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    # A loop of masked means is ~5x faster here than a one-hot matmul or np.add.at.
    return np.stack([x[labels == c].mean(axis=0) for c in range(num_classes)])


def _squared_distances(whitened: jax.Array, whitened_means: jax.Array) -> jax.Array:
    """``[C, ...]`` squared distances; a loop over classes keeps memory at one ``[..., D]``."""
    return jax.lax.map(lambda m: jnp.sum(jnp.square(whitened - m), axis=-1), whitened_means)


# --------------------------------------------------------------------------- Mahalanobis


@flax.struct.dataclass
class MahalanobisParams:
    """Fitted Mahalanobis statistics.

    Attributes:
      center: ``[D]`` mean of the class means; subtracted first to keep float32 accurate.
      whitener: ``[D, D]`` ``L`` with ``L L^T = Sigma_reg^{-1}``.
      whitened_means: ``[C, D]`` ``(mu_c - center) @ L``.
    """

    center: jax.Array
    whitener: jax.Array
    whitened_means: jax.Array


def fit_mahalanobis(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    *,
    num_classes: int | None = None,
    shrinkage: float = 1e-6,
) -> MahalanobisParams:
    r"""Fits class means and a shared (tied) covariance (Lee et al., NeurIPS 2018).

    .. math::
        \mu_c = \frac{1}{N_c} \sum_{y_i = c} z_i, \qquad
        \Sigma = \frac{1}{N} \sum_i (z_i - \mu_{y_i})(z_i - \mu_{y_i})^\top + r I

    (the maximum-likelihood covariance of the class-centered features, as the
    authors' ``EmpiricalCovariance`` fit), with the ridge ``r = shrinkage *
    trace / D`` of the module docstring. Host-side float64 NumPy; not jit-able.

    Args:
      train_features: ``[N, D]`` in-distribution training features.
      train_labels: ``[N]`` integer labels; every class in ``[0, num_classes)`` must occur.
      num_classes: number of classes; default ``max(train_labels) + 1``.
      shrinkage: ``>= 0`` relative ridge added to the covariance.

    Returns:
      :class:`MahalanobisParams` for :func:`mahalanobis_score`.
    """
    _check_shrinkage(shrinkage)
    x = _train_features(train_features)
    labels, num_classes = _train_labels(train_labels, x.shape[0], num_classes)
    means = _class_means(x, labels, num_classes)
    centered = x - means[labels]
    whitener, _ = _regularized_whitener(centered.T @ centered / x.shape[0], shrinkage)
    center = means.mean(axis=0)
    return MahalanobisParams(
        center=jnp.asarray(center, jnp.float32),
        whitener=jnp.asarray(whitener, jnp.float32),
        whitened_means=jnp.asarray((means - center) @ whitener, jnp.float32),
    )


@jax.jit
def mahalanobis_score(params: MahalanobisParams, features: ArrayLike) -> jax.Array:
    r"""Negative distance to the closest class mean (Lee et al., NeurIPS 2018).

    .. math:: s(z) = -\min_c (z - \mu_c)^\top \Sigma^{-1} (z - \mu_c)

    The paper's confidence score is ``max_c -(1/2) (...)``; the factor 1/2
    does not change any ranking metric. This is the plain (single-layer,
    no input preprocessing) variant used as a baseline in the energy and
    LogitNorm papers.

    Args:
      params: from :func:`fit_mahalanobis`.
      features: ``[..., D]``.

    Returns:
      ``[...]`` float32 scores (``<= 0``).
    """
    z = _score_features(features, params.whitener.shape[0])
    whitened = jnp.matmul(z - params.center, params.whitener, precision=_HIGHEST)
    return -jnp.min(_squared_distances(whitened, params.whitened_means), axis=0)


# --------------------------------------------------------------------------- GMM


@flax.struct.dataclass
class GMMParams:
    """Fitted class-conditional Gaussian mixture.

    Attributes:
      center: ``[D]`` mean of the class means (subtracted first).
      whiteners: ``[C, D, D]`` ``L_c`` with ``L_c L_c^T = Sigma_c^{-1}``.
      whitened_means: ``[C, D]`` ``(mu_c - center) @ L_c``.
      log_weights: ``[C]`` ``log pi_c - (D log(2 pi) + log det Sigma_c) / 2``.
    """

    center: jax.Array
    whiteners: jax.Array
    whitened_means: jax.Array
    log_weights: jax.Array


def fit_gmm(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    *,
    num_classes: int | None = None,
    shrinkage: float = 1e-6,
    priors: Literal["empirical", "uniform"] = "empirical",
) -> GMMParams:
    r"""Fits one full-covariance Gaussian per class (GDA of DDU, Mukhoti et al., CVPR 2023).

    .. math::
        \mu_c = \operatorname{mean}_{y_i = c} z_i, \qquad
        \Sigma_c = \frac{1}{N_c - 1} \sum_{y_i = c} (z_i - \mu_c)(z_i - \mu_c)^\top + r_c I,
        \qquad \pi_c = N_c / N

    The unbiased per-class covariance is the one DDU's code uses. DDU picks the
    smallest jitter from a list that makes a Cholesky factorization succeed;
    here the ridge is ``r_c = shrinkage * trace(Sigma_c) / D`` (module
    docstring), deterministic and scale-aware. A class with a single example
    gets ``Sigma_c = r_c I``.

    Priors: the DDU paper writes the density as ``sum_c q(z|c) q(c)`` with
    ``q(c)`` the class frequency (``priors="empirical"``, the default); DDU's
    released code drops the prior, which equals ``priors="uniform"`` up to the
    constant ``log C``. On a balanced training set both give the same ranking.
    Pearce et al. (2021) motivate this density as an epistemic-uncertainty score.

    Args:
      train_features: ``[N, D]`` in-distribution training features.
      train_labels: ``[N]`` integer labels; every class in ``[0, num_classes)`` must occur.
      num_classes: number of classes; default ``max(train_labels) + 1``.
      shrinkage: ``>= 0`` relative ridge added to each class covariance.
      priors: ``"empirical"`` (``pi_c = N_c / N``) or ``"uniform"`` (``pi_c = 1 / C``).

    Returns:
      :class:`GMMParams` for :func:`gmm_score`.
    """
    _check_shrinkage(shrinkage)
    if priors not in ("empirical", "uniform"):
        raise ValueError(f"priors must be 'empirical' or 'uniform', got {priors!r}.")
    x = _train_features(train_features)
    labels, num_classes = _train_labels(train_labels, x.shape[0], num_classes)
    dim = x.shape[1]
    means = _class_means(x, labels, num_classes)
    center = means.mean(axis=0)
    counts = np.bincount(labels, minlength=num_classes)
    log_priors = (
        np.log(counts / x.shape[0])
        if priors == "empirical"
        else np.full(num_classes, -np.log(num_classes))
    )
    # [C, D, D] dominates memory (C=100, D=2048: 1.7 GB), so it is stored in float32.
    whiteners = np.empty((num_classes, dim, dim), dtype=np.float32)
    whitened_means = np.empty((num_classes, dim))
    log_weights = np.empty(num_classes)
    for c in range(num_classes):
        centered = x[labels == c] - means[c]
        cov = centered.T @ centered / max(counts[c] - 1, 1)
        whitener, logdet = _regularized_whitener(cov, shrinkage)
        whiteners[c] = whitener
        whitened_means[c] = (means[c] - center) @ whitener
        log_weights[c] = log_priors[c] - 0.5 * (dim * np.log(2 * np.pi) + logdet)
    return GMMParams(
        center=jnp.asarray(center, jnp.float32),
        whiteners=jnp.asarray(whiteners, jnp.float32),
        whitened_means=jnp.asarray(whitened_means, jnp.float32),
        log_weights=jnp.asarray(log_weights, jnp.float32),
    )


@jax.jit
def gmm_score(params: GMMParams, features: ArrayLike) -> jax.Array:
    r"""Log density of the class-conditional Gaussian mixture (DDU's feature density).

    .. math:: s(z) = \log \sum_c \pi_c \, \mathcal{N}(z; \mu_c, \Sigma_c)

    Computed as a ``logsumexp`` over classes; one ``[..., D] x [D, D]`` matmul
    per class, looped so memory stays at one ``[..., D]`` block.

    Args:
      params: from :func:`fit_gmm`.
      features: ``[..., D]``.

    Returns:
      ``[...]`` float32 log densities.
    """
    z = _score_features(features, params.whiteners.shape[-1]) - params.center

    def class_log_density(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        whitener, whitened_mean, log_weight = args
        diff = jnp.matmul(z, whitener, precision=_HIGHEST) - whitened_mean
        return log_weight - 0.5 * jnp.sum(jnp.square(diff), axis=-1)

    per_class = jax.lax.map(
        class_log_density, (params.whiteners, params.whitened_means, params.log_weights)
    )
    return jax.nn.logsumexp(per_class, axis=0)


# --------------------------------------------------------------------------- KNN


@flax.struct.dataclass
class KNNParams:
    """Fitted KNN bank.

    Attributes:
      bank: ``[N, D]`` float32 L2-normalized training features.
    """

    bank: jax.Array


def fit_knn(train_features: ArrayLike, train_labels: ArrayLike | None = None) -> KNNParams:
    r"""Builds the normalized training bank for deep nearest neighbours (Sun et al., ICML 2022).

    .. math:: \hat z_i = z_i / \lVert z_i \rVert_2

    Labels are not used (the score is class-agnostic); the argument exists so
    every ``fit_*`` has the same call signature. Sun et al. use the whole
    CIFAR training set (50,000 features) as the bank.

    Args:
      train_features: ``[N, D]`` in-distribution training features.
      train_labels: ignored.

    Returns:
      :class:`KNNParams` for :func:`knn_score`.
    """
    x = _train_features(train_features, np.float32)
    _check_unused_labels(train_labels, x.shape[0])
    return KNNParams(bank=l2_normalize(jnp.asarray(x, jnp.float32)))


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def knn_score(
    params: KNNParams, features: ArrayLike, *, k: int = 50, chunk_size: int = 256
) -> jax.Array:
    r"""Negative distance to the k-th nearest training feature (Sun et al., ICML 2022).

    .. math:: s(z) = -\lVert \hat z - \hat z_{(k)} \rVert_2, \qquad \hat z = z / \lVert z \rVert_2

    where ``z_(k)`` is the k-th nearest normalized training feature.
    ``k = 50`` is the paper's CIFAR-10 choice (full training set as bank;
    ImageNet uses ``k = 1000``). The authors' Faiss code ranks by the squared
    distance, which gives the same ordering.

    Neighbours are ranked by cosine similarity (one ``[chunk, N]`` matmul and
    ``lax.top_k`` per chunk of ``chunk_size`` examples, so memory is
    ``O(chunk_size * N)``), then the k-th neighbour's distance is recomputed
    exactly from the difference vector (``sqrt(2 - 2 cos)`` loses precision for
    close neighbours).

    Args:
      params: from :func:`fit_knn`.
      features: ``[..., D]``.
      k: ``1 <= k <= N``, static.
      chunk_size: test examples per chunk, ``>= 1``, static.

    Returns:
      ``[...]`` float32 scores in ``[-2, 0]``.
    """
    bank = params.bank
    num_train = bank.shape[0]
    if not isinstance(k, numbers.Integral) or not 1 <= k <= num_train:
        raise ValueError(
            f"k must be an integer in [1, {num_train}] (the number of training features in "
            f"the bank), got {k!r}."
        )
    _check_chunk_size(chunk_size)
    z = _score_features(features, bank.shape[1])
    batch_shape = z.shape[:-1]
    queries = l2_normalize(z.reshape(-1, z.shape[-1]).astype(jnp.float32))

    def one(query: jax.Array) -> jax.Array:
        similarity = jnp.matmul(bank, query, precision=_HIGHEST)
        _, indices = jax.lax.top_k(similarity, k)
        return -jnp.linalg.norm(query - bank[indices[k - 1]])

    if queries.shape[0] == 0:
        return jnp.zeros(batch_shape, jnp.float32)
    scores = jax.lax.map(one, queries, batch_size=min(chunk_size, queries.shape[0]))
    return scores.reshape(batch_shape)


# --------------------------------------------------------------------------- ReAct


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
    logits = jnp.matmul(clipped, kernel, precision=_HIGHEST) + bias
    return energy(logits, temperature=temperature)
