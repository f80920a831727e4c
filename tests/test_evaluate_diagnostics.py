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
