"""Training objectives by name, all built from :mod:`ood_jax.losses`.

An objective maps one forward pass to per-example losses. It receives the
in-distribution outputs and, when the objective uses auxiliary outliers
(outlier exposure, energy fine-tuning, ACET/CEDA), the outputs on the outlier
batch; the train step concatenates both batches into one forward pass (as the
energy and OE repositories do, so BatchNorm sees both) and splits the outputs.

Add an objective by writing its loss function and registering it with
:func:`register_objective`; the train step does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from ood_jax import losses


@dataclass(frozen=True)
class Outputs:
    """Model outputs on one batch: ``logits [B, K]`` and penultimate ``features [B, D]``."""

    logits: jax.Array
    features: jax.Array


@dataclass(frozen=True)
class Objective:
    """A named training objective.

    Attributes:
      name: registry name.
      loss: ``loss(inputs, labels, outliers, **hparams) -> [B]`` per-example losses on the
        in-distribution batch (a term on ``outliers`` is added to each example, so that
        the masked mean gives ``mean_in + term_out``). ``outliers`` is None unless
        ``uses_outliers``.
      uses_outliers: whether the objective needs the auxiliary outlier batch.
      model_options: options the model must be created with (e.g.
        ``normalize_features=True`` for L2 feature normalization).
      defaults: default hyperparameters, overridable by keyword.
    """

    name: str
    loss: Callable[..., jax.Array]
    uses_outliers: bool = False
    model_options: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    """Add ``objective`` to the registry under ``objective.name`` (names are unique)."""
    if objective.name in _REGISTRY:
        raise ValueError(f"objective {objective.name!r} is already registered.")
    _REGISTRY[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    """The registered objective called ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"objective must be one of {sorted(_REGISTRY)}, got {name!r}.")
    return _REGISTRY[name]


def available_objectives() -> list[str]:
    """Names of all registered objectives."""
    return sorted(_REGISTRY)


def _ce(inputs: Outputs, labels: jax.Array, outliers: Outputs | None) -> jax.Array:
    return losses.cross_entropy(inputs.logits, labels)


def _logitnorm(
    inputs: Outputs, labels: jax.Array, outliers: Outputs | None, *, temperature: float
) -> jax.Array:
    return losses.logitnorm_loss(inputs.logits, labels, temperature=temperature)


def _outlier_exposure(
    inputs: Outputs, labels: jax.Array, outliers: Outputs | None, *, weight: float
) -> jax.Array:
    # Hendrycks et al. (ICLR 2019): CE + lambda * mean CE-to-uniform over the outliers.
    term = jnp.mean(losses.outlier_exposure_loss(outliers.logits))
    return losses.cross_entropy(inputs.logits, labels) + weight * term


def _energy(
    inputs: Outputs,
    labels: jax.Array,
    outliers: Outputs | None,
    *,
    weight: float,
    m_in: float,
    m_out: float,
) -> jax.Array:
    # Liu et al. (NeurIPS 2020): CE + lambda * squared-hinge energy margins.
    term = losses.energy_margin_loss(inputs.logits, outliers.logits, m_in=m_in, m_out=m_out)
    return losses.cross_entropy(inputs.logits, labels) + weight * term


register_objective(Objective("ce", _ce))
register_objective(Objective("logitnorm", _logitnorm, defaults={"temperature": 0.04}))
# Haas et al. (TMLR 2023): plain CE; the model L2-normalizes its features in training.
register_objective(Objective("feature_norm", _ce, model_options={"normalize_features": True}))
register_objective(
    Objective("outlier_exposure", _outlier_exposure, uses_outliers=True, defaults={"weight": 0.5})
)
register_objective(
    Objective(
        "energy",
        _energy,
        uses_outliers=True,
        defaults={"weight": 0.1, "m_in": -23.0, "m_out": -5.0},
    )
)


def bind_objective(name: str, **hparams: Any) -> Callable[..., jax.Array]:
    """``loss(inputs, labels, outliers)`` of objective ``name`` with its hyperparameters set.

    Missing hyperparameters take the objective's defaults; unknown ones are an error
    (a typo such as ``temprature`` must not silently train with the default).
    """
    objective = get_objective(name)
    unknown = set(hparams) - set(objective.defaults)
    if unknown:
        raise ValueError(
            f"objective {name!r} takes hyperparameters {sorted(objective.defaults)}, "
            f"got unknown {sorted(unknown)}."
        )
    bound = {**objective.defaults, **hparams}

    def loss(inputs: Outputs, labels: jax.Array, outliers: Outputs | None) -> jax.Array:
        if objective.uses_outliers and outliers is None:
            raise ValueError(f"objective {name!r} needs an auxiliary outlier batch (aux_batch).")
        return objective.loss(inputs, labels, outliers, **bound)

    loss.uses_outliers = objective.uses_outliers  # type: ignore[attr-defined]
    return loss
