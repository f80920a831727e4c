"""Evaluation: one forward pass per dataset, vmapped scores, the papers' tables.

- ``forward``: :class:`ForwardPass` (jitted, sharded over the ``"data"`` mesh
  axis) -> :class:`ModelOutputs` (logits + penultimate features, NumPy).
- ``scoring``: every registered score (``ood_jax.scores.registry``): fitted
  statistics, scores from the cached outputs (swept settings vmapped), scores
  that need images and the model (ODIN).
- ``protocol``: the papers' protocol (2,000 OOD examples, 10 seeded draws,
  mean and std) and full sets, in the Hendrycks or OpenOOD convention.
- ``diagnostics``: final-layer weight geometry, ``||z||`` and
  ``cos(z, w_pred)`` distributions (Pearce et al. 2021), logit norm over training.
- ``report`` / ``plots``: ``results.json``, ``results.md``, PNGs, written atomically.
- ``datasets``: OOD sets by name (offline files, tfds, synthetic noise).
- ``spec``: :class:`EvalSpec`, what an evaluation computes (frozen, validated,
  stored in ``results.json``).
- ``stages``: outputs -> fits -> scores -> protocols -> summaries, each a function.
- ``tuning``: the fit stage with its optional search: hyperparameters chosen on a
  validation pair (held-out ID training images vs an OOD set that is no test set).
- ``runner``: :func:`run_evaluation` (a model + a spec + datasets -> results +
  report), :func:`evaluate_model` (any JAX classifier, one call, every detector it
  can serve) and :func:`write_report`.
- ``adapters``: the model contract and :func:`as_classifier` (a Flax NNX or linen
  module, or a function, as that contract), what a model can serve.

A training workdir's checkpoint is evaluated by ``python -m experiments.evaluate``
(``experiments.evaluate.evaluate_workdir``); it and the end of training both go
through ``experiments.evaluation.ood_report`` (``config.eval`` -> :class:`EvalSpec`
-> :func:`run_evaluation`).
"""

from ood_jax.evaluate.adapters import as_classifier, capabilities, servable_scores
from ood_jax.evaluate.datasets import (
    OFFLINE_OOD_SETS,
    SYNTHETIC_NAMES,
    check_ood_set_names,
    load_ood_sets,
)
from ood_jax.evaluate.diagnostics import (
    feature_geometry,
    logit_norm_curve,
    mahalanobis_split,
    read_metrics_log,
    weight_diagnostics,
)
from ood_jax.evaluate.forward import ForwardPass, ModelOutputs
from ood_jax.evaluate.protocol import (
    METRIC_NAMES,
    PROTOCOLS,
    dataset_seeds,
    draw_indices,
    evaluate_ood,
)
from ood_jax.evaluate.report import atomic_directory, markdown_report, report_scalars
from ood_jax.evaluate.runner import evaluate_model, run_evaluation, write_report
from ood_jax.evaluate.scoring import fit_captured, fit_scores, score_images, score_outputs
from ood_jax.evaluate.spec import EvalSpec
from ood_jax.evaluate.stages import (
    ScoreTable,
    classification_summary,
    compute_outputs,
    compute_scores,
    evaluate_protocols,
    head_weights,
    max_softmax,
    without_non_finite,
)

__all__ = [
    "METRIC_NAMES",
    "OFFLINE_OOD_SETS",
    "PROTOCOLS",
    "SYNTHETIC_NAMES",
    "EvalSpec",
    "ForwardPass",
    "ModelOutputs",
    "ScoreTable",
    "as_classifier",
    "atomic_directory",
    "capabilities",
    "check_ood_set_names",
    "classification_summary",
    "compute_outputs",
    "compute_scores",
    "dataset_seeds",
    "draw_indices",
    "evaluate_model",
    "evaluate_ood",
    "evaluate_protocols",
    "feature_geometry",
    "fit_captured",
    "fit_scores",
    "head_weights",
    "load_ood_sets",
    "logit_norm_curve",
    "mahalanobis_split",
    "markdown_report",
    "report_scalars",
    "max_softmax",
    "read_metrics_log",
    "run_evaluation",
    "score_images",
    "without_non_finite",
    "score_outputs",
    "servable_scores",
    "weight_diagnostics",
    "write_report",
]
