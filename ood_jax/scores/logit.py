"""Post-hoc OOD scores computed from logits or penultimate features alone.

Every score returns one value per example and **higher means more
in-distribution**. Inputs have shape ``[..., num_classes]`` (logits) or
``[..., feature_dim]`` (features), usually ``[batch, num_classes]``; the last
axis is reduced and the result has shape ``[...]``.

Numerics: low-precision inputs (``float16``, ``bfloat16``, integers) are upcast
and the score is computed and returned in ``float32``; ``float64`` inputs (with
``jax_enable_x64``) stay ``float64``. Softmax-based scores shift by the maximum
logit first, so they are finite for logits as large as the dtype allows.
All functions are pure and safe under ``jax.jit``, ``jax.vmap`` and
``jax.grad``; ``temperature`` may be a traced array (for a ``vmap`` over
temperatures), in which case its sign cannot be checked.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["energy", "feature_norm", "max_logit", "msp", "neg_entropy", "weighted_energy"]


def _as_float(x: ArrayLike, name: str) -> jax.Array:
    """Checks ``x`` has a class/feature axis and upcasts it to at least float32."""
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(
            f"{name} must have at least one axis (the last one holds classes or features), "
            f"got a scalar. Pass an array of shape [batch, dim]."
        )
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty last axis (shape {x.shape}); need >= 1 entry.")
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise ValueError(f"{name} must be real, got dtype {x.dtype}.")
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_positive(value: ArrayLike, name: str) -> None:
    """Raises for a non-positive Python number; traced values are not checkable."""
    if isinstance(value, numbers.Real) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")


def _linear_head(
    feature_dim: int, head_kernel: ArrayLike, head_bias: ArrayLike | None
) -> tuple[jax.Array, jax.Array]:
    """Checks a last layer ``f = z W + b`` against the features; a missing bias is 0."""
    kernel = _as_float(head_kernel, "head_kernel")
    if kernel.ndim != 2 or kernel.shape[0] != feature_dim:
        raise ValueError(
            f"head_kernel must have shape [feature_dim={feature_dim}, num_classes], got "
            f"{kernel.shape}; pass the final Linear layer's kernel (in, out)."
        )
    if head_bias is None:
        return kernel, jnp.zeros(kernel.shape[1], kernel.dtype)
    bias = _as_float(head_bias, "head_bias")
    if bias.shape != (kernel.shape[1],):
        raise ValueError(
            f"head_bias must have shape [{kernel.shape[1]}] to match head_kernel, got {bias.shape}."
        )
    return kernel, bias


def msp(logits: ArrayLike, *, temperature: ArrayLike = 1.0) -> jax.Array:
    r"""Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017).

    .. math:: s(x) = \max_k \operatorname{softmax}(f(x) / T)_k
                  = 1 / \sum_j \exp\big((f_j - \max_k f_k) / T\big)

    With ``temperature=1000`` on perturbed inputs this is the ODIN score
    (Liang et al., ICLR 2018; see :func:`ood_jax.scores.odin`).

    Args:
      logits: ``[..., num_classes]``.
      temperature: ``T > 0``.

    Returns:
      ``[...]`` scores in ``[1 / num_classes, 1]``.
    """
    _check_positive(temperature, "temperature")
    x = _as_float(logits, "logits")
    # exp(max log_softmax) avoids the 0/0 of softmax for huge logits.
    return jnp.exp(jnp.max(jax.nn.log_softmax(x / temperature, axis=-1), axis=-1))


def max_logit(logits: ArrayLike) -> jax.Array:
    r"""Maximum logit (Hendrycks et al., "Scaling OOD detection", ICML 2022).

    .. math:: s(x) = \max_k f_k(x)

    Args:
      logits: ``[..., num_classes]``.

    Returns:
      ``[...]`` scores.
    """
    return jnp.max(_as_float(logits, "logits"), axis=-1)


def energy(logits: ArrayLike, *, temperature: ArrayLike = 1.0) -> jax.Array:
    r"""Negative free energy (Liu et al., "Energy-based OOD detection", NeurIPS 2020).

    .. math:: s(x) = -E(x; f) = T \log \sum_k \exp(f_k(x) / T)

    The paper's OOD score is ``-E``, so in-distribution inputs (low energy)
    score high. Computed with a max-shifted ``logsumexp``: finite for any finite
    logits. As ``T -> 0`` it tends to :func:`max_logit`.

    Args:
      logits: ``[..., num_classes]``.
      temperature: ``T > 0`` (the paper uses 1).

    Returns:
      ``[...]`` scores.
    """
    _check_positive(temperature, "temperature")
    x = _as_float(logits, "logits")
    return temperature * jax.nn.logsumexp(x / temperature, axis=-1)


def weighted_energy(logits: ArrayLike, weights: ArrayLike) -> jax.Array:
    r"""Weighted negative energy (Du et al., "VOS", ICLR 2022).

    .. math:: s(x) = \log \sum_k \operatorname{relu}(w_k) \exp f_k(x)

    ``w`` is the class weight vector VOS trains with its uncertainty loss
    (pytorch-ood's ``WeightedEBO`` clips it with a ReLU, as here); all-ones
    weights give :func:`energy` at ``T = 1``. Max-shifted through ``logsumexp``'s
    scale factor ``b``, so huge logits stay finite; classes of weight 0 drop out.

    Args:
      logits: ``[..., num_classes]``.
      weights: ``[num_classes]``, at least one positive.

    Returns:
      ``[...]`` scores.
    """
    x = _as_float(logits, "logits")
    w = jnp.asarray(weights, x.dtype)
    if w.shape != (x.shape[-1],):
        raise ValueError(f"weights must have shape [{x.shape[-1]}] (one per class), got {w.shape}.")
    return jax.nn.logsumexp(x, axis=-1, b=jax.nn.relu(w))


def neg_entropy(logits: ArrayLike) -> jax.Array:
    r"""Negative Shannon entropy of the predictive distribution.

    .. math:: s(x) = \sum_k p_k \log p_k, \qquad p = \operatorname{softmax}(f(x))

    Confident (peaked) predictions score near 0, uniform ones ``-log K``.
    ``log p`` comes from ``log_softmax`` so it is finite for finite logits; a
    probability that underflows to 0 contributes exactly 0.

    Args:
      logits: ``[..., num_classes]``, finite.

    Returns:
      ``[...]`` scores in ``[-log(num_classes), 0]``.
    """
    log_p = jax.nn.log_softmax(_as_float(logits, "logits"), axis=-1)
    return jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def feature_norm(features: ArrayLike) -> jax.Array:
    r"""Euclidean norm of the penultimate features (Haas et al., TMLR 2023).

    .. math:: s(x) = \lVert z(x) \rVert_2

    The test-time score of L2 feature normalization: familiar inputs give large
    feature norms. Computed as ``m * ||z / m||`` with ``m = max |z_d|`` so that
    huge features do not overflow the sum of squares. The gradient at
    ``z = 0`` is undefined (as for any norm).

    Args:
      features: ``[..., feature_dim]``, the raw (unnormalized) features.

    Returns:
      ``[...]`` non-negative scores.
    """
    z = _as_float(features, "features")
    scale = jnp.max(jnp.abs(z), axis=-1, keepdims=True)
    # stop_gradient: the norm is scale-invariant in m, so m carries no gradient.
    scale = jax.lax.stop_gradient(jnp.where(scale > 0, scale, 1.0))
    return scale[..., 0] * jnp.sqrt(jnp.sum(jnp.square(z / scale), axis=-1))
