"""What the fitted scores share: the ``fit_*`` / ``*_score`` contract and its input checks.

Each fitted method is a pair: ``fit_*(train_features, train_labels, ...) -> params``
runs once on the host in float64 NumPy (it is *not* jit-able: it validates
labels and factorizes covariances; KNN and ReAct ignore the labels), and
``*_score(params, features, ...)`` is a pure JAX function, safe under
``jax.jit`` and ``jax.vmap``, returning one float32 value per example.
**Higher means more in-distribution** for every score. ``params`` are
``flax.struct`` dataclasses of arrays (pytrees), so they can be saved, sharded
or passed through ``jit``.

Shapes: ``train_features [N, D]``, ``train_labels [N]`` integer in
``[0, num_classes)``, scored ``features [..., D]`` -> scores ``[...]``.

The methods: :mod:`ood_jax.scores.gaussian` (Mahalanobis, class-conditional
GMM), :mod:`ood_jax.scores.knn`, :mod:`ood_jax.scores.react`. Matmuls use
``Precision.HIGHEST`` (:data:`HIGHEST`) so accelerators do not silently round
to bfloat16.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.typing import ArrayLike

from ood_jax.scores.logit import _as_float

HIGHEST = jax.lax.Precision.HIGHEST


def _train_features(train_features: ArrayLike, dtype: type = np.float64) -> np.ndarray:
    x = np.asarray(train_features, dtype=dtype)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(
            f"train_features must be a non-empty 2-D array [num_examples, feature_dim], "
            f"got shape {x.shape}. Flatten or stack your features first."
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("train_features contains NaN or Inf; remove or fix those examples.")
    return x


def _train_labels(
    train_labels: ArrayLike, num_examples: int, num_classes: int | None
) -> tuple[np.ndarray, int]:
    """Validates labels and returns them with the number of classes."""
    labels = np.asarray(train_labels)
    if labels.shape != (num_examples,):
        raise ValueError(
            f"train_labels must have shape [{num_examples}] (one label per row of "
            f"train_features), got shape {labels.shape}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"train_labels must be integers, got dtype {labels.dtype}.")
    if labels.min() < 0:
        raise ValueError(
            "train_labels contains negative values (e.g. -1 for 'no label'); fit only on "
            "labelled in-distribution examples."
        )
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    elif labels.max() >= num_classes:
        raise ValueError(
            f"train_labels contains {int(labels.max())} but num_classes={num_classes}; "
            f"labels must lie in [0, num_classes)."
        )
    counts = np.bincount(labels, minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise ValueError(
            f"train_labels do not cover all {num_classes} classes: no examples for class(es) "
            f"{missing.tolist()[:20]}. Fit on a set with every class, or pass the right "
            f"num_classes."
        )
    return labels, num_classes


def _check_unused_labels(train_labels: ArrayLike | None, num_examples: int) -> None:
    """Catches ``fit_react(x, 95)``: a hyperparameter passed where the labels go."""
    if train_labels is not None and np.shape(train_labels) != (num_examples,):
        raise ValueError(
            f"train_labels (unused here) must be None or have shape [{num_examples}], got "
            f"{train_labels!r:.60}. Hyperparameters are keyword-only, e.g. percentile=95."
        )


def _score_features(features: ArrayLike, feature_dim: int) -> jax.Array:
    """Upcasts ``features`` and checks their last axis against the fitted dimension."""
    z = _as_float(features, "features")
    if z.shape[-1] != feature_dim:
        raise ValueError(
            f"features have dimension {z.shape[-1]} (shape {z.shape}) but the params were "
            f"fitted on {feature_dim}-dimensional features; use the same layer's features."
        )
    return z


def _labels_below(train_labels: ArrayLike, num_examples: int, num_classes: int) -> np.ndarray:
    """:func:`_train_labels`, which must also lie below the logits' ``num_classes``."""
    labels, found = _train_labels(train_labels, num_examples, None)
    if found > num_classes:
        raise ValueError(
            f"train_labels contains {found - 1} but the logits have {num_classes} classes."
        )
    return labels
