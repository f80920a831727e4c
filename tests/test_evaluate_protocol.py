"""Papers' and full-set protocols against scikit-learn and a by-hand FPR95."""

import zlib

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ood_jax.evaluate import evaluate_ood

RNG = np.random.default_rng(1)
ID = {"s": RNG.normal(1.0, 1.0, 500), "t": RNG.normal(0.5, 1.0, 500)}
OOD = {
    "near": {"s": RNG.normal(0.3, 1.0, 333), "t": RNG.normal(0.0, 1.0, 333)},
    "far": {"s": RNG.normal(-2.0, 1.0, 80), "t": RNG.normal(-1.0, 1.0, 80)},
}


def _reference(id_scores, ood_scores):
    """Hendrycks convention, written independently: ID positive, FPR at recall nearest 0.95."""
    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    s = np.r_[id_scores, ood_scores]
    thresholds = np.unique(s)
    recall = np.array([(id_scores >= t).mean() for t in thresholds])
    best = thresholds[np.argmin(np.abs(recall - 0.95))]
    return {
        "auroc": roc_auc_score(y, s),
        "aupr_in": average_precision_score(y, s),
        "aupr_out": average_precision_score(1 - y, -s),
        "fpr95": float((ood_scores >= best).mean()),
    }


def test_papers_protocol_draws_are_recorded_and_reproducible():
    result = evaluate_ood(ID, OOD, protocol="papers", num_draws=4, seed=7)
    assert result["num_ood"] == 100  # len(ID) // 5, as the papers' code
    assert result["draws"]["near"]["num_examples"] == 100
    # A set no larger than a draw is used whole, once: not 4 identical draws (std 0).
    assert result["draws"]["far"]["num_examples"] == 80
    assert result["draws"]["far"]["num_draws"] == 1 and result["draws"]["near"]["num_draws"] == 4
    for set_name in OOD:
        seeds = result["draws"][set_name]["seeds"]
        # Seeded by the set's name (CRC32), not its position among the sets.
        count = 4 if len(OOD[set_name]["s"]) > 100 else 1
        assert seeds == [[7, zlib.crc32(set_name.encode()), d] for d in range(count)]
        for key in ID:
            cell = result["metrics"][key][set_name]
            per_draw = []
            for seed in seeds:
                # Re-draw from the recorded seed with NumPy directly.
                n = len(OOD[set_name][key])
                idx = np.random.default_rng(seed).choice(n, min(100, n), replace=False)
                per_draw.append(_reference(ID[key], OOD[set_name][key][np.sort(idx)]))
            for metric in ("auroc", "aupr_in", "aupr_out", "fpr95"):
                values = [d[metric] for d in per_draw]
                np.testing.assert_allclose(cell[metric]["values"], values, atol=1e-12)
                np.testing.assert_allclose(cell[metric]["mean"], np.mean(values), atol=1e-12)
                np.testing.assert_allclose(cell[metric]["std"], np.std(values), atol=1e-12)
    # Draws of the larger set differ, so the std is informative.
    assert result["metrics"]["s"]["near"]["auroc"]["std"] > 0


def test_draws_do_not_depend_on_the_other_sets_or_their_order():
    both = evaluate_ood(ID, OOD, protocol="papers", num_draws=3, seed=1)
    alone = evaluate_ood(ID, {"near": OOD["near"]}, protocol="papers", num_draws=3, seed=1)
    swapped = evaluate_ood(ID, dict(reversed(OOD.items())), protocol="papers", num_draws=3, seed=1)
    for other in (alone, swapped):
        assert other["draws"]["near"] == both["draws"]["near"]
        assert other["metrics"]["s"]["near"] == both["metrics"]["s"]["near"]


def test_full_protocol_and_average_row():
    result = evaluate_ood(ID, OOD, protocol="full")
    assert result["num_draws"] == 1 and result["draws"]["near"]["seeds"] == []
    for key in ID:
        table = result["metrics"][key]
        for set_name in OOD:
            ref = _reference(ID[key], OOD[set_name][key])
            for metric, value in ref.items():
                np.testing.assert_allclose(table[set_name][metric]["mean"], value, atol=1e-12)
                assert table[set_name][metric]["std"] == 0.0
        for metric in ("auroc", "fpr95"):
            expected = np.mean([table[s][metric]["mean"] for s in OOD])
            np.testing.assert_allclose(table["average"][metric]["mean"], expected)


def test_openood_convention_is_passed_through():
    hendrycks = evaluate_ood(ID, OOD, protocol="full")["metrics"]["s"]["near"]
    openood = evaluate_ood(ID, OOD, protocol="full", convention="openood")["metrics"]["s"]["near"]
    y_ood = np.r_[np.zeros(500), np.ones(333)]
    # OpenOOD: OOD positive; its AUROC equals the ID-positive one, AUPR is a trapezoid area.
    np.testing.assert_allclose(openood["auroc"]["mean"], hendrycks["auroc"]["mean"])
    neg = -np.r_[ID["s"], OOD["near"]["s"]]
    assert abs(openood["aupr_out"]["mean"] - average_precision_score(y_ood, neg)) < 0.02


def test_bad_input_raises():
    with pytest.raises(ValueError, match="empty"):
        evaluate_ood(ID, {"e": {"s": np.array([]), "t": np.array([])}}, protocol="full")
    with pytest.raises(ValueError, match="no OOD sets"):
        evaluate_ood(ID, {})
    with pytest.raises(ValueError, match="missing score keys"):
        evaluate_ood(ID, {"x": {"s": np.zeros(3)}})
    with pytest.raises(ValueError, match="protocol"):
        evaluate_ood(ID, OOD, protocol="paper")


def test_report_says_which_sets_were_used_whole_and_shows_no_std_for_them():
    from ood_jax.evaluate.report import ood_tables

    text = "\n".join(ood_tables(evaluate_ood(ID, OOD, protocol="papers", num_draws=4)))
    far_rows = [line for line in text.splitlines() if line.startswith("| far")]
    near_rows = [line for line in text.splitlines() if line.startswith("| near")]
    assert far_rows and all("(all 80, one draw)" in row for row in far_rows)
    assert all("±" not in row for row in far_rows)
    assert any("±" in row for row in near_rows)


def test_non_finite_scores_are_named_by_score_and_set_in_one_error():
    ood = {name: {k: v.copy() for k, v in scores.items()} for name, scores in OOD.items()}
    ood["far"]["t"][[3, 9]] = [np.inf, np.nan]
    ids = {"s": ID["s"].copy(), "t": ID["t"]}
    ids["s"][0] = -np.inf
    with pytest.raises(ValueError) as err:
        evaluate_ood(ids, ood, protocol="full")
    assert str(err.value).startswith(
        "NaN or infinite scores: 's' on 1 of 500 'in-distribution' examples; "
        "'t' on 2 of 80 'far' examples;"
    )
