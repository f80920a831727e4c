"""OOD detection and calibration metrics (host-side NumPy, float64).

These run after the forward passes, on the host: they accept ``jax.Array`` or
NumPy inputs, copy them to float64 NumPy and return Python floats. They are not
meant to be traced by ``jax.jit``.

``ood_metrics`` sorts the pooled scores once (O(n log n)); every number is then
read off the cumulative counts at the distinct score values, so 1,000,000 ID +
1,000,000 OOD scores take well under a second (``benchmarks/metrics_speed.py``).

Two conventions are in use in the literature (docs/metrics.md).
In both, the input scores are confidences: **higher means more in-distribution**.

``convention="hendrycks"`` (the LogitNorm, energy and Outlier Exposure code):
  * ``auroc``: area under the ROC curve with ID as the positive class
    (= ``sklearn.metrics.roc_auc_score(is_id, scores)``).
  * ``aupr_in``: average precision with ID positive,
    ``AP = sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds (step-wise, no
    interpolation; = ``sklearn.metrics.average_precision_score(is_id, scores)``).
  * ``aupr_out``: average precision with OOD positive on the negated scores
    (= ``average_precision_score(is_ood, -scores)``).
  * ``fpr95``: the fraction of OOD examples accepted (score >= threshold) at the
    threshold whose ID recall is nearest to ``recall``: ``argmin |tpr - recall|``
    over distinct thresholds (tied scores form one threshold), considering
    thresholds down to the first one that reaches full ID recall. Among equally
    near thresholds the lowest one (the largest FPR) is taken. This reproduces
    ``fpr_and_fdr_at_recall`` of those repositories exactly, including its
    floating-point tie-breaking.

``convention="openood"`` (OpenOOD v1.5 ``auc_and_fpr_recall``): OOD is the
positive class and the negated score is the detector output.
  * ``auroc``: as above (the ROC area does not depend on which class is
    positive once the score is negated).
  * ``fpr95``: the fraction of ID examples flagged as OOD at the first (highest)
    threshold on the negated score where the OOD true-positive rate is
    ``>= recall``; equal to ``fpr[argmax(tpr >= recall)]`` from
    ``sklearn.metrics.roc_curve(is_ood, -scores, drop_intermediate=False)``.
    OpenOOD calls ``roc_curve`` with its default ``drop_intermediate=True``, which
    drops collinear ROC points; the two agree whenever no score is tied and can
    differ (ours is never larger) only when tied groups make collinear points.
  * ``aupr_in`` / ``aupr_out``: trapezoid-rule area under the precision-recall
    curve, ``sklearn.metrics.auc(recall, precision)`` on
    ``precision_recall_curve`` (which starts at recall 0, precision 1), with ID
    positive on the scores / OOD positive on the negated scores.

``expected_calibration_error`` follows the LogitNorm paper (Wei et al., ICML
2022): 15 equal-width confidence bins, ``c`` in bin ``(lo, hi]``.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np

from ood_jax.losses import check_label_array

__all__ = ["accuracy", "expected_calibration_error", "ood_metrics"]

CONVENTIONS = ("hendrycks", "openood")


def _to_float64(x: Any, name: str, *, ndim: int) -> np.ndarray:
    array = np.asarray(x)
    dtype = array.dtype
    # jnp.issubdtype also knows bfloat16 and the other ml_dtypes floats.
    is_real = dtype == np.bool_ or (
        jnp.issubdtype(dtype, jnp.number) and not jnp.issubdtype(dtype, jnp.complexfloating)
    )
    if not is_real:
        raise ValueError(f"{name} must hold real numbers, got dtype {dtype}.")
    if array.ndim != ndim:
        expected = "a 1-D array [n]" if ndim == 1 else "a 2-D array [n, num_classes]"
        raise ValueError(
            f"{name} must be {expected}, got shape {array.shape}; "
            + ("flatten or concatenate the per-batch scores first." if ndim == 1 else "")
        )
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); pass at least one value.")
    array = array.astype(np.float64)
    bad = np.count_nonzero(~np.isfinite(array))
    if bad:
        raise ValueError(
            f"{name} contains {bad} NaN or infinite value(s) out of {array.size}; "
            "metrics are undefined for them: fix or drop those examples."
        )
    return array


def _check_labels(labels: Any, num_examples: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    check_label_array(labels, (num_examples, num_classes))
    if np.any((labels < 0) | (labels >= num_classes)):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in "
            f"[{labels.min()}, {labels.max()}]; drop unlabeled (-1) examples first."
        )
    return labels


def _step_average_precision(tp: np.ndarray, fp: np.ndarray) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n; tp/fp cumulative at thresholds, high to low."""
    recall = tp / tp[-1]
    precision = tp / (tp + fp)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _trapezoid_pr_area(tp: np.ndarray, fp: np.ndarray) -> float:
    """Trapezoid area under (recall, precision), starting from (0, 1) like sklearn."""
    recall = np.concatenate([[0.0], tp / tp[-1]])
    precision = np.concatenate([[1.0], tp / (tp + fp)])
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2.0))


def _nearest_recall_fpr(tp: np.ndarray, fp: np.ndarray, recall: float) -> float:
    """FPR at the threshold whose TPR is nearest to ``recall`` (Hendrycks et al.)."""
    num_pos = tp[-1]
    tpr = tp / num_pos
    # Thresholds below the first one that reaches full recall only add false positives.
    last = int(np.searchsorted(tp, num_pos))
    distance = np.abs(tpr[: last + 1] - recall)
    # The reference scans from low to high threshold and takes the first minimum,
    # i.e. the largest index here among equal distances.
    cutoff = int(np.flatnonzero(distance == distance.min())[-1])
    return float(fp[cutoff] / fp[-1])


def _first_reaching_fpr(tp: np.ndarray, fp: np.ndarray, recall: float) -> float:
    """FPR at the first (highest) threshold whose TPR >= ``recall`` (OpenOOD)."""
    tpr = tp / tp[-1]
    cutoff = int(np.argmax(tpr >= recall))
    return float(fp[cutoff] / fp[-1])


def ood_metrics(
    id_scores: Any,
    ood_scores: Any,
    *,
    convention: str = "hendrycks",
    recall: float = 0.95,
) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR at ``recall`` TPR for an OOD detector.

    See the module docstring for the exact definitions under each convention.

    Args:
      id_scores: ``[n_id]`` scores of in-distribution examples, higher = more ID.
      ood_scores: ``[n_ood]`` scores of out-of-distribution examples.
      convention: ``"hendrycks"`` (ID positive, nearest-recall FPR, step-wise AP)
        or ``"openood"`` (OOD positive, first-threshold FPR, trapezoid AUPR).
      recall: the true-positive rate of the FPR metric, in ``(0, 1]``. It is the
        ID recall under ``"hendrycks"`` and the OOD recall under ``"openood"``.

    Returns:
      ``{"auroc", "aupr_in", "aupr_out", "fpr95"}`` as Python floats in ``[0, 1]``
      (``"fpr95"`` is the FPR at ``recall``, whatever its value).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}.")
    if (
        not isinstance(recall, numbers.Real)
        or isinstance(recall, bool)
        or not 0.0 < float(recall) <= 1.0
    ):
        raise ValueError(f"recall must be a number in (0, 1], got {recall!r}.")
    recall = float(recall)
    id_scores = _to_float64(id_scores, "id_scores", ndim=1)
    ood_scores = _to_float64(ood_scores, "ood_scores", ndim=1)
    num_id, num_ood = id_scores.size, ood_scores.size

    scores = np.concatenate([id_scores, ood_scores])
    # Not a stable sort (stable is ~30% slower): the order inside a group of tied
    # scores never matters, only the counts at the end of each group are read.
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    # Index of the last example of each group of tied scores, from high to low score.
    group_end = np.append(np.flatnonzero(np.diff(sorted_scores)), scores.size - 1)
    # id_ge[i] / ood_ge[i]: ID / OOD examples scoring >= the i-th distinct value.
    id_ge = np.cumsum(order < num_id)[group_end]
    ood_ge = group_end + 1 - id_ge
    # Counts scoring <= each distinct value, from low to high score: the curve of
    # the negated score, needed when OOD is the positive class.
    ood_le = num_ood - np.concatenate([[0], ood_ge[:-1]])[::-1]
    id_le = num_id - np.concatenate([[0], id_ge[:-1]])[::-1]

    # Exact integer trapezoid sum: sum dFP * (TP_i + TP_{i-1}) / (2 n_id n_ood).
    twice_area = np.sum(np.diff(ood_ge, prepend=0) * (id_ge + np.concatenate([[0], id_ge[:-1]])))
    auroc = float(twice_area) / (2.0 * num_id * num_ood)

    if convention == "hendrycks":
        aupr_in = _step_average_precision(id_ge, ood_ge)
        aupr_out = _step_average_precision(ood_le, id_le)
        fpr = _nearest_recall_fpr(id_ge, ood_ge, recall)
    else:
        aupr_in = _trapezoid_pr_area(id_ge, ood_ge)
        aupr_out = _trapezoid_pr_area(ood_le, id_le)
        fpr = _first_reaching_fpr(ood_le, id_le, recall)
    return {"auroc": auroc, "aupr_in": aupr_in, "aupr_out": aupr_out, "fpr95": fpr}


def _softmax_confidence(logits: np.ndarray) -> np.ndarray:
    """max_k softmax(f)_k = 1 / sum_k exp(f_k - max f), stable in float64."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return 1.0 / np.exp(shifted).sum(axis=1)


def expected_calibration_error(logits: Any, labels: Any, *, num_bins: int = 15) -> float:
    r"""Expected calibration error of the softmax confidence.

    .. math:: \mathrm{ECE} = \sum_b \frac{|B_b|}{n}\,
              \bigl|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\bigr|

    The confidence is ``c = max_k softmax(f)_k`` and the prediction
    ``argmax_k f_k``; bin ``b`` holds the examples with ``lo_b < c <= hi_b`` for
    ``num_bins`` equal-width bins with edges ``np.linspace(0, 1, num_bins + 1)``
    (as in the LogitNorm code, Wei et al., ICML 2022; Guo et al., ICML 2017).
    Empty bins contribute 0.

    Args:
      logits: ``[n, num_classes]`` logits.
      labels: ``[n]`` integer labels in ``[0, num_classes)``.
      num_bins: number of equal-width bins, a positive integer.

    Returns:
      The ECE as a Python float in ``[0, 1]``.
    """
    if not isinstance(num_bins, numbers.Integral) or isinstance(num_bins, bool) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}.")
    logits = _to_float64(logits, "logits", ndim=2)
    labels = _check_labels(labels, *logits.shape)
    confidence = _softmax_confidence(logits)
    correct = (logits.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # side="left": a confidence equal to an edge hi goes to the bin (lo, hi].
    bins = np.searchsorted(edges, confidence, side="left") - 1
    bins = np.clip(bins, 0, num_bins - 1)
    gap = np.bincount(bins, weights=correct - confidence, minlength=num_bins)
    return float(np.sum(np.abs(gap)) / logits.shape[0])


def accuracy(logits: Any, labels: Any) -> float:
    """Top-1 accuracy: the fraction of rows with ``argmax_k logits[i, k] == labels[i]``.

    Args:
      logits: ``[n, num_classes]`` logits (or probabilities).
      labels: ``[n]`` integer labels in ``[0, num_classes)``.

    Returns:
      A Python float in ``[0, 1]``. Ties in the argmax go to the lowest class index.
    """
    logits = _to_float64(logits, "logits", ndim=2)
    labels = _check_labels(labels, *logits.shape)
    return float(np.mean(logits.argmax(axis=1) == labels))
