"""Scores from cached outputs, each checked against an independent float64 computation."""

import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from scipy.stats import multivariate_normal
from sklearn.neighbors import NearestNeighbors

from ood_jax.evaluate import ModelOutputs, ScoreSettings, fit_scores, score_key, score_outputs
from ood_jax.evaluate.sweep import check_score_names, display_name

K, DIM = 4, 6


def _outputs(rng, n, shift=0.0, labelled=True):
    features = rng.normal(shift, 1.0, (n, DIM)).astype(np.float32)
    logits = (features @ KERNEL + BIAS).astype(np.float32)
    labels = rng.integers(0, K, n) if labelled else -np.ones(n)
    return ModelOutputs(logits, features, labels.astype(np.int32))


RNG = np.random.default_rng(0)
KERNEL = RNG.normal(size=(DIM, K)).astype(np.float32)
BIAS = RNG.normal(size=K).astype(np.float32)
TRAIN = _outputs(RNG, 400)
OUTPUTS = {"id": _outputs(RNG, 50), "ood/a": _outputs(RNG, 30, 2.0, False)}
OUTPUTS["ood/b"] = _outputs(RNG, 7, -1.0, False)
SETTINGS = ScoreSettings(temperatures=(1.0, 2.5, 1000.0), knn_k=7, react_percentile=80.0)
NAMES = ("msp", "max_logit", "energy", "neg_entropy", "feature_norm", "gradnorm")
FITTED = ("mahalanobis", "knn", "gmm", "react")


@pytest.fixture(scope="module")
def scored():
    fitted = fit_scores(FITTED, TRAIN, settings=SETTINGS)
    return score_outputs(
        NAMES + FITTED,
        OUTPUTS,
        head_kernel=KERNEL,
        head_bias=BIAS,
        settings=SETTINGS,
        fitted=fitted,
    )


def _mahalanobis(z):
    x, y = TRAIN.features.astype(np.float64), TRAIN.labels
    means = np.stack([x[y == c].mean(0) for c in range(K)])
    centered = x - means[y]
    precision = np.linalg.inv(centered.T @ centered / len(x))
    d = [np.einsum("nd,de,ne->n", z - m, precision, z - m) for m in means]
    return -np.min(d, axis=0)


def _gmm(z):
    x, y = TRAIN.features.astype(np.float64), TRAIN.labels
    parts = [
        np.log(np.mean(y == c))
        + multivariate_normal(x[y == c].mean(0), np.cov(x[y == c].T, ddof=1)).logpdf(z)
        for c in range(K)
    ]
    return logsumexp(np.stack(parts), axis=0)


def _knn(z):
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    nn = NearestNeighbors(n_neighbors=SETTINGS.knn_k).fit(unit(TRAIN.features.astype(np.float64)))
    distances, _ = nn.kneighbors(unit(z))
    return -distances[:, -1]


def _react(z):
    c = np.percentile(TRAIN.features.astype(np.float64), 80.0)
    return logsumexp(np.minimum(z, c) @ KERNEL + BIAS, axis=1)


def _gradnorm(z, f):
    # dL/dW for L = -mean_k log softmax(f)_k is z^T (softmax(f) - 1/K); L1 norm factorizes.
    return np.abs(z).sum(1) * np.abs(softmax(f, axis=1) - 1.0 / K).sum(1)


def _reference(out):
    f, z = out.logits.astype(np.float64), out.features.astype(np.float64)
    ref = {}
    for t in SETTINGS.temperatures:
        ref[score_key("msp", t)] = softmax(f / t, axis=1).max(1)
        ref[score_key("energy", t)] = t * logsumexp(f / t, axis=1)
    p = softmax(f, axis=1)
    ref["max_logit"] = f.max(1)
    ref["neg_entropy"] = np.sum(p * np.log(p), axis=1)
    ref["feature_norm"] = np.linalg.norm(z, axis=1)
    ref["gradnorm"] = _gradnorm(z, f)
    ref["mahalanobis"] = _mahalanobis(z)
    ref["gmm"] = _gmm(z)
    ref["knn"] = _knn(z)
    ref["react"] = _react(z)
    return ref


@pytest.mark.parametrize("dataset", list(OUTPUTS))
def test_every_score_matches_independent_computation(scored, dataset):
    got = scored[dataset]
    ref = _reference(OUTPUTS[dataset])
    assert set(got) == set(ref)
    for key, values in ref.items():
        assert got[key].shape == (len(OUTPUTS[dataset]),), key
        assert got[key].dtype == np.float32, key
        np.testing.assert_allclose(got[key], values, rtol=2e-4, atol=2e-4, err_msg=key)


def test_temperature_sweep_keys_and_names():
    assert score_key("msp", 1.0) == "msp" and score_key("energy", 1000.0) == "energy_T1000"
    assert display_name("msp_T2.5") == "MSP (T=2.5)" and display_name("knn") == "KNN"


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown"):
        check_score_names(["msp", "bogus"])
    with pytest.raises(ValueError, match="temperatures"):
        ScoreSettings(temperatures=(1.0, 0.0))
    with pytest.raises(ValueError, match="fitted parameters"):
        score_outputs(["knn"], OUTPUTS, head_kernel=KERNEL, head_bias=BIAS, settings=SETTINGS)
    with pytest.raises(ValueError, match="labelled"):
        fit_scores(["gmm"], OUTPUTS["ood/a"], settings=SETTINGS)
