"""Diagnostics of softmax confidence (Pearce et al. 2021) and of training.

Pearce et al. argue softmax confidence tracks epistemic uncertainty through
two implicit biases, which these functions measure:

* decision-boundary structure: final-layer weight vectors ``w_k`` of equal
  norm, zero bias, and pairwise cosine ``-1 / (K - 1)`` (a regular simplex);
* feature filtering: OOD inputs give a smaller ``||z||`` and a smaller cosine
  between ``z`` and the predicted class's weight vector.

Plus the logit norm over training, read from the workdir's ``metrics.jsonl``
(LogitNorm's argument: cross-entropy keeps growing ``||f||``), and where a
set's features fall relative to the class means in the Mahalanobis metric
(:func:`mahalanobis_split`: which directions a squared distance comes from).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def summarize(values: np.ndarray) -> dict[str, float]:
    """Mean, std, min, max and the 5/25/50/75/95% quantiles of a 1-D array."""
    values = np.asarray(values, np.float64)
    out = {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }
    for q, v in zip(_QUANTILES, np.quantile(values, _QUANTILES), strict=True):
        out[f"q{round(q * 100):02d}"] = float(v)
    return out


def weight_diagnostics(head_kernel: np.ndarray, head_bias: np.ndarray | None) -> dict:
    """Geometry of the final layer's class weight vectors.

    ``cos_ij = <w_i, w_j> / (||w_i|| ||w_j||)`` for ``i < j``, where ``w_k`` is
    column ``k`` of ``head_kernel``; the optimum (regular simplex) is
    ``-1 / (K - 1)`` for every pair (Pearce et al. 2021, Sec. 4).

    Args:
      head_kernel: ``[D, K]`` (Flax ``nnx.Linear`` layout).
      head_bias: ``[K]`` or None.

    Returns:
      dict with ``num_classes``, ``optimal_cosine``, ``pairwise_cosines``
      (``[K, K]`` list), ``cosine`` (summary of the ``K(K-1)/2`` pairs),
      ``cosine_mean_abs_deviation`` (mean ``|cos_ij + 1/(K-1)|``), ``norms``
      (``[K]``), ``norm`` (summary), ``norm_cv`` (std / mean of the norms),
      ``biases`` (``[K]`` or None).
    """
    w = np.asarray(head_kernel, np.float64)
    if w.ndim != 2 or w.shape[1] < 2:
        raise ValueError(f"head_kernel must be [D, K] with K >= 2 classes, got shape {w.shape}.")
    k = w.shape[1]
    norms = np.linalg.norm(w, axis=0)
    unit = w / np.maximum(norms, 1e-12)
    cos = unit.T @ unit
    pairs = cos[np.triu_indices(k, 1)]
    optimal = -1.0 / (k - 1)
    return {
        "num_classes": k,
        "optimal_cosine": optimal,
        "pairwise_cosines": cos.tolist(),
        "cosine": summarize(pairs),
        "cosine_mean_abs_deviation": float(np.abs(pairs - optimal).mean()),
        "norms": norms.tolist(),
        "norm": summarize(norms),
        "norm_cv": float(norms.std() / norms.mean()),
        "biases": None if head_bias is None else np.asarray(head_bias, np.float64).tolist(),
    }


def feature_geometry(
    logits: np.ndarray, features: np.ndarray, head_kernel: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-example ``||z||``, ``cos(z, w_pred)`` with ``pred = argmax(logits)``, and the
    mean logit.

    The mean logit ``mean_k f_k(x)`` is the part every class's logit shares (the
    head's mean weight vector times ``z``, plus the mean bias): softmax scores
    ignore it, energy and max-logit do not.

    Args:
      logits: ``[N, K]``; features: ``[N, D]``; head_kernel: ``[D, K]``.

    Returns:
      ``{"feature_norm": [N], "cos_pred": [N], "mean_logit": [N]}`` (float64).
    """
    z = np.asarray(features, np.float64)
    w = np.asarray(head_kernel, np.float64)
    if z.shape[1] != w.shape[0]:
        raise ValueError(
            f"features have {z.shape[1]} dims but head_kernel expects {w.shape[0]}; "
            "pass the penultimate features of the same model."
        )
    w_pred = w[:, np.argmax(logits, axis=-1)].T
    z_norm = np.linalg.norm(z, axis=-1)
    cos = np.sum(z * w_pred, axis=-1) / np.maximum(z_norm * np.linalg.norm(w_pred, axis=-1), 1e-12)
    mean_logit = np.asarray(logits, np.float64).mean(axis=-1)
    return {"feature_norm": z_norm, "cos_pred": cos, "mean_logit": mean_logit}


def read_metrics_log(workdir: str, *, filename: str = "metrics.jsonl") -> list[dict]:
    """Rows of ``workdir/metrics.jsonl`` (one JSON object per line); [] if absent.

    A torn last line (an interrupted write) is skipped with a warning.
    """
    from ood_jax.train.logging import read_records

    path = os.path.join(workdir, filename)
    return read_records(path)[0] if os.path.exists(path) else []


def logit_norm_curve(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Every logged logit-norm series: key -> ``{"step": [...], "value": [...]}``.

    A series is any numeric key containing ``"logit_norm"`` (e.g.
    ``train/logit_norm``, ``test/logit_norm``); the x axis is the row's
    ``step`` (or ``epoch``, or the row number).
    """
    curves: dict[str, dict[str, list[float]]] = {}
    for i, row in enumerate(rows):
        x = row.get("step", row.get("epoch", i))
        for key, value in row.items():
            if "logit_norm" in key and isinstance(value, int | float):
                curve = curves.setdefault(key, {"step": [], "value": []})
                curve["step"].append(float(x))
                curve["value"].append(float(value))
    return curves


def mahalanobis_split(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    features: Mapping[str, np.ndarray],
    *,
    num_top: int | None = None,
    shrinkage: float = 1e-6,
    normalize: bool = False,
    chunk: int = 2048,
) -> dict[str, dict[str, np.ndarray]]:
    r"""Each example's squared Mahalanobis distance to its nearest class mean, split by
    the directions it comes from.

    With the tied covariance of :func:`ood_jax.scores.fit_mahalanobis` (class-centered
    training features, ridge ``shrinkage * trace / D``) written as
    ``Sigma = sum_i lambda_i u_i u_i^T``, the squared distance to class ``c`` is
    ``sum_i <z - mu_c, u_i>^2 / lambda_i``: whitening divides each direction's
    squared offset by its variance. ``top`` sums the ``num_top`` directions of
    largest variance (default ``K - 1``, as many as the class means span), ``rest``
    the others, which whitening amplifies most. ``total = top + rest`` equals
    ``-mahalanobis_score``.

    Args:
      train_features: ``[N, D]``; train_labels: ``[N]`` in ``[0, K)``, every class present.
      features: set name -> ``[M, D]`` features to place.
      num_top: how many largest-variance directions go into ``top``.
      shrinkage: the covariance ridge (the score's default).
      normalize: L2-normalize every feature first (the ``mahalanobis_l2`` score's space).
      chunk: examples per block (memory ``chunk * K * D`` float64).

    Returns:
      ``{name: {"total", "top", "rest": [M] float64, "nearest": [M] int}}``.
    """

    def prep(z):
        z = np.asarray(z, np.float64)
        if normalize:
            z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
        return z

    x = prep(train_features)
    labels = np.asarray(train_labels)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(
            f"train_features must be [N, D] and train_labels [N], got {x.shape} and {labels.shape}."
        )
    num_classes = int(labels.max()) + 1
    if labels.min() < 0 or len(np.unique(labels)) != num_classes:
        raise ValueError(
            f"train_labels must cover every class in [0, {num_classes}) with no negatives."
        )
    dim = x.shape[1]
    num_top = num_classes - 1 if num_top is None else int(num_top)
    if not 0 <= num_top <= dim:
        raise ValueError(f"num_top must be in [0, {dim}], got {num_top}.")
    means = np.stack([x[labels == c].mean(axis=0) for c in range(num_classes)])
    centered = x - means[labels]
    cov = centered.T @ centered / x.shape[0]
    mean_eig = float(np.trace(cov)) / dim
    eigvals, eigvecs = np.linalg.eigh(cov)  # ascending
    eigvals = np.clip(eigvals, 0.0, None) + (shrinkage * mean_eig if mean_eig > 0 else shrinkage)
    scale = eigvecs / np.sqrt(eigvals)  # whitening in the eigenbasis
    white_means = means @ scale
    is_top = np.arange(dim) >= dim - num_top
    out = {}
    for name, z in features.items():
        z = prep(z)
        if z.ndim != 2 or z.shape[1] != dim:
            raise ValueError(f"features[{name!r}] must be [M, {dim}], got {z.shape}.")
        parts = {k: np.empty(len(z)) for k in ("total", "top", "rest")}
        nearest = np.empty(len(z), np.int64)
        for start in range(0, len(z), chunk):
            w = z[start : start + chunk] @ scale
            sq = np.square(w[:, None, :] - white_means[None])  # [m, K, D]
            best = np.argmin(sq.sum(axis=-1), axis=1)
            at = sq[np.arange(len(w)), best]  # [m, D]
            sl = slice(start, start + len(w))
            parts["top"][sl] = at[:, is_top].sum(axis=1)
            parts["rest"][sl] = at[:, ~is_top].sum(axis=1)
            parts["total"][sl] = parts["top"][sl] + parts["rest"][sl]
            nearest[sl] = best
        out[name] = {**parts, "nearest": nearest}
    return out
