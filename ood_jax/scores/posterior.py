"""Scores of the softmax posterior: temperature scaling, KL matching and GEN.

Temperature scaling and KL matching fit a few statistics of the in-distribution
logits (the ``fit_*`` / ``*_score`` contract of :mod:`ood_jax.scores.fitted`,
with logits in place of features); GEN needs the logits only.
"""

from __future__ import annotations

import functools
import numbers

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.special
from jax.typing import ArrayLike

from ood_jax.scores.fitted import _labels_below, _train_features
from ood_jax.scores.logit import _as_float, msp

__all__ = [
    "KLMatchingParams",
    "TemperatureParams",
    "fit_kl_matching",
    "fit_temperature",
    "gen_score",
    "kl_matching_score",
    "temperature_score",
]

# Bounds of the temperature search; a fitted T at a bound means the logits carry no signal.
_LOG_T_BOUNDS = (np.log(1e-3), np.log(1e3))


@flax.struct.dataclass
class TemperatureParams:
    """Fitted temperature.

    Attributes:
      temperature: scalar ``T > 0`` minimizing the negative log-likelihood.
    """

    temperature: jax.Array


def fit_temperature(train_logits: ArrayLike, train_labels: ArrayLike) -> TemperatureParams:
    r"""Fits the temperature of temperature scaling (Guo et al., ICML 2017).

    .. math:: T^* = \arg\min_{T > 0} \frac{1}{N} \sum_i
        -\log \operatorname{softmax}(f(x_i) / T)_{y_i}

    The NLL is convex in ``1/T``; it is minimized exactly (bounded Brent search
    on ``log T`` in ``[1e-3, 1e3]``, float64). The references run 50 L-BFGS
    iterations with learning rate 0.01 from ``T = 1.5`` (OpenOOD v1.5
    ``temp_scaling_postprocessor.py``) or ``T = 1`` (pytorch-ood 0.4
    ``detector/tscaling.py``), which can stop short of the minimum.

    Args:
      train_logits: ``[N, K]`` logits of held-out in-distribution examples.
      train_labels: ``[N]`` their integer labels.

    Returns:
      :class:`TemperatureParams` for :func:`temperature_score`.
    """
    f = _train_features(train_logits)
    labels = _labels_below(train_labels, f.shape[0], f.shape[1])
    true_logit = f[np.arange(len(f)), labels]

    def nll(log_t: float) -> float:
        t = np.exp(log_t)
        return float(np.mean(scipy.special.logsumexp(f / t, axis=1) - true_logit / t))

    found = scipy.optimize.minimize_scalar(
        nll, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-8}
    )
    return TemperatureParams(temperature=jnp.asarray(np.exp(found.x), jnp.float32))


@jax.jit
def temperature_score(params: TemperatureParams, logits: ArrayLike) -> jax.Array:
    r"""Maximum softmax probability at the fitted temperature.

    .. math:: s(x) = \max_k \operatorname{softmax}(f(x) / T^*)_k

    Args:
      params: from :func:`fit_temperature`.
      logits: ``[..., K]``.

    Returns:
      ``[...]`` float32 scores in ``[1/K, 1]``.
    """
    return msp(logits, temperature=params.temperature)


@flax.struct.dataclass
class KLMatchingParams:
    """Typical posteriors of the predicted classes.

    Attributes:
      log_templates: ``[K, K]`` ``log d_c``, floored at the log of float32's smallest
        normal number so that a zero entry costs a large, finite divergence.
    """

    log_templates: jax.Array


def fit_kl_matching(train_logits: ArrayLike) -> KLMatchingParams:
    r"""Fits KL matching's class templates (Hendrycks et al., ICML 2022).

    .. math:: d_c = \operatorname{mean}_{\hat y_i = c} \operatorname{softmax}(f(x_i)),
        \qquad \hat y_i = \arg\max_k f_k(x_i)

    grouped by the **predicted** class, with the one-hot ``e_c`` for a class
    never predicted (OpenOOD v1.5 ``kl_matching_postprocessor.py``, fitted there
    on the ID validation set). pytorch-ood 0.4 (``detector/klmatching.py``)
    groups by the given labels instead.

    Args:
      train_logits: ``[N, K]`` in-distribution logits.

    Returns:
      :class:`KLMatchingParams` for :func:`kl_matching_score`.
    """
    f = _train_features(train_logits)
    probs = scipy.special.softmax(f, axis=1)
    predicted = f.argmax(axis=1)
    num_classes = f.shape[1]
    templates = np.eye(num_classes)
    for c in np.unique(predicted):
        templates[c] = probs[predicted == c].mean(axis=0)
    floor = np.finfo(np.float32).tiny
    return KLMatchingParams(log_templates=jnp.asarray(np.log(np.maximum(templates, floor))))


@jax.jit
def kl_matching_score(params: KLMatchingParams, logits: ArrayLike) -> jax.Array:
    r"""Negative KL divergence to the closest class template (KL matching).

    .. math:: s(x) = -\min_c \mathrm{KL}(p \,\Vert\, d_c), \qquad p = \operatorname{softmax}(f(x))

    The minimum over all templates is OpenOOD's (``pairwise_distances_argmin_min``);
    the paper and pytorch-ood compare with the predicted class's template only.

    Args:
      params: from :func:`fit_kl_matching`.
      logits: ``[..., K]``.

    Returns:
      ``[...]`` float32 scores (``<= 0``).
    """
    log_p = jax.nn.log_softmax(_as_float(logits, "logits"), axis=-1)
    p = jnp.exp(log_p)
    # An entry with p = 0 contributes 0 (as scipy.stats.entropy); p log p stays finite.
    neg_entropy = jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)
    cross = jnp.matmul(p, params.log_templates.T, precision=jax.lax.Precision.HIGHEST)
    return -jnp.min(neg_entropy[..., None] - cross, axis=-1)


@functools.partial(jax.jit, static_argnames=("m",))
def gen_score(logits: ArrayLike, *, gamma: ArrayLike = 0.1, m: int = 100) -> jax.Array:
    r"""Generalized entropy (GEN, Liu et al., CVPR 2023) of the ``m`` largest probabilities.

    .. math:: s(x) = -\sum_{j=1}^{\min(m, K)} p_{(j)}^\gamma (1 - p_{(j)})^\gamma

    with ``p_(1) >= p_(2) >= ...`` the sorted softmax probabilities. Defaults
    ``gamma = 0.1``, ``m = 100`` (OpenOOD v1.5 ``configs/postprocessors/gen.yml``);
    ``m >= K`` keeps every class.

    Args:
      logits: ``[..., K]``.
      gamma: ``> 0``; may be traced (vmapped).
      m: number of largest probabilities kept, ``>= 1``, static.

    Returns:
      ``[...]`` float32 scores (``<= 0``).
    """
    if not isinstance(m, numbers.Integral) or m < 1:
        raise ValueError(f"m must be a positive integer, got {m!r}.")
    p = jax.nn.softmax(_as_float(logits, "logits"), axis=-1)
    top, _ = jax.lax.top_k(p, min(m, p.shape[-1]))
    return -jnp.sum(top**gamma * (1.0 - top) ** gamma, axis=-1)
