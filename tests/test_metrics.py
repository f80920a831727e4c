"""Tests for ood_jax.metrics against scikit-learn, slow loops and hand computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from sklearn import metrics as skm

from ood_jax.metrics import accuracy, expected_calibration_error, ood_metrics


# ---------------------------------------------------------------- independent references
def slow_nearest_recall_fpr(id_scores, ood_scores, recall):
    """Hendrycks FPR: walk distinct thresholds from high to low, keep the nearest TPR."""
    best_distance, best_fpr = math.inf, None
    for threshold in sorted(set(id_scores) | set(ood_scores), reverse=True):
        tpr = sum(s >= threshold for s in id_scores) / len(id_scores)
        fpr = sum(s >= threshold for s in ood_scores) / len(ood_scores)
        distance = abs(tpr - recall)
        if distance <= best_distance:  # ties go to the lower threshold
            best_distance, best_fpr = distance, fpr
        if tpr == 1.0:  # lower thresholds only add false positives
            break
    return best_fpr


def slow_first_reaching_fpr(id_scores, ood_scores, recall):
    """OpenOOD FPR: OOD positive; the highest threshold on -score with OOD TPR >= recall."""
    for threshold in sorted(set(-np.asarray(id_scores)) | set(-np.asarray(ood_scores)))[::-1]:
        tpr = np.mean(-np.asarray(ood_scores) >= threshold)
        if tpr >= recall:
            return np.mean(-np.asarray(id_scores) >= threshold)
    raise AssertionError("unreachable: the lowest threshold has TPR 1")


def sklearn_reference(id_scores, ood_scores):
    scores = np.concatenate([id_scores, ood_scores])
    is_id = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    p_in, r_in, _ = skm.precision_recall_curve(is_id, scores)
    p_out, r_out, _ = skm.precision_recall_curve(1 - is_id, -scores)
    return {
        "auroc": skm.roc_auc_score(is_id, scores),
        "aupr_in": skm.average_precision_score(is_id, scores),
        "aupr_out": skm.average_precision_score(1 - is_id, -scores),
        "aupr_in_trapezoid": skm.auc(r_in, p_in),
        "aupr_out_trapezoid": skm.auc(r_out, p_out),
    }


def random_scores(seed, tied):
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(1, 300, size=2)
    if tied:  # integer scores in 0..5: many ties, mixed ID/OOD groups
        return rng.integers(0, 6, n_id).astype(float), rng.integers(0, 4, n_ood).astype(float)
    return rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.5, n_ood)


CASES = [(seed, tied) for seed in range(6) for tied in (False, True)]


# ---------------------------------------------------------------- ood_metrics
@pytest.mark.parametrize(("seed", "tied"), CASES)
def test_areas_match_sklearn(seed, tied):
    id_scores, ood_scores = random_scores(seed, tied)
    ref = sklearn_reference(id_scores, ood_scores)
    hendrycks = ood_metrics(id_scores, ood_scores)
    openood = ood_metrics(id_scores, ood_scores, convention="openood")
    for result in (hendrycks, openood):
        assert result["auroc"] == pytest.approx(ref["auroc"], abs=1e-9)
    assert hendrycks["aupr_in"] == pytest.approx(ref["aupr_in"], abs=1e-9)
    assert hendrycks["aupr_out"] == pytest.approx(ref["aupr_out"], abs=1e-9)
    assert openood["aupr_in"] == pytest.approx(ref["aupr_in_trapezoid"], abs=1e-9)
    assert openood["aupr_out"] == pytest.approx(ref["aupr_out_trapezoid"], abs=1e-9)
    for result in (hendrycks, openood):
        assert set(result) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in result.values())


@pytest.mark.parametrize(("seed", "tied"), CASES)
@pytest.mark.parametrize("recall", [0.95, 0.5, 0.8, 1.0, 0.01])
def test_fpr_matches_slow_loops(seed, tied, recall):
    id_scores, ood_scores = random_scores(seed, tied)
    hendrycks = ood_metrics(id_scores, ood_scores, recall=recall)
    expected = slow_nearest_recall_fpr(list(id_scores), list(ood_scores), recall)
    assert hendrycks["fpr95"] == expected
    openood = ood_metrics(id_scores, ood_scores, convention="openood", recall=recall)
    assert openood["fpr95"] == slow_first_reaching_fpr(id_scores, ood_scores, recall)


@pytest.mark.parametrize(("seed", "tied"), CASES)
def test_openood_fpr_matches_sklearn_roc_curve(seed, tied):
    id_scores, ood_scores = random_scores(seed, tied)
    scores = np.concatenate([id_scores, ood_scores])
    is_ood = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    ours = ood_metrics(id_scores, ood_scores, convention="openood")["fpr95"]
    fpr, tpr, _ = skm.roc_curve(is_ood, -scores, drop_intermediate=False)
    assert ours == fpr[np.argmax(tpr >= 0.95)]
    if not tied:  # OpenOOD's own call (drop_intermediate=True) agrees without ties
        fpr, tpr, _ = skm.roc_curve(is_ood, -scores)
        assert ours == fpr[np.argmax(tpr >= 0.95)]


def test_by_hand_example():
    # Thresholds from high to low: 0.9 (TPR 1/4), 0.8 (2/4), 0.75 (2/4, OOD 1/2 in),
    # 0.7 (3/4), 0.6 (4/4, OOD 1/2 in), 0.1.
    id_scores = [0.9, 0.8, 0.7, 0.6]
    ood_scores = [0.75, 0.1]
    h = ood_metrics(id_scores, ood_scores)
    assert h["auroc"] == pytest.approx(6 / 8)  # 6 of 8 (ID, OOD) pairs ordered right
    # AP with ID positive: precision where recall grows: 1, 1, 3/4, 4/5.
    assert h["aupr_in"] == pytest.approx(0.25 * (1 + 1 + 3 / 4 + 4 / 5))
    # AP with OOD positive on -score: 0.1 (P 1, R 1/2), then 0.75 (P 2/4, R 1).
    assert h["aupr_out"] == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    assert h["fpr95"] == 0.5  # TPR 1.0 is nearest to 0.95; 0.75 is accepted
    # TPR 0.5 is reached at 0.8 (FPR 0) and at 0.75 (FPR 1/2): the lower threshold wins.
    assert ood_metrics(id_scores, ood_scores, recall=0.5)["fpr95"] == 0.5
    assert ood_metrics(id_scores, ood_scores, recall=0.7)["fpr95"] == 0.5  # TPR 3/4

    o = ood_metrics(id_scores, ood_scores, convention="openood")
    assert o["auroc"] == pytest.approx(6 / 8)
    # PR curve (ID positive) from (0, 1): (1/4, 1), (1/2, 1), (1/2, 2/3), (3/4, 3/4), (1, 4/5).
    assert o["aupr_in"] == pytest.approx(0.5 + 0.125 * (2 / 3 + 3 / 4) + 0.125 * (3 / 4 + 4 / 5))
    # OOD positive: (1/2, 1), (1/2, 1/2), (1/2, 1/3), (1, 2/4), (1, 2/5), (1, 2/6).
    assert o["aupr_out"] == pytest.approx(0.5 + 0.25 * (1 / 3 + 1 / 2))
    # OOD TPR reaches 1 at -0.75; ID flagged there: 0.7 and 0.6 -> 2/4.
    assert o["fpr95"] == 0.5
    assert ood_metrics(id_scores, ood_scores, convention="openood", recall=0.5)["fpr95"] == 0.0


@pytest.mark.parametrize("convention", ["hendrycks", "openood"])
def test_perfect_inverted_and_constant_scores(convention):
    good = ood_metrics([5.0, 4.0, 3.0], [1.0, 2.0], convention=convention)
    assert good == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    bad = ood_metrics([1.0, 2.0], [5.0, 4.0, 3.0], convention=convention)
    assert bad["auroc"] == 0.0 and bad["fpr95"] == 1.0
    flat = ood_metrics([1.0, 1.0, 1.0], [1.0], convention=convention)
    assert flat["auroc"] == 0.5 and flat["fpr95"] == 1.0


def test_accepts_jax_and_low_precision_arrays():
    id_scores = jnp.array([0.9, 0.8, 0.7, 0.6])
    ood_scores = jnp.array([0.75, 0.1], dtype=jnp.bfloat16)
    assert ood_metrics(id_scores, ood_scores)["auroc"] == pytest.approx(0.75)
    assert ood_metrics(np.array([3, 2]), np.array([1]))["auroc"] == 1.0  # integers


def test_accepts_arrays_sharded_over_devices():
    # ood_jax.evaluate hands over global arrays sharded over the batch axis.
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    rng = np.random.default_rng(3)
    a, b = rng.normal(1, 1, 64).astype(np.float32), rng.normal(0, 1, 32).astype(np.float32)
    got = ood_metrics(jax.device_put(a, sharding), jax.device_put(b, sharding))
    assert got == ood_metrics(a, b)


def test_scores_are_not_rescaled_or_shifted():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=50), rng.normal(size=40)
    base = ood_metrics(a, b)
    # Any strictly increasing map leaves every metric unchanged.
    assert ood_metrics(np.exp(a) * 1e6, np.exp(b) * 1e6) == pytest.approx(base)


# ---------------------------------------------------------------- calibration and accuracy
def slow_ece(logits, labels, num_bins):
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    confs, hits = [], []
    for row, label in zip(logits, labels, strict=True):
        exps = [math.exp(v - max(row)) for v in row]
        confs.append(max(exps) / sum(exps))
        hits.append(float(int(np.argmax(row)) == label))
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        members = [i for i, c in enumerate(confs) if lo < c <= hi]
        if members:
            acc = sum(hits[i] for i in members) / len(members)
            conf = sum(confs[i] for i in members) / len(members)
            total += len(members) / len(confs) * abs(acc - conf)
    return total


def test_ece_by_hand_with_confidence_on_a_bin_edge():
    # Two bins (0, 0.5] and (0.5, 1]. Confidence 0.5 sits exactly on the edge and must
    # fall in the lower bin; confidence 1.0 in the upper.
    logits = np.array([[0.0, 0.0], [1000.0, 0.0], [2.0, 0.0]])
    labels = np.array([0, 0, 1])
    high = math.exp(2) / (math.exp(2) + 1)
    # lower bin {0.5, correct}: gap 0.5; upper bin {1.0 correct, high wrong}: |1 - (1 + high)|.
    expected = (abs(1 - 0.5) + abs(1 - (1 + high))) / 3
    assert expected_calibration_error(logits, labels, num_bins=2) == pytest.approx(expected)
    # Four classes, equal logits: confidence exactly 0.25, in the first of four bins.
    equal = np.zeros((1, 4))
    assert expected_calibration_error(equal, [0], num_bins=4) == pytest.approx(0.75)


@pytest.mark.parametrize("num_bins", [15, 1, 7])
def test_ece_matches_slow_loop(num_bins):
    rng = np.random.default_rng(num_bins)
    logits = rng.normal(scale=3.0, size=(300, 10))
    labels = rng.integers(0, 10, size=300)
    # Exact-edge confidences: uniform rows (0.1) and saturated rows (1.0).
    logits[:20] = 0.0
    logits[20:40, 0] = 1e4
    got = expected_calibration_error(jnp.asarray(logits, jnp.float32), labels, num_bins=num_bins)
    assert got == pytest.approx(slow_ece(logits, labels, num_bins), abs=1e-6)


def test_ece_zero_when_calibrated():
    # Confidence 0.5 with half right and half wrong: perfectly calibrated.
    logits = np.zeros((4, 2))
    assert expected_calibration_error(logits, [0, 1, 0, 1]) == 0.0


def test_accuracy_by_hand():
    logits = jnp.array([[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
    # Predictions 1, 0, 0 (ties go to the first class): two of three right.
    assert accuracy(logits, jnp.array([1, 0, 1])) == pytest.approx(2 / 3)
    assert accuracy(logits, np.array([1, 0, 0])) == 1.0


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(id_scores=[], ood_scores=[1.0]), "id_scores"),
        (dict(id_scores=[1.0], ood_scores=np.zeros(0)), "ood_scores"),
        (dict(id_scores=[1.0, np.nan], ood_scores=[1.0]), "id_scores"),
        (dict(id_scores=[1.0], ood_scores=[np.inf]), "ood_scores"),
        (dict(id_scores=[1.0], ood_scores=[-np.inf]), "ood_scores"),
        (dict(id_scores=np.ones((2, 2)), ood_scores=[1.0]), "id_scores"),
        (dict(id_scores=[1.0], ood_scores=np.float64(1.0)), "ood_scores"),
        (dict(id_scores=["a"], ood_scores=[1.0]), "id_scores"),
        (dict(id_scores=[1j], ood_scores=[1.0]), "id_scores"),
        (dict(id_scores=[1.0], ood_scores=[0.0], convention="OpenOOD-v2"), "convention"),
        (dict(id_scores=[1.0], ood_scores=[0.0], recall=0.0), "recall"),
        (dict(id_scores=[1.0], ood_scores=[0.0], recall=1.5), "recall"),
        (dict(id_scores=[1.0], ood_scores=[0.0], recall=-0.1), "recall"),
        (dict(id_scores=[1.0], ood_scores=[0.0], recall=float("nan")), "recall"),
        (dict(id_scores=[1.0], ood_scores=[0.0], recall="0.95"), "recall"),
    ],
)
def test_ood_metrics_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ood_metrics(**kwargs)


@pytest.mark.parametrize("fn", [accuracy, expected_calibration_error])
@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.zeros((3, 2)), np.zeros(2, int), "labels"),
        (np.zeros((3, 2)), np.zeros((3, 1), int), "labels"),
        (np.zeros((3, 2)), np.zeros(3), "labels"),  # float labels
        (np.zeros((3, 2)), np.array([0, 2, 1]), "labels"),  # out of range
        (np.zeros((3, 2)), np.array([0, -1, 1]), "labels"),
        (np.zeros(3), np.zeros(3, int), "logits"),
        (np.zeros((0, 2)), np.zeros(0, int), "logits"),
        (np.array([[0.0, np.nan]]), np.zeros(1, int), "logits"),
    ],
)
def test_logits_labels_bad_input(fn, logits, labels, match):
    with pytest.raises(ValueError, match=match):
        fn(logits, labels)


@pytest.mark.parametrize("num_bins", [0, -3, 2.5, True])
def test_ece_bad_num_bins(num_bins):
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(np.zeros((2, 2)), [0, 1], num_bins=num_bins)
