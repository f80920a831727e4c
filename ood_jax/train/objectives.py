"""Training objectives by name: each one runs the model itself.

An objective is a function

    loss(apply, batch, aux, key, **hparams) -> Loss(per_example [B], logits [B, K], metrics)

called inside the jitted, differentiated train step:

- ``apply(images, *, update_stats=True, train=True) -> (logits, features)``
  runs the model with the parameters being differentiated; outputs are
  float32 whatever the compute dtype. In training mode (BatchNorm on batch
  statistics, dropout on) the step keeps the BatchNorm statistics of the last
  pass made with ``update_stats=True``; passes with ``update_stats=False``
  leave the running statistics alone. ``train=False`` runs in evaluation mode
  (running statistics, no dropout), and ``frozen=True`` holds the parameters
  constant (no gradient flows back through that pass), as an attack inside the
  step (a ``jax.lax.fori_loop`` of input gradients) wants: it then costs its
  own forward/backward passes and nothing more.
- ``batch``: the in-distribution batch, ``{"image", "label", "mask"}``. Padded
  rows (``mask`` False) carry label 0 here, and the step leaves them out of the
  mean; BatchNorm still sees them.
- ``aux``: the auxiliary outlier batch ``{"image", ...}`` for objectives
  registered with ``uses_outliers=True``, else None.
- ``key``: a typed PRNG key, a pure function of the run seed and the step
  (``ood_jax.rng``), for in-step randomness (noise, attack starts).

It returns a :class:`Loss`: per-example losses on the in-distribution batch
(a term on outliers or noise is added to every example, so the masked mean is
``mean_in + term``), the in-distribution logits (for the step's accuracy and
logit-norm metrics) and optional extra scalar metrics.

Add an objective with :func:`register_objective` (its hyperparameter defaults
live in the registration and nowhere else); the train step, the configs and
the experiment runner do not change::

    @register_objective("my_loss", defaults={"weight": 0.5})
    def my_loss(apply, batch, aux, key, *, weight):
        logits, _ = apply(batch["image"])
        return Loss(losses.cross_entropy(logits, batch["label"]) * weight, logits)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from ood_jax import losses
from ood_jax.data.dataset import CIFAR10_MEAN, CIFAR10_STD
from ood_jax.registry import Registry

Batch = Mapping[str, jax.Array]
ApplyFn = Callable[..., tuple[jax.Array, jax.Array]]


@dataclass(frozen=True)
class Loss:
    """What an objective returns.

    Attributes:
      per_example: ``[B]`` losses on the in-distribution batch (masked mean = the loss).
      logits: ``[B, K]`` in-distribution logits, for the accuracy and logit-norm metrics.
      metrics: extra scalar metrics (e.g. the outlier term), averaged per epoch in logs.
    """

    per_example: jax.Array
    logits: jax.Array
    metrics: Mapping[str, jax.Array] = field(default_factory=dict)


ObjectiveFn = Callable[..., Loss]


@dataclass(frozen=True)
class Objective:
    """A registered training objective.

    Attributes:
      name: registry name (``--config.objective.name``).
      loss: ``loss(apply, batch, aux, key, **hparams) -> Loss``.
      defaults: every hyperparameter with its default; the only source of defaults.
      uses_outliers: the step must be given an auxiliary outlier batch.
      model_options: options the model must be created with (e.g.
        ``normalize_features=True`` for training-time L2 feature normalization).
      description: one line for ``--help`` style listings.
    """

    name: str
    loss: ObjectiveFn
    defaults: Mapping[str, Any] = field(default_factory=dict)
    uses_outliers: bool = False
    model_options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


_REGISTRY: Registry[Objective] = Registry("objective", "ood_jax.train.register_objective")


def register_objective(
    name: str | Objective,
    *,
    defaults: Mapping[str, Any] | None = None,
    uses_outliers: bool = False,
    model_options: Mapping[str, Any] | None = None,
    description: str = "",
    replace: bool = False,
):
    """Register an objective; use as a decorator or pass an :class:`Objective`.

    ``@register_objective("name", defaults={...})`` on a ``loss(apply, batch, aux,
    key, **hparams)`` function, or ``register_objective(Objective(...))``. Names are
    unique unless ``replace=True`` (re-running a notebook cell).
    """

    def add(objective: Objective) -> Objective:
        return _REGISTRY.add(objective, replace=replace)

    if isinstance(name, Objective):
        return add(name)

    def decorator(fn: ObjectiveFn) -> ObjectiveFn:
        add(
            Objective(
                name,
                fn,
                defaults=dict(defaults or {}),
                uses_outliers=uses_outliers,
                model_options=dict(model_options or {}),
                description=description or (fn.__doc__ or "").strip().split("\n")[0],
            )
        )
        return fn

    return decorator


def get_objective(name: str) -> Objective:
    """The registered objective called ``name``."""
    return _REGISTRY.get(name)


def available_objectives() -> list[str]:
    """Names of all registered objectives."""
    return sorted(_REGISTRY.names())


def resolve_hparams(name: str, hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The objective's defaults updated by ``hparams``; unknown names are an error.

    A typo such as ``temprature`` must not silently train with the default.
    """
    objective = get_objective(name)
    hparams = dict(hparams or {})
    unknown = sorted(set(hparams) - set(objective.defaults))
    if unknown:
        raise ValueError(
            f"objective {name!r} takes hyperparameters {sorted(objective.defaults) or 'none'}, "
            f"got unknown {unknown}."
        )
    return {**objective.defaults, **hparams}


def bind_objective(name: str, **hparams: Any) -> Callable[..., Loss]:
    """``loss(apply, batch, aux, key) -> Loss`` of objective ``name`` with its hyperparameters.

    Missing hyperparameters take the registered defaults; unknown ones raise.
    """
    objective = get_objective(name)
    bound = resolve_hparams(name, hparams)

    def loss(apply: ApplyFn, batch: Batch, aux: Batch | None, key: jax.Array) -> Loss:
        if objective.uses_outliers and aux is None:
            raise ValueError(
                f"objective {name!r} needs an auxiliary outlier batch (aux_batch); configure "
                "an outlier source (config.data.outliers)."
            )
        result = objective.loss(apply, batch, aux, key, **bound)
        if not isinstance(result, Loss):
            raise TypeError(
                f"objective {name!r} must return ood_jax.train.Loss(per_example, logits, "
                f"metrics), got {type(result).__name__}."
            )
        return result

    return loss


def forward_with_outliers(
    apply: ApplyFn, batch: Batch, aux: Batch
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """One forward pass over the in-distribution and outlier images together.

    As the outlier-exposure and energy repositories do, so that BatchNorm's batch
    statistics (and the running statistics kept) cover both. Returns
    ``((logits_in, features_in), (logits_out, features_out))``.
    """
    images = batch["image"]
    n = images.shape[0]
    logits, features = apply(jnp.concatenate([images, aux["image"].astype(images.dtype)]))
    return (logits[:n], features[:n]), (logits[n:], features[n:])


@register_objective("ce", description="softmax cross-entropy")
def cross_entropy(apply, batch, aux, key) -> Loss:
    logits, _ = apply(batch["image"])
    return Loss(losses.cross_entropy(logits, batch["label"]), logits)


@register_objective(
    "logitnorm",
    defaults={"temperature": 0.04},
    description="LogitNorm (Wei et al. 2022): CE on logits scaled to norm 1/tau",
)
def logitnorm(apply, batch, aux, key, *, temperature: float) -> Loss:
    logits, _ = apply(batch["image"])
    return Loss(losses.logitnorm_loss(logits, batch["label"], temperature=temperature), logits)


# Haas et al. (TMLR 2023): plain CE; the model L2-normalizes its features in training.
register_objective(
    Objective(
        "feature_norm",
        cross_entropy,
        model_options={"normalize_features": True},
        description="CE with training-time L2 feature normalization (Haas et al. 2023)",
    )
)


@register_objective(
    "outlier_exposure",
    defaults={"weight": 0.5},
    uses_outliers=True,
    description="Outlier exposure (Hendrycks et al. 2019): CE + weight * CE-to-uniform",
)
def outlier_exposure(apply, batch, aux, key, *, weight: float) -> Loss:
    (logits, _), (logits_out, _) = forward_with_outliers(apply, batch, aux)
    term = jnp.mean(losses.outlier_exposure_loss(logits_out))
    per_example = losses.cross_entropy(logits, batch["label"]) + weight * term
    return Loss(per_example, logits, {"outlier_term": term})


@register_objective(
    "energy",
    defaults={"weight": 0.1, "m_in": -23.0, "m_out": -5.0},
    uses_outliers=True,
    description="Energy-bounded learning (Liu et al. 2020): CE + weight * energy hinges",
)
def energy(apply, batch, aux, key, *, weight: float, m_in: float, m_out: float) -> Loss:
    (logits, _), (logits_out, _) = forward_with_outliers(apply, batch, aux)
    term = losses.energy_margin_loss(logits, logits_out, m_in=m_in, m_out=m_out)
    per_example = losses.cross_entropy(logits, batch["label"]) + weight * term
    return Loss(per_example, logits, {"energy_term": term})


_OUT_LOSSES = {"max_conf": losses.max_confidence_loss, "uniform": losses.outlier_exposure_loss}
_NOISE_DEFAULTS = {
    "weight": 1.0,
    "noise_fraction": 1.0,
    "frac_perm": 0.5,
    "lowpass": True,
    "out_loss": "max_conf",
    # The in-distribution set's normalization (the runner fills in the dataset's):
    # noise is made and attacked in [0, 1] pixel space.
    "mean": CIFAR10_MEAN,
    "std": CIFAR10_STD,
}


# The objective contract passes every registered hyperparameter as a keyword (ten here:
# CEDA's seven, ACET's three attack settings), so the registration checks each by name.
def _noise_objective(
    apply,
    batch,
    aux,
    key,
    *,
    weight: float,
    noise_fraction: float,
    frac_perm: float,
    lowpass: bool,
    out_loss: str,
    mean,
    std,
    attack_steps: int = 0,
    attack_eps: float = 0.3,
    attack_step_size: float = 0.0,
) -> Loss:
    # Hein et al. (CVPR 2019). The authors' loss is (sum_in CE + weight * sum_noise term) /
    # (N_in + N_noise) over one forward pass of both (BatchNorm sees both); written per
    # in-distribution example here so that the step's masked mean gives that value.
    from ood_jax import attacks

    if out_loss not in _OUT_LOSSES:
        raise ValueError(f"out_loss must be one of {sorted(_OUT_LOSSES)}, got {out_loss!r}.")
    x = batch["image"]
    n = x.shape[0]
    num = max(1, int(round(noise_fraction * n)))
    m = jnp.asarray(mean, jnp.float32)
    s = jnp.asarray(std, jnp.float32)
    to_model = lambda u: ((u - m) / s).astype(x.dtype)
    k_noise, k_attack = jax.random.split(key)
    noise = attacks.noise_batch(
        jnp.clip(x * s + m, 0.0, 1.0), k_noise, num=num, frac_perm=frac_perm, lowpass=lowpass
    )
    if attack_steps > 0:
        # ACET: the authors attack with running BatchNorm statistics (evaluation mode).
        noise = attacks.pgd_confidence(
            lambda u: apply(to_model(u), train=False, frozen=True)[0],
            noise,
            k_attack,
            eps=attack_eps,
            steps=int(attack_steps),
            step_size=attack_step_size or None,
        )
    logits_all, _ = apply(jnp.concatenate([x, to_model(noise)], axis=0))
    logits, logits_noise = logits_all[:n], logits_all[n:]
    term = jnp.mean(_OUT_LOSSES[out_loss](logits_noise))
    per_example = (losses.cross_entropy(logits, batch["label"]) + weight * (num / n) * term) * (
        n / (n + num)
    )
    noise_mmc = jnp.mean(jnp.max(jax.nn.softmax(logits_noise), axis=-1))
    return Loss(per_example, logits, {"noise_term": term, "noise_mmc": noise_mmc})


register_objective(
    Objective(
        "ceda",
        _noise_objective,
        defaults=dict(_NOISE_DEFAULTS),
        description="CEDA (Hein et al. 2019): CE + low confidence on low-pass noise",
    )
)
register_objective(
    Objective(
        "acet",
        _noise_objective,
        defaults={
            **_NOISE_DEFAULTS,
            "attack_steps": 40,
            "attack_eps": 0.3,
            "attack_step_size": 0.0,  # 0 = attack_eps / attack_steps, the authors' choice
        },
        description="ACET (Hein et al. 2019): CE + low confidence on noise attacked by PGD",
    )
)
