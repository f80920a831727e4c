"""Fitted scores (Mahalanobis, KNN, GMM, ReAct) against float64 NumPy / SciPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from ood_jax import scores


def _clusters(seed=0, num_classes=3, per_class=40, dim=4):
    """Well-separated Gaussian blobs with distinct, well-conditioned covariances."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(num_classes, dim))
    features, labels = [], []
    for c in range(num_classes):
        mixing = np.eye(dim) + 0.3 * rng.normal(size=(dim, dim))
        features.append(centers[c] + rng.normal(size=(per_class, dim)) @ mixing)
        labels.append(np.full(per_class, c))
    return np.concatenate(features), np.concatenate(labels), centers


def _ridge(cov, shrinkage):
    return cov + shrinkage * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])


# ----------------------------------------------------------------------------- Mahalanobis


def test_mahalanobis_matches_numpy_inverse():
    x, y, _ = _clusters()
    test = np.random.default_rng(1).normal(scale=5.0, size=(9, 4))
    params = scores.fit_mahalanobis(x.astype(np.float32), y, shrinkage=0.0)
    # Tied covariance: every example minus its own class mean, divided by N (MLE).
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    residual = np.concatenate([x[y == c] - means[c] for c in range(3)])
    precision = np.linalg.inv(residual.T @ residual / len(x))
    dists = np.array([[(t - m) @ precision @ (t - m) for m in means] for t in test])
    got = jax.jit(scores.mahalanobis_score)(params, test.astype(np.float32))
    np.testing.assert_allclose(got, -dists.min(1), rtol=1e-4)


def test_mahalanobis_shrinkage_is_the_documented_ridge():
    x, y, _ = _clusters(seed=2)
    test = np.random.default_rng(3).normal(size=(5, 4))
    params = scores.fit_mahalanobis(x, y, shrinkage=0.5)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    residual = x - means[y]
    precision = np.linalg.inv(_ridge(residual.T @ residual / len(x), 0.5))
    expected = -np.min([[(t - m) @ precision @ (t - m) for m in means] for t in test], axis=1)
    np.testing.assert_allclose(scores.mahalanobis_score(params, test), expected, rtol=1e-4)


def test_mahalanobis_singular_covariance_is_finite():
    x, y, _ = _clusters(per_class=2, dim=4)
    # A constant feature and D > N per class: the covariance is singular.
    x = np.concatenate([x, np.full((len(x), 1), 7.0), x[:, :1] * 2.0], axis=1)
    params = scores.fit_mahalanobis(x, y)
    test = np.random.default_rng(4).normal(size=(6, 6)) * 10
    out = scores.mahalanobis_score(params, test)
    assert np.all(np.isfinite(out))
    # The training points themselves stay close to their class.
    assert np.all(scores.mahalanobis_score(params, x) > out.max())


# ----------------------------------------------------------------------------- GMM


@pytest.mark.parametrize("priors,shrinkage", [("empirical", 1e-3), ("uniform", 0.0)])
def test_gmm_matches_scipy_logpdf(priors, shrinkage):
    x, y, _ = _clusters(seed=5, per_class=30)
    keep = np.ones(len(y), bool)
    keep[:10] = False  # unbalanced classes so the priors matter
    x, y = x[keep], y[keep]
    params = scores.fit_gmm(x.astype(np.float32), y, shrinkage=shrinkage, priors=priors)
    test = np.random.default_rng(6).normal(scale=4.0, size=(8, 4))
    counts = np.bincount(y)
    weights = counts / counts.sum() if priors == "empirical" else np.full(3, 1 / 3)
    log_terms = []
    for c in range(3):
        cov = _ridge(np.cov(x[y == c], rowvar=False), shrinkage)  # np.cov: 1 / (N_c - 1)
        log_terms.append(
            np.log(weights[c]) + multivariate_normal.logpdf(test, x[y == c].mean(0), cov)
        )
    log_terms = np.stack(log_terms)
    top = log_terms.max(0)
    expected = top + np.log(np.exp(log_terms - top).sum(0))
    got = jax.jit(scores.gmm_score)(params, test.astype(np.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_gmm_singular_covariance_is_finite():
    x, y, _ = _clusters(per_class=3, dim=5)
    x[:, 2] = 1.0  # constant feature
    y[0] = 3  # a class with a single example
    params = scores.fit_gmm(x, y)
    out = scores.gmm_score(params, np.random.default_rng(7).normal(size=(4, 5)))
    assert np.all(np.isfinite(out))


# ----------------------------------------------------------------------------- KNN


def _brute_force_knn(train, test, k):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    dists = np.sqrt(((test[:, None, :] - train[None, :, :]) ** 2).sum(-1))
    return -np.sort(dists, axis=1)[:, k - 1]


@pytest.mark.parametrize("k,chunk_size", [(1, 4), (5, 3), (50, 256)])
def test_knn_matches_brute_force_sort(k, chunk_size):
    rng = np.random.default_rng(8)
    train = rng.normal(size=(120, 8))
    test = rng.normal(size=(11, 8))
    params = scores.fit_knn(train)
    np.testing.assert_allclose(np.linalg.norm(params.bank, axis=1), np.ones(120), rtol=1e-6)
    score_fn = jax.jit(scores.knn_score, static_argnames=("k", "chunk_size"))
    got = score_fn(params, test.astype(np.float32), k=k, chunk_size=chunk_size)
    np.testing.assert_allclose(got, _brute_force_knn(train, test, k), rtol=1e-5, atol=1e-6)


def test_knn_close_neighbours_keep_precision():
    rng = np.random.default_rng(9)
    train = rng.normal(size=(30, 16))
    test = train[:5] + 1e-4 * rng.normal(size=(5, 16))  # 1-NN distance ~ 1e-4
    got = scores.knn_score(scores.fit_knn(train), test, k=1)
    np.testing.assert_allclose(got, _brute_force_knn(train, test, 1), rtol=1e-2)


# ----------------------------------------------------------------------------- ReAct


def test_react_matches_hand_computation():
    train = np.arange(10, dtype=np.float64).reshape(5, 2)  # entries 0..9
    params = scores.fit_react(train, percentile=90)
    # 90th percentile of 0..9 with linear interpolation: 0.9 * 9 = 8.1.
    np.testing.assert_allclose(params.threshold, 8.1, rtol=1e-6)
    z = np.array([[1.0, 20.0], [9.0, -3.0]])
    w = np.array([[1.0, -1.0, 0.5], [0.2, 0.0, 1.0]])
    b = np.array([0.1, 0.0, -0.2])
    clipped = np.array([[1.0, 8.1], [8.1, -3.0]])
    logits = clipped @ w + b
    for t in (1.0, 2.0):
        expected = t * np.log(np.exp(logits / t).sum(1))
        got = scores.react_score(params, z, w, b, temperature=t)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    # percentile 100 keeps everything: plain energy of z W (no bias).
    full = scores.fit_react(train, percentile=100)
    np.testing.assert_allclose(
        scores.react_score(full, z[:1] / 4, w), np.log(np.exp(z[:1] / 4 @ w).sum(1)), rtol=1e-5
    )


# ----------------------------------------------------------------------------- all scores


def test_in_class_clusters_score_higher_than_far_points():
    x, y, centers = _clusters(seed=10, per_class=60, dim=6)
    rng = np.random.default_rng(11)
    id_test = centers[rng.integers(0, 3, 50)] + rng.normal(size=(50, 6))
    # Far-away points in new directions (different angles too, for the cosine-based KNN).
    ood_test = (
        rng.normal(size=(50, 6)) * 3 - 3 * centers.mean(0) + 20 * rng.choice([-1, 1], (50, 6))
    )
    fitted = {
        "mahalanobis": (scores.mahalanobis_score, scores.fit_mahalanobis(x, y)),
        "gmm": (scores.gmm_score, scores.fit_gmm(x, y)),
        "knn": (lambda p, f: scores.knn_score(p, f, k=10), scores.fit_knn(x)),
    }
    for name, (score_fn, params) in fitted.items():
        id_scores, ood_scores = score_fn(params, id_test), score_fn(params, ood_test)
        auroc = np.mean(np.asarray(id_scores)[:, None] > np.asarray(ood_scores)[None, :])
        assert auroc > 0.95, (name, auroc)


def test_scores_are_vmappable_and_keep_leading_axes():
    x, y, _ = _clusters(per_class=10)
    test = jnp.asarray(np.random.default_rng(12).normal(size=(2, 3, 4)), jnp.float32)
    for score_fn, params in (
        (scores.mahalanobis_score, scores.fit_mahalanobis(x, y)),
        (scores.gmm_score, scores.fit_gmm(x, y)),
        (lambda p, f: scores.knn_score(p, f, k=3, chunk_size=2), scores.fit_knn(x)),
    ):
        flat = score_fn(params, test.reshape(6, 4))
        # bfloat16 features are upcast: same scores as the float32 copy of the same values.
        rounded = test.astype(jnp.bfloat16)
        np.testing.assert_allclose(
            score_fn(params, rounded), score_fn(params, rounded.astype(jnp.float32)), rtol=1e-6
        )
        np.testing.assert_allclose(score_fn(params, test), flat.reshape(2, 3), rtol=1e-6)
        np.testing.assert_allclose(
            jax.vmap(lambda f, p=params, s=score_fn: s(p, f))(test), flat.reshape(2, 3), rtol=1e-6
        )


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
    x, y, _ = _clusters(per_class=5)
    with pytest.raises(ValueError, match="do not cover all 4 classes.*\\[3\\]"):
        scores.fit_mahalanobis(x, y, num_classes=4)
    with pytest.raises(ValueError, match="do not cover.*\\[1\\]"):
        scores.fit_gmm(x[y != 1], np.where(y[y != 1] == 2, 2, 0))
    with pytest.raises(ValueError, match="negative"):
        scores.fit_gmm(x, np.where(y == 0, -1, y))
    with pytest.raises(ValueError, match="train_labels must have shape"):
        scores.fit_mahalanobis(x, y[:-1])
    with pytest.raises(ValueError, match="2-D"):
        scores.fit_knn(x[0])
    with pytest.raises(ValueError, match="NaN"):
        scores.fit_knn(np.where(x > 0, np.nan, x))
    with pytest.raises(ValueError, match="priors"):
        scores.fit_gmm(x, y, priors="learned")
    with pytest.raises(ValueError, match="shrinkage"):
        scores.fit_mahalanobis(x, y, shrinkage=-1.0)
    with pytest.raises(ValueError, match="percentile"):
        scores.fit_react(x, percentile=101)
    with pytest.raises(ValueError, match="keyword-only"):
        scores.fit_react(x, 95)
    with pytest.raises(ValueError, match="keyword-only"):
        scores.fit_knn(x, y[:3])
    wrong_dim = np.ones((3, 5), np.float32)
    with pytest.raises(ValueError, match="dimension 5.*fitted on 4"):
        scores.mahalanobis_score(scores.fit_mahalanobis(x, y), wrong_dim)
    with pytest.raises(ValueError, match="dimension 5.*fitted on 4"):
        scores.gmm_score(scores.fit_gmm(x, y), wrong_dim)
    with pytest.raises(ValueError, match="dimension 5.*fitted on 4"):
        scores.knn_score(scores.fit_knn(x), wrong_dim, k=1)
    with pytest.raises(ValueError, match="k must be an integer in \\[1, 15\\]"):
        scores.knn_score(scores.fit_knn(x), x, k=16)
    with pytest.raises(ValueError, match="chunk_size"):
        scores.knn_score(scores.fit_knn(x), x, k=1, chunk_size=0)
    with pytest.raises(ValueError, match="head_kernel"):
        scores.react_score(scores.fit_react(x), x, np.ones((5, 3)))
    with pytest.raises(ValueError, match="head_bias"):
        scores.react_score(scores.fit_react(x), x, np.ones((4, 3)), np.ones(2))


def test_normalized_feature_variants_are_the_plain_scores_on_unit_features():
    # Registered as their own scores: Mahalanobis and GMM on z / ||z||.
    from ood_jax.scores import registry

    x, y, _ = _clusters(seed=7, per_class=30)
    x = x + 3.0  # away from the origin, so normalizing changes the geometry
    test = np.random.default_rng(8).normal(scale=4.0, size=(7, 4))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    tn = test / np.linalg.norm(test, axis=1, keepdims=True)
    # Mahalanobis, by hand on the unit features (tied covariance, MLE, the default ridge).
    means = np.stack([xn[y == c].mean(0) for c in range(3)])
    residual = xn - means[y]
    precision = np.linalg.inv(_ridge(residual.T @ residual / len(xn), 1e-6))
    maha = -np.min([[(t - m) @ precision @ (t - m) for m in means] for t in tn], axis=1)
    logits = np.zeros((len(x), 3), np.float32)
    head = registry.Head(kernel=np.zeros((4, 3), np.float32), bias=np.zeros(3, np.float32))
    for name, expected in (
        ("mahalanobis_l2", maha),
        ("gmm_l2", scores.gmm_score(scores.fit_gmm(xn, y), tn)),
    ):
        score = registry.get_score(name)
        params = score.fit(logits, x.astype(np.float32), y)
        got = registry.compute(score, {}, logits[:7], test.astype(np.float32), head, params)
        np.testing.assert_allclose(got[name], expected, rtol=1e-3, atol=1e-3)
