"""PNG plots of an evaluation.

Figures are built as ``matplotlib.figure.Figure`` objects and saved with their
own Agg canvas, never through ``pyplot``: importing this module changes no
global matplotlib state (a notebook keeps its inline backend).

Each function draws one figure and saves it to ``path``:

* :func:`score_histograms`: a score's distribution, ID vs each OOD set;
* :func:`roc_curves`: ROC curves of a score, one per OOD set (ID positive);
* :func:`reliability_diagram`: accuracy vs confidence in equal-width bins;
* :func:`distribution_plot`: e.g. ``||z||`` or ``cos(z, w_pred)``, ID vs OOD;
* :func:`logit_norm_plot`: the logit norm over training.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure


def roc_curve(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the detector "ID if score >= t" over all distinct thresholds t.

    ``tpr`` = fraction of ID scores >= t, ``fpr`` = fraction of OOD scores >= t,
    from t = +inf (0, 0) down to the smallest score (1, 1).
    """
    thresholds = np.unique(np.concatenate([id_scores, ood_scores]))[::-1]
    id_sorted, ood_sorted = np.sort(id_scores), np.sort(ood_scores)
    tpr = 1.0 - np.searchsorted(id_sorted, thresholds, side="left") / len(id_sorted)
    fpr = 1.0 - np.searchsorted(ood_sorted, thresholds, side="left") / len(ood_sorted)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def save_figure(fig: Figure, path: str) -> None:
    """Lays ``fig`` out tightly and writes it to ``path`` (PNG, 100 dpi)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)  # a bare Figure saves through its own Agg canvas


def _figure(rows: int = 1, cols: int = 1, *, figsize: tuple[float, float]):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _one(*, figsize: tuple[float, float]):
    fig, axes = _figure(figsize=figsize)
    return fig, axes[0, 0]


def figure_grid(n: int) -> tuple[Figure, np.ndarray]:
    """A figure with ``n`` panels, at most 3 per row, and its axes in order (flat); the
    unused panels of the last row are hidden."""
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = _figure(rows, cols, figsize=(4.2 * cols, 3.2 * rows))
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


TAIL = 0.005


def robust_edges(*arrays: np.ndarray, bins: int = 50, tail: float = TAIL) -> np.ndarray:
    """Histogram bin edges over the central ``1 - 2 * tail`` of the pooled finite values.

    A few extreme values (Mahalanobis scores of -1500 among values near -50) would
    otherwise squeeze the bulk into two or three bins; values beyond the edges are
    drawn in the outermost bins (see :func:`clipped`).
    """
    pooled = np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64)
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        return np.linspace(0.0, 1.0, bins + 1)
    lo, hi = np.quantile(pooled, [tail, 1.0 - tail])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def clipped(values: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, int]:
    """``values`` clipped into ``[edges[0], edges[-1]]`` and how many were outside."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    outside = int(np.sum((values < edges[0]) | (values > edges[-1])))
    return np.clip(values, edges[0], edges[-1]), outside


def distribution_plot(
    id_values: np.ndarray,
    ood_values: Mapping[str, np.ndarray],
    path: str,
    *,
    title: str,
    id_name: str = "ID",
    bins: int = 50,
    xlabel: str | None = None,
) -> None:
    """Histograms (densities) of ID values against each OOD set, one panel per set.

    The range covers the central 99% of each panel's values (:func:`robust_edges`);
    the few beyond it are counted in the outermost bins and in the panel's title.
    """
    fig, axes = figure_grid(len(ood_values))
    for ax, (name, values) in zip(axes, ood_values.items(), strict=False):
        edges = robust_edges(id_values, values, bins=bins)
        shown_id, out_id = clipped(id_values, edges)
        shown, out = clipped(values, edges)
        ax.hist(shown_id, bins=edges, density=True, alpha=0.5, label=id_name, histtype="stepfilled")
        ax.hist(shown, bins=edges, density=True, alpha=0.5, label=name, histtype="stepfilled")
        beyond = f" ({out_id + out} beyond the range, in the end bins)" if out_id + out else ""
        ax.set_title(f"{name}{beyond}", fontsize=8)
        ax.set_xlabel(xlabel or title.split(":")[0], fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.legend(fontsize=7, loc="best", framealpha=0.6)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def score_histograms(
    id_scores: np.ndarray,
    ood_scores: Mapping[str, np.ndarray],
    path: str,
    *,
    score_name: str,
    id_name: str = "ID",
) -> None:
    """Score distributions, ID vs each OOD set (higher score = more in-distribution)."""
    distribution_plot(
        id_scores, ood_scores, path, title=f"{score_name} score: ID vs OOD", id_name=id_name
    )


def roc_curves(
    id_scores: np.ndarray,
    ood_scores: Mapping[str, np.ndarray],
    path: str,
    *,
    score_name: str,
    aurocs: Mapping[str, float] | None = None,
) -> None:
    """ROC curves (ID positive) of one score, one curve per OOD set."""
    fig, ax = _one(figsize=(4.5, 4.2))
    for name, values in ood_scores.items():
        fpr, tpr = roc_curve(id_scores, values)
        label = name if aurocs is None else f"{name} (AUROC {100 * aurocs[name]:.2f})"
        ax.plot(fpr, tpr, label=label, linewidth=1.2)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    ax.axhline(0.95, color="grey", linestyle="--", linewidth=0.6)
    ax.set_xlabel("FPR (OOD accepted)")
    ax.set_ylabel("TPR (ID recall)")
    ax.set_title(f"ROC: {score_name}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def reliability_bins(
    confidence: np.ndarray, correct: np.ndarray, *, num_bins: int = 15
) -> dict[str, np.ndarray]:
    """Per-bin count, mean confidence and accuracy; bin b holds lo_b < c <= hi_b."""
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    idx = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    count = np.bincount(idx, minlength=num_bins).astype(np.float64)
    safe = np.maximum(count, 1)
    return {
        "edges": edges,
        "count": count,
        "confidence": np.bincount(idx, weights=confidence, minlength=num_bins) / safe,
        "accuracy": np.bincount(idx, weights=correct, minlength=num_bins) / safe,
    }


def reliability_diagram(
    confidence: np.ndarray,
    correct: np.ndarray,
    path: str,
    *,
    ece: float,
    num_bins: int = 15,
) -> None:
    """Accuracy per confidence bin against the diagonal (perfect calibration)."""
    b = reliability_bins(confidence, correct.astype(np.float64), num_bins=num_bins)
    width = 1.0 / num_bins
    centers = b["edges"][:-1] + width / 2
    nonempty = b["count"] > 0
    fig, ax = _one(figsize=(4.2, 4.2))
    ax.bar(
        centers[nonempty],
        b["accuracy"][nonempty],
        width=width,
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    gap = b["confidence"][nonempty] - b["accuracy"][nonempty]
    ax.bar(
        centers[nonempty],
        gap,
        bottom=b["accuracy"][nonempty],
        width=width,
        color="red",
        alpha=0.3,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability ({num_bins} bins), ECE {100 * ece:.2f}%", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, path)


def logit_norm_plot(curves: Mapping[str, Mapping[str, list[float]]], path: str) -> None:
    """The logit norm over training, one line per logged series."""
    fig, ax = _one(figsize=(5, 3.5))
    for key, curve in curves.items():
        ax.plot(curve["step"], curve["value"], label=key, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("mean ||f(x)||")
    ax.set_title("Logit norm over training", fontsize=10)
    ax.legend(fontsize=7)
    save_figure(fig, path)
