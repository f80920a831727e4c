"""Scores from cached outputs, each checked against an independent float64 computation."""

import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from scipy.stats import multivariate_normal
from sklearn.neighbors import NearestNeighbors

from ood_jax.evaluate import ModelOutputs, fit_scores, score_outputs
from ood_jax.scores import (
    Head,
    available_scores,
    check_score_names,
    get_score,
    merge_hparams,
    resolve_hparams,
)

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
OUTPUTS = {"id": _outputs(RNG, 50), "a": _outputs(RNG, 30, 2.0, False)}
OUTPUTS["b"] = _outputs(RNG, 7, -1.0, False)
TEMPERATURES = (1.0, 2.5, 1000.0)
KNN_K = 7
NAMES = ("msp", "max_logit", "energy", "neg_entropy", "feature_norm", "gradnorm")
FITTED = ("mahalanobis", "knn", "gmm", "react")
HPARAMS = resolve_hparams(
    NAMES + FITTED,
    {
        "msp": {"temperature": TEMPERATURES},
        "energy": {"temperature": TEMPERATURES},
        "knn": {"k": KNN_K},
        "react": {"percentile": 80.0},
    },
)
HEAD = Head(KERNEL, BIAS)


def score_key(name, t):
    # The documented key rule: the name at the default T = 1, name_T<t> otherwise.
    return name if t == 1.0 else f"{name}_T{t:g}"


@pytest.fixture(scope="module")
def scored():
    fitted = fit_scores(HPARAMS, TRAIN)
    return score_outputs(HPARAMS, OUTPUTS, head=HEAD, fitted=fitted)


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
    nn = NearestNeighbors(n_neighbors=KNN_K).fit(unit(TRAIN.features.astype(np.float64)))
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
    for t in TEMPERATURES:
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
    msp, energy = get_score("msp"), get_score("energy")
    assert msp.key(1.0) == "msp" and energy.key(1000.0) == "energy_T1000"
    assert msp.display_for("msp_T2.5") == "MSP (T=2.5)" and get_score("knn").display == "KNN"
    assert HPARAMS["msp"]["temperature"] == TEMPERATURES


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown score 'bogus'"):
        check_score_names(["msp", "bogus"])
    with pytest.raises(ValueError, match="unknown"):
        resolve_hparams(["knn"], {"knn": {"kk": 3}})
    with pytest.raises(ValueError, match="fitted statistics"):
        score_outputs(resolve_hparams(["knn"]), OUTPUTS, head=HEAD)
    with pytest.raises(ValueError, match="labelled"):
        fit_scores(resolve_hparams(["gmm"]), OUTPUTS["a"])


def test_merge_hparams_keeps_values_as_given_and_rejects_unknown_names():
    merged = merge_hparams({"knn": {"k": 7}, "msp": {"temperature": 2.0}})
    assert tuple(merged) == available_scores()
    assert merged["knn"] == {"k": 7, "max_train": None, "seed": 0}
    assert merged["msp"] == {"temperature": 2.0}  # resolve_hparams makes the sweep a tuple
    assert resolve_hparams(["msp"], {"msp": {"temperature": 2}}) == {"msp": {"temperature": (2.0,)}}
    # An override of a score left out is checked, then ignored.
    assert merge_hparams({"odin": {"epsilon": 0.0}}, ["msp"]) == {"msp": {"temperature": 1.0}}
    with pytest.raises(ValueError, match="unknown score 'bogus'"):
        merge_hparams({"bogus": {}})
    with pytest.raises(ValueError, match=r"'knn' takes hyperparameters .*unknown \['kk'\]"):
        merge_hparams({"knn": {"kk": 1}})


def test_budget_subsamples_the_knn_bank():
    # max_train keeps a seeded subset of the bank: the k-th neighbour among those rows.
    hp = resolve_hparams(["knn"], {"knn": {"k": 3, "max_train": 50, "seed": 4}})
    fitted = fit_scores(hp, TRAIN)
    assert fitted["knn"].bank.shape == (50, DIM)
    keep = np.sort(np.random.default_rng(4).choice(len(TRAIN), 50, replace=False))
    bank = TRAIN.features[keep].astype(np.float64)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    nn = NearestNeighbors(n_neighbors=3).fit(unit(bank))
    expected = -nn.kneighbors(unit(OUTPUTS["a"].features.astype(np.float64)))[0][:, -1]
    got = score_outputs(hp, {"a": OUTPUTS["a"]}, head=HEAD, fitted=fitted)["a"]["knn"]
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)
