"""Pearce et al. diagnostics and the logit-norm curve, against loops and hand values."""

import json

import numpy as np
import pytest

from ood_jax.evaluate import (
    feature_geometry,
    logit_norm_curve,
    read_metrics_log,
    weight_diagnostics,
)


def _simplex(k):
    """Columns: the K vertices of a regular simplex (centered one-hot vectors), norm 1."""
    w = np.eye(k) - 1.0 / k
    return w / np.linalg.norm(w, axis=0)


def test_regular_simplex_is_optimal():
    d = weight_diagnostics(3.0 * _simplex(5), np.zeros(5))
    assert d["optimal_cosine"] == pytest.approx(-0.25)
    assert d["cosine"]["mean"] == pytest.approx(-0.25)
    assert d["cosine_mean_abs_deviation"] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(d["norms"], 3.0)
    assert d["norm_cv"] == pytest.approx(0.0, abs=1e-12)


def test_weight_diagnostics_match_loop():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(7, 4)), rng.normal(size=4)
    d = weight_diagnostics(w, b)
    pairs = [
        w[:, i] @ w[:, j] / (np.linalg.norm(w[:, i]) * np.linalg.norm(w[:, j]))
        for i in range(4)
        for j in range(i + 1, 4)
    ]
    assert d["cosine"]["mean"] == pytest.approx(np.mean(pairs))
    assert d["cosine"]["min"] == pytest.approx(min(pairs))
    assert d["cosine_mean_abs_deviation"] == pytest.approx(np.mean(np.abs(np.add(pairs, 1 / 3))))
    np.testing.assert_allclose(d["pairwise_cosines"][1][3], pairs[4])
    np.testing.assert_allclose(d["norms"], [np.sqrt(sum(x * x for x in col)) for col in w.T])
    np.testing.assert_allclose(d["biases"], b)
    with pytest.raises(ValueError, match="head_kernel"):
        weight_diagnostics(np.ones((3, 1)), None)


def test_feature_geometry_matches_loop():
    rng = np.random.default_rng(1)
    z, w = rng.normal(size=(9, 5)), rng.normal(size=(5, 3))
    logits = z @ w + rng.normal(size=3)
    g = feature_geometry(logits, z, w)
    for i in range(9):
        k = int(np.argmax(logits[i]))
        assert g["feature_norm"][i] == pytest.approx(np.sqrt(np.sum(z[i] ** 2)))
        cos = z[i] @ w[:, k] / (np.linalg.norm(z[i]) * np.linalg.norm(w[:, k]))
        assert g["cos_pred"][i] == pytest.approx(cos)
        assert g["mean_logit"][i] == pytest.approx(sum(logits[i]) / len(logits[i]))
    with pytest.raises(ValueError, match="dims"):
        feature_geometry(logits, z[:, :4], w)


def test_logit_norm_curve_from_metrics_log(tmp_path):
    rows = [
        {"step": 10, "epoch": 1.0, "logit_norm": 3.0, "test_logit_norm": 2.5, "lr": 0.1},
        {"step": 20, "epoch": 2.0, "logit_norm": 5.0, "test_logit_norm": None},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = logit_norm_curve(read_metrics_log(str(tmp_path)))
    assert curves == {
        "logit_norm": {"step": [10.0, 20.0], "value": [3.0, 5.0]},
        "test_logit_norm": {"step": [10.0], "value": [2.5]},
    }
    assert read_metrics_log(str(tmp_path / "missing")) == []
    # An unreadable line before the last is corruption; a torn last line is skipped.
    (tmp_path / "metrics.jsonl").write_text('{not json\n{"step": 1}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        read_metrics_log(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="metrics.jsonl:2: torn last line"):
        assert read_metrics_log(str(tmp_path)) == [{"step": 1}]


def _clusters(rng, n=600, k=4, d=6, separation=3.0):
    labels = np.arange(n) % k
    means = separation * rng.normal(size=(k, d))
    spread = np.diag(np.linspace(0.05, 2.0, d))  # very unequal variances per direction
    return means[labels] + rng.normal(size=(n, d)) @ spread, labels


def test_mahalanobis_split_matches_a_slow_loop_and_the_score():
    from ood_jax.evaluate import mahalanobis_split
    from ood_jax.scores import fit_mahalanobis, mahalanobis_score

    rng = np.random.default_rng(0)
    x, y = _clusters(rng)
    z = rng.normal(size=(50, 6)) * 2.0
    got = mahalanobis_split(x, y, {"z": z}, num_top=2, chunk=7)["z"]
    # Slow loop: the covariance from its SVD, a solve per example and class.
    means = np.stack([x[y == c].mean(0) for c in range(4)])
    centered = (x - means[y]) / np.sqrt(len(x))
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    cov = centered.T @ centered
    ridge = 1e-6 * np.trace(cov) / 6
    order = np.argsort(s)[::-1]
    top_dirs, top_vars = vt[order[:2]], s[order[:2]] ** 2 + ridge
    for i, zi in enumerate(z):
        dists = [(zi - m) @ np.linalg.solve(cov + ridge * np.eye(6), zi - m) for m in means]
        c = int(np.argmin(dists))
        assert got["nearest"][i] == c
        assert got["total"][i] == pytest.approx(dists[c], rel=1e-9)
        top = np.sum((top_dirs @ (zi - means[c])) ** 2 / top_vars)
        assert got["top"][i] == pytest.approx(top, rel=1e-9)
    np.testing.assert_allclose(got["top"] + got["rest"], got["total"], rtol=1e-12)
    # The total is the Mahalanobis score's distance (computed through a Cholesky whitener).
    score = np.asarray(mahalanobis_score(fit_mahalanobis(x, y), z))
    np.testing.assert_allclose(got["total"], -score, rtol=2e-4)


def test_mahalanobis_split_sees_an_offset_along_a_low_variance_direction():
    from ood_jax.evaluate import mahalanobis_split

    rng = np.random.default_rng(1)
    x, y = _clusters(rng, separation=30.0)  # far apart: the nearest class stays the same
    means = np.stack([x[y == c].mean(0) for c in range(4)])
    low = np.zeros(6)
    low[0] = 1.0  # the direction of least variance (0.05)
    high = np.zeros(6)
    high[-1] = 1.0  # the direction of most variance (2.0)
    out = mahalanobis_split(x, y, {"low": means + 0.5 * low, "high": means + 0.5 * high}, num_top=1)
    # 0.5 along std 0.05 costs ~100 and lands in "rest"; along std 2 it costs ~0.06 in "top".
    assert np.all(out["low"]["nearest"] == np.arange(4))
    np.testing.assert_allclose(out["low"]["rest"], 0.25 / 0.05**2, rtol=0.15)
    assert np.all(out["low"]["top"] < 1e-2)
    np.testing.assert_allclose(out["high"]["top"], 0.25 / 2.0**2, rtol=0.15)


def test_mahalanobis_split_normalizes_and_checks_its_input():
    from ood_jax.evaluate import mahalanobis_split

    rng = np.random.default_rng(2)
    x, y = _clusters(rng)
    z = rng.normal(size=(20, 6))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    a = mahalanobis_split(x, y, {"z": z}, normalize=True)["z"]["total"]
    b = mahalanobis_split(unit(x), y, {"z": unit(z)})["z"]["total"]
    np.testing.assert_allclose(a, b, rtol=1e-12)
    with pytest.raises(ValueError, match=r"must be \[M, 6\]"):
        mahalanobis_split(x, y, {"z": z[:, :5]})
    with pytest.raises(ValueError, match="every class"):
        mahalanobis_split(x, np.where(y == 2, 3, y), {"z": z})
    with pytest.raises(ValueError, match="num_top"):
        mahalanobis_split(x, y, {"z": z}, num_top=7)
