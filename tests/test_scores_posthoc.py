"""The post-hoc detectors of issue 24 (logits, features, head) against NumPy loops."""

import math

import numpy as np
import pytest
import scipy.stats
from scipy.special import logsumexp, softmax

from ood_jax import scores
from ood_jax.evaluate import ModelOutputs, fit_scores, score_outputs
from ood_jax.scores import Head, get_score, resolve_hparams

N_TRAIN, N_TEST, DIM, K = 80, 9, 6, 4
RNG = np.random.default_rng(0)
KERNEL = RNG.normal(size=(DIM, K)).astype(np.float32)
BIAS = RNG.normal(size=K).astype(np.float32)
TRAIN_Z = np.abs(RNG.normal(size=(N_TRAIN, DIM))).astype(np.float32) + 0.1
TRAIN_F = TRAIN_Z @ KERNEL + BIAS
TRAIN_Y = np.arange(N_TRAIN) % K
TEST_Z = np.abs(RNG.normal(scale=1.5, size=(N_TEST, DIM))).astype(np.float32)
TEST_F = TEST_Z @ KERNEL + BIAS


def _close(got, expected, rtol=2e-4, atol=1e-5):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- posterior


def test_temperature_is_the_nll_minimum_and_scores_msp_at_it():
    logits = 3.0 * TRAIN_F  # overconfident: the fitted T is far from 1
    t = float(scores.fit_temperature(logits, TRAIN_Y).temperature)

    def nll(t):
        log_p = logits / t - logsumexp(logits / t, axis=1, keepdims=True)
        return -log_p[np.arange(N_TRAIN), TRAIN_Y].mean()

    grid = np.exp(np.linspace(np.log(t) - 0.2, np.log(t) + 0.2, 2001))
    assert abs(grid[np.argmin([nll(g) for g in grid])] - t) / t < 1e-3
    params = scores.fit_temperature(logits, TRAIN_Y)
    _close(scores.temperature_score(params, TEST_F), softmax(TEST_F / t, axis=1).max(1))


def test_kl_matching_is_the_smallest_divergence_to_a_predicted_class_template():
    params = scores.fit_kl_matching(TRAIN_F)
    probs, predicted = softmax(TRAIN_F.astype(np.float64), axis=1), TRAIN_F.argmax(1)
    templates = [
        probs[predicted == c].mean(0) if (predicted == c).any() else np.eye(K)[c] for c in range(K)
    ]
    seen = [c for c in range(K) if (predicted == c).any()]
    test_p = softmax(TEST_F.astype(np.float64), axis=1)
    expected = [-min(scipy.stats.entropy(p, templates[c]) for c in seen) for p in test_p]
    _close(scores.kl_matching_score(params, TEST_F), expected)


@pytest.mark.parametrize("gamma,m", [(0.1, 100), (2.0, 2)])
def test_gen_sums_the_m_largest_probabilities(gamma, m):
    expected = []
    for p in softmax(TEST_F.astype(np.float64), axis=1):
        top = np.sort(p)[::-1][:m]
        expected.append(-np.sum(top**gamma * (1 - top) ** gamma))
    _close(scores.gen_score(TEST_F, gamma=gamma, m=m), expected)


# ----------------------------------------------------------------------------- features + head


def test_vim_matches_the_reference_recipe():
    dim = 3
    w, b = KERNEL.T.astype(np.float64), BIAS.astype(np.float64)  # torch layout [K, D]
    u = -np.linalg.pinv(w) @ b
    centered = TRAIN_Z - u
    eig_vals, eig_vecs = np.linalg.eig(centered.T @ centered / N_TRAIN)
    residual = eig_vecs.T[np.argsort(-eig_vals)[dim:]].T
    alpha = TRAIN_F.max(1).mean() / np.linalg.norm(centered @ residual, axis=1).mean()
    expected = logsumexp(TEST_F, axis=1) - alpha * np.linalg.norm((TEST_Z - u) @ residual, axis=1)
    subspace = scores.vim_subspace(scores.fit_vim(TRAIN_F, TRAIN_Z), KERNEL, BIAS, dim=dim)
    _close(scores.vim_score(subspace, TEST_F, TEST_Z), expected, rtol=1e-3)
    residual_norms = np.linalg.norm((TEST_Z - u) @ residual, axis=1)
    _close(scores.residual_score(subspace, TEST_Z), -residual_norms, rtol=1e-3)


def test_vim_dim_not_below_the_feature_dimension_halves_it():
    params = scores.fit_vim(TRAIN_F, TRAIN_Z)
    assert scores.vim_subspace(params, KERNEL, BIAS, dim=DIM).residual.shape == (DIM, DIM // 2)


def test_rmds_is_class_distance_relative_to_the_background():
    means = np.stack([TRAIN_Z[TRAIN_Y == c].mean(0) for c in range(K)])
    within = TRAIN_Z - means[TRAIN_Y]
    precision = np.linalg.inv(within.T @ within / N_TRAIN)
    mu0 = TRAIN_Z.mean(0)
    background = np.linalg.inv((TRAIN_Z - mu0).T @ (TRAIN_Z - mu0) / N_TRAIN)
    expected = []
    for z in TEST_Z.astype(np.float64):
        d0 = (z - mu0) @ background @ (z - mu0)
        expected.append(max(-(z - m) @ precision @ (z - m) + d0 for m in means))
    params = scores.fit_rmds(TRAIN_Z, TRAIN_Y, shrinkage=0.0)
    _close(scores.rmds_score(params, TEST_Z), expected, rtol=1e-3, atol=1e-3)


def test_fdbd_sums_distances_to_every_boundary():
    mean = TRAIN_Z.mean(0)
    for centered in (True, False):
        expected = []
        for z, f in zip(TEST_Z, TEST_F, strict=True):
            c_hat = f.argmax()
            total = sum(
                abs(f[c_hat] - f[c]) / np.linalg.norm(KERNEL[:, c_hat] - KERNEL[:, c])
                for c in range(K)
                if c != c_hat
            )
            expected.append(total / np.linalg.norm(z - mean if centered else z))
        got = scores.fdbd_score(
            scores.fit_train_mean(TRAIN_Z), TEST_F, TEST_Z, KERNEL, distance_as_normalizer=centered
        )
        _close(got, expected)


def test_nci_projects_onto_the_predicted_class_weight():
    mean, alpha = TRAIN_Z.mean(0), 0.3
    expected = []
    for z, f in zip(TEST_Z, TEST_F, strict=True):
        w = KERNEL[:, f.argmax()]
        expected.append(w @ (z - mean) / np.linalg.norm(z - mean) + alpha * np.abs(z).sum())
    got = scores.nci_score(scores.fit_train_mean(TRAIN_Z), TEST_F, TEST_Z, KERNEL, alpha=alpha)
    _close(got, expected)


def test_she_uses_the_correctly_classified_class_means():
    labels = TRAIN_F.argmax(1).copy()
    labels[:10] = (labels[:10] + 1) % K  # ten misclassified examples, left out of the patterns
    patterns = [TRAIN_Z[(labels == c) & (TRAIN_F.argmax(1) == c)] for c in range(K)]
    patterns = [p.mean(0) if len(p) else np.zeros(DIM) for p in patterns]
    expected = [z @ patterns[f.argmax()] for z, f in zip(TEST_Z, TEST_F, strict=True)]
    params = scores.fit_she(TRAIN_F, TRAIN_Z, labels)
    _close(scores.she_score(params, TEST_F, TEST_Z), expected)


def test_dice_prunes_the_small_contributions():
    percentile = 70.0
    contribution = TRAIN_Z.mean(0)[:, None] * KERNEL
    threshold = np.percentile(contribution, percentile)
    masked = np.array(
        [
            [KERNEL[d, k] if contribution[d, k] > threshold else 0.0 for k in range(K)]
            for d in range(DIM)
        ]
    )
    expected = logsumexp(TEST_Z @ masked + BIAS, axis=1)
    params = scores.fit_train_mean(TRAIN_Z)
    _close(scores.dice_score(params, TEST_Z, KERNEL, BIAS, percentile=percentile), expected)


def test_vra_clips_to_the_training_percentiles():
    low, high = np.percentile(TRAIN_Z, [20, 80])
    expected = logsumexp(np.clip(TEST_Z, low, high) @ KERNEL + BIAS, axis=1)
    params = scores.fit_vra(TRAIN_Z, percentile_low=20.0, percentile_high=80.0)
    _close(scores.vra_score(params, TEST_Z, KERNEL, BIAS), expected)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_lts_scales_the_logits_by_the_top_activation_share(p):
    expected = []
    for z, f in zip(TEST_Z - 0.5, TEST_F, strict=True):  # some negative activations
        relu = np.maximum(z, 0.0)
        k = max(1, DIM - round(DIM * (1 - p)))
        scale = (relu.sum() / np.sort(relu)[::-1][:k].sum()) ** 2
        expected.append(logsumexp(f * scale))
    _close(scores.lts_score(TEST_F, TEST_Z - 0.5, p=p), expected)


def test_lts_of_an_example_without_positive_activation_keeps_its_logits():
    # The reference's 0 / 0 is NaN; here the scale is 1: the plain energy of its logits.
    z = np.array([[-1.0, -0.5, 0.0, -2.0], [1.0, 0.0, 3.0, 0.5]], np.float32)
    logits = np.array([[0.3, -1.2, 2.0], [1.0, 0.5, -0.5]], np.float32)
    got = np.asarray(scores.lts_score(logits, z, p=0.5))
    _close(got[0], logsumexp(logits[0]))
    _close(got[1], logsumexp(logits[1] * (4.5 / 4.0) ** 2))  # top 2 of 4: 3 + 1


def test_pnml_regret_from_the_normalized_training_gram_matrix():
    normalized = TRAIN_Z / np.linalg.norm(TRAIN_Z, axis=1, keepdims=True)
    projector = np.linalg.inv(normalized.T @ normalized)
    expected = []
    for z in TEST_Z.astype(np.float64):
        z = z / np.linalg.norm(z)
        probs = softmax(z @ KERNEL + BIAS)
        g = z @ projector @ z / (1 + z @ projector @ z)
        expected.append(-np.log(np.sum(probs / (probs + (1 - probs) * probs**g))) / np.log(K))
    params = scores.fit_pnml(TRAIN_Z)
    _close(scores.pnml_score(params, TEST_Z, KERNEL, BIAS), expected, rtol=1e-3)


def test_openmax_unknown_probability_from_weibull_tails():
    tailsize, alpha = 8, 3
    params = scores.fit_openmax(TRAIN_F, TRAIN_Y, tailsize=tailsize, euclid_weight=1.0)
    centers = np.stack([TRAIN_F[TRAIN_Y == c].mean(0) for c in range(K)])
    weibull = []
    for c in range(K):
        tail = np.sort(np.linalg.norm(TRAIN_F[TRAIN_Y == c] - centers[c], axis=1))[-tailsize:]
        shift = 10000 - tail.min()
        shape, scale = scipy.stats.weibull_min.fit(tail + shift, floc=0)[::2]
        weibull.append((shift, shape, scale))
    expected = []
    for f in TEST_F.astype(np.float64):
        revised, unknown = f.copy(), 0.0
        for rank, c in enumerate(np.argsort(-f)[:alpha]):
            shift, shape, scale = weibull[c]
            w = 1 - np.exp(-(((np.linalg.norm(f - centers[c]) + shift) / scale) ** shape))
            weight = w * (alpha - rank) / alpha
            revised[c] = f[c] * (1 - weight)
            unknown += f[c] * weight
        expected.append(-softmax(np.concatenate([[unknown], revised]))[0])
    _close(scores.openmax_score(params, TEST_F, alpha=alpha), expected, rtol=2e-3, atol=1e-6)


def test_openmax_class_without_examples_counts_as_unknown():
    keep = TRAIN_Y != K - 1  # the last class never occurs
    params = scores.fit_openmax(TRAIN_F[keep], TRAIN_Y[keep], tailsize=8)
    full = scores.fit_openmax(TRAIN_F, TRAIN_Y, tailsize=8)
    assert not bool(params.fitted[K - 1]) and bool(np.all(full.fitted))
    # With alpha = 1, an example whose top class is the missing one (w = 1, rank weight 1)
    # moves that logit entirely to the unknown activation.
    got = np.asarray(scores.openmax_score(params, TEST_F, alpha=1))
    f = TEST_F.astype(np.float64)
    top = f.argmax(1)
    rows = top == K - 1
    assert rows.any()
    revised = f.copy()
    revised[np.arange(N_TEST), top] = 0.0
    expected = -softmax(np.concatenate([f[np.arange(N_TEST), top][:, None], revised], 1), 1)[:, 0]
    _close(got[rows], expected[rows])
    assert np.all(np.isfinite(got))


# ----------------------------------------------------------------------------- banks


def test_relation_sums_the_kept_edges():
    power, threshold = 2.0, 0.03
    bank = TRAIN_Z / np.linalg.norm(TRAIN_Z, axis=1, keepdims=True)
    bank_p = softmax(TRAIN_F.astype(np.float64), axis=1)
    expected = []
    for z, f in zip(TEST_Z, TEST_F, strict=True):
        q, p = z / np.linalg.norm(z), softmax(f.astype(np.float64))
        edges = [max(q @ bank[i], 0.0) * (p @ bank_p[i]) for i in range(N_TRAIN)]
        expected.append(sum(e**power for e in edges if e > threshold))
    params = scores.fit_relation(TRAIN_F, TRAIN_Z)
    got = scores.relation_score(params, TEST_F, TEST_Z, power=power, chunk_size=4)
    _close(got, expected)


def test_nnguide_scales_the_mean_top_k_similarity_by_the_energy():
    k = 5
    bank = TRAIN_Z / np.linalg.norm(TRAIN_Z, axis=1, keepdims=True)
    guide = bank * logsumexp(TRAIN_F, axis=1)[:, None]
    expected = []
    for z, f in zip(TEST_Z, TEST_F, strict=True):
        similarity = np.sort(guide @ (z / np.linalg.norm(z)))[::-1]
        expected.append(similarity[:k].mean() * logsumexp(f))
    params = scores.fit_nnguide(TRAIN_F, TRAIN_Z, alpha=1.0)
    _close(scores.nnguide_score(params, TEST_F, TEST_Z, k=k), expected)
    small = scores.fit_nnguide(TRAIN_F, TRAIN_Z, alpha=0.1)
    assert small.guide.shape == (math.ceil(0.1 * N_TRAIN), DIM)


# ----------------------------------------------------------------------------- energy variants


def test_weighted_energy_is_the_log_of_the_relu_weighted_exponential_sum():
    weights = np.array([0.5, -1.0, 2.0, 0.0])
    expected = [
        math.log(sum(max(w, 0.0) * math.exp(f) for w, f in zip(weights, row, strict=True)))
        for row in TEST_F.astype(np.float64)
    ]
    _close(scores.weighted_energy(TEST_F, weights), expected)
    # Huge logits stay finite (max-shifted); all-ones weights are the energy.
    assert np.isfinite(np.asarray(scores.weighted_energy(TEST_F + 1e4, weights))).all()
    hparams = resolve_hparams(["weighted_energy"], {"weighted_energy": {"weights": [1.0] * K}})
    test = ModelOutputs(TEST_F, TEST_Z, -np.ones(N_TEST, np.int32))
    scored = score_outputs(hparams, {"id": test}, head=Head(KERNEL, BIAS))
    _close(scored["id"]["weighted_energy"], logsumexp(TEST_F.astype(np.float64), axis=-1))
    with pytest.raises(ValueError, match="one per class"):
        scores.weighted_energy(TEST_F, weights[:2])


# ----------------------------------------------------------------------------- the evaluation

NEW = (
    "fdbd",
    "rmds",
    "relation",
    "vim",
    "gen",
    "temp_scale",
    "klm",
    "nnguide",
    "nci",
    "she",
    "dice",
    "vra",
    "residual",
    "lts",
    "pnml",
    "openmax",
    "weighted_energy",
)


def test_the_evaluation_scores_every_new_detector_from_the_registry():
    hparams = resolve_hparams(
        NEW, {"dice": {"percentile": (90.0, 70.0)}, "vim": {"dim": 3}, "residual": {"dim": 3}}
    )
    train = ModelOutputs(TRAIN_F, TRAIN_Z, TRAIN_Y.astype(np.int32))
    test = ModelOutputs(TEST_F, TEST_Z, -np.ones(N_TEST, np.int32))
    fitted = fit_scores(hparams, train)
    scored = score_outputs(
        hparams, {"id": test, "ood": test}, head=Head(KERNEL, BIAS), fitted=fitted
    )
    assert set(scored["ood"]) == set(NEW) | {"dice_p70"}
    for key, values in scored["ood"].items():
        assert values.shape == (N_TEST,) and np.all(np.isfinite(values)), key
    # The swept DICE value is the direct call at that percentile.
    direct = scores.dice_score(fitted["dice"], TEST_Z, KERNEL, BIAS, percentile=70.0)
    _close(scored["ood"]["dice_p70"], np.asarray(direct))
    assert get_score("dice").display_for("dice_p70") == "DICE (p=70)"
