"""Evaluation: one forward pass per dataset, vmapped scores, the papers' tables.

- ``forward``: :class:`ForwardPass` (jitted, sharded over the ``"data"`` mesh
  axis) -> :class:`ModelOutputs` (logits + penultimate features, NumPy).
- ``sweep``: every ``ood_jax.scores`` score from the cached outputs, vmapped
  over score settings (temperatures); ODIN from images.
- ``protocol``: the papers' protocol (2,000 OOD examples, 10 seeded draws,
  mean and std) and full sets, in the Hendrycks or OpenOOD convention.
- ``diagnostics``: final-layer weight geometry, ``||z||`` and
  ``cos(z, w_pred)`` distributions (Pearce et al. 2021), logit norm over training.
- ``report`` / ``plots``: ``results.json``, ``results.md``, PNGs, written atomically.
- ``datasets``: OOD sets by name (offline files, tfds, synthetic noise).
- ``runner``: :func:`run_evaluation` (a model + datasets -> results + report).

A training workdir's checkpoint is evaluated by ``python -m experiments.evaluate``
(``experiments.evaluate.evaluate_workdir``), which restores the model and calls
:func:`run_evaluation`; the training experiments call it at the end of training.
"""

from ood_jax.evaluate.datasets import OFFLINE_OOD_SETS, SYNTHETIC_NAMES, load_ood_sets
from ood_jax.evaluate.diagnostics import (
    feature_geometry,
    logit_norm_curve,
    read_metrics_log,
    weight_diagnostics,
)
from ood_jax.evaluate.forward import ForwardPass, ModelOutputs
from ood_jax.evaluate.protocol import METRIC_NAMES, PROTOCOLS, draw_indices, evaluate_ood
from ood_jax.evaluate.report import atomic_directory, markdown_report
from ood_jax.evaluate.runner import DEFAULT_SCORES, head_weights, run_evaluation
from ood_jax.evaluate.sweep import (
    SCORE_NAMES,
    ScoreSettings,
    fit_scores,
    make_odin_fn,
    score_key,
    score_outputs,
)

__all__ = [
    "DEFAULT_SCORES",
    "OFFLINE_OOD_SETS",
    "SYNTHETIC_NAMES",
    "load_ood_sets",
    "METRIC_NAMES",
    "PROTOCOLS",
    "SCORE_NAMES",
    "ForwardPass",
    "ModelOutputs",
    "ScoreSettings",
    "atomic_directory",
    "draw_indices",
    "evaluate_ood",
    "feature_geometry",
    "fit_scores",
    "head_weights",
    "logit_norm_curve",
    "make_odin_fn",
    "markdown_report",
    "read_metrics_log",
    "run_evaluation",
    "score_key",
    "score_outputs",
    "weight_diagnostics",
]
