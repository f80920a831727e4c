"""Per-example training losses for out-of-distribution detection.

Every loss is a pure function of arrays, safe under ``jax.jit``, ``jax.vmap``
and ``jax.grad``. Unless stated otherwise a loss takes logits of shape
``[..., num_classes]`` (usually ``[batch, num_classes]``) and returns one value
per example, shape ``[...]``, with no reduction; the caller takes the mean.

Numerics: low-precision inputs (``float16``, ``bfloat16``) are upcast and every
loss is computed and returned in ``float32``; ``float32`` inputs give ``float32``
and ``float64`` inputs (with ``jax_enable_x64``) give ``float64``. Values and
gradients stay finite for logits of magnitude up to about ``1e17`` in float32,
for all-equal logits and for an all-zero logit vector.

Labels are integer class indices in ``[0, num_classes)``, shape ``logits.shape[:-1]``.
Shapes and dtypes are checked (a ``ValueError`` at trace time); label *values*
cannot be checked under ``jit``: an out-of-range label (including the ``-1``
"no label" marker of ``ood_jax.data``) gives ``NaN``, never a silently wrong
finite loss. Mask padded examples with ``jnp.where(mask, loss, 0.0)`` (or replace
their labels first), not by multiplying: ``NaN * 0`` is ``NaN``.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "cross_entropy",
    "energy_margin_loss",
    "l2_normalize",
    "logitnorm_loss",
    "max_confidence_loss",
    "outlier_exposure_loss",
]


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float16/bfloat16/integers -> float32; float32 and float64 unchanged."""
    return jnp.promote_types(dtype, jnp.float32)


def _as_logits(logits: jax.Array, name: str = "logits") -> jax.Array:
    logits = jnp.asarray(logits)
    if logits.ndim < 1:
        raise ValueError(
            f"{name} must have shape [..., num_classes] (at least 1-D), got a scalar "
            f"of shape {logits.shape}; pass one row of class logits per example."
        )
    if logits.shape[-1] < 1:
        raise ValueError(
            f"{name} has {logits.shape[-1]} classes (shape {logits.shape}); "
            "the last axis must hold at least one class logit."
        )
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a floating-point array, got dtype {logits.dtype}; "
            "cast it with .astype(jnp.float32)."
        )
    return logits.astype(_compute_dtype(logits.dtype))


def _check_labels(labels: jax.Array, logits: jax.Array) -> jax.Array:
    labels = jnp.asarray(labels)
    check_label_array(labels, logits.shape)
    return labels


def check_label_array(labels: Any, logits_shape: tuple[int, ...]) -> None:
    """Integer labels, one per row of logits of shape ``logits_shape``, else ValueError.

    Shared by the losses (jax arrays) and ``ood_jax.metrics`` (NumPy arrays).
    """
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be integer class indices, got dtype {labels.dtype}; "
            "pass int32 indices (not one-hot vectors or floats)."
        )
    if labels.shape != tuple(logits_shape[:-1]):
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {tuple(logits_shape[:-1])}, got "
            f"{labels.shape} (logits shape {tuple(logits_shape)}); pass one integer label per "
            "row of logits."
        )


def _check_positive(value: float, name: str) -> None:
    # Traced hyperparameters cannot be checked; concrete Python numbers can.
    if isinstance(value, numbers.Real) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")


def _safe_norm(x: jax.Array, *, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """Euclidean norm whose gradient at ``x = 0`` is 0 instead of NaN.

    ``jnp.linalg.norm`` differentiates ``sqrt`` at 0, giving ``inf * 0 = NaN``. The
    double ``where`` keeps ``sqrt`` away from 0 in both the forward and the backward
    pass; at 0 the (sub)gradient 0 is used.
    """
    squared = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
    positive = squared > 0
    safe_squared = jnp.where(positive, squared, 1.0)
    return jnp.where(positive, jnp.sqrt(safe_squared), 0.0)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Softmax cross-entropy with integer labels.

    .. math:: \ell(f, y) = \log \sum_k e^{f_k} - f_y

    Args:
      logits: ``[..., num_classes]`` unnormalized scores.
      labels: ``[...]`` integer class indices in ``[0, num_classes)``.

    Returns:
      ``[...]`` per-example losses (float32 for float16/bfloat16/float32 inputs).

    Example:
      >>> cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))  # log 4 each
    """
    logits = _as_logits(logits)
    labels = _check_labels(labels, logits)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    num_classes = logits.shape[-1]
    in_range = (labels >= 0) & (labels < num_classes)
    # Without the mask, gather would wrap -1 (the "no label" marker) to the last class
    # or clamp large labels: an out-of-range label must give NaN, not a plausible loss.
    safe_labels = jnp.where(in_range, labels, 0)
    picked = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    return jnp.where(in_range, -picked, jnp.nan)


def logitnorm_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 0.04,
    eps: float = 1e-7,
) -> jax.Array:
    r"""LogitNorm loss: cross-entropy on logits normalized to a fixed norm.

    .. math:: \ell(f, y) = \mathrm{CE}\left(\frac{f}{\tau (\lVert f \rVert_2 + \epsilon)}, y\right)

    Wei et al., "Mitigating Neural Network Overconfidence with Logit
    Normalization", ICML 2022. The paper and OpenOOD use ``tau = 0.04`` on
    CIFAR-10 (the authors' README command uses 0.01). All-equal logits give
    ``log(num_classes)``. At ``f = 0`` the value is ``log(num_classes)`` and the
    gradient is finite: ``||f||`` takes the subgradient 0 there (as PyTorch's
    ``norm`` does), so the gradient is ``(1/K - onehot(y)) / (tau * eps)``, about
    ``2e8`` with the defaults (beyond float16's range, fine in float32/bfloat16).

    Args:
      logits: ``[..., num_classes]`` raw logits.
      labels: ``[...]`` integer class indices.
      temperature: ``tau > 0``; smaller means a larger normalized logit norm ``1/tau``.
      eps: ``> 0``, keeps the division finite for an all-zero logit vector.

    Returns:
      ``[...]`` per-example losses.
    """
    _check_positive(temperature, "temperature")
    _check_positive(eps, "eps")
    logits = _as_logits(logits)
    norm = _safe_norm(logits, axis=-1, keepdims=True)
    return cross_entropy(logits / (temperature * (norm + eps)), labels)


def outlier_exposure_loss(logits: jax.Array) -> jax.Array:
    r"""Cross-entropy from the uniform distribution to ``softmax(f)``.

    .. math:: \ell(f) = -\frac{1}{K} \sum_k \log \mathrm{softmax}(f)_k
              = \log \sum_k e^{f_k} - \frac{1}{K} \sum_k f_k

    Hendrycks et al., "Deep Anomaly Detection with Outlier Exposure", ICLR 2019;
    also the CEDA/ACET out-distribution term up to a constant (Hein et al.,
    CVPR 2019). Minimum ``log K``, reached by uniform output (all-equal logits).

    Args:
      logits: ``[..., num_classes]`` logits of out-distribution inputs.

    Returns:
      ``[...]`` per-example losses, ``>= log(num_classes)``.
    """
    logits = _as_logits(logits)
    # log_softmax shifts by the max first; logsumexp(f) - mean(f) would cancel
    # catastrophically for large |f| (1e4 leaves ~1e-3 absolute error in float32).
    return -jnp.mean(jax.nn.log_softmax(logits, axis=-1), axis=-1)


def max_confidence_loss(logits: jax.Array) -> jax.Array:
    r"""Log of the maximum softmax probability (the ACET/CEDA out-distribution term).

    .. math:: \ell(f) = \log \max_k \mathrm{softmax}(f)_k = \max_k f_k - \log \sum_k e^{f_k}

    Hein et al., "Why ReLU networks yield high-confidence predictions far away
    from the training data and how to mitigate the problem", CVPR 2019.
    Minimizing it on noise pushes predictions towards uniform; its range is
    ``[-log K, 0]`` with ``-log K`` exactly at uniform output.

    Args:
      logits: ``[..., num_classes]`` logits of out-distribution inputs.

    Returns:
      ``[...]`` per-example values in ``[-log(num_classes), 0]``.
    """
    logits = _as_logits(logits)
    # The max of log_softmax is -log(sum exp(f - max f)): no large-number cancellation.
    return jnp.max(jax.nn.log_softmax(logits, axis=-1), axis=-1)


def _free_energy(logits: jax.Array, temperature: float) -> jax.Array:
    return -temperature * jax.nn.logsumexp(logits / temperature, axis=-1)


def _check_nonempty_batch(logits: jax.Array, name: str) -> None:
    if logits.ndim >= 2 and any(d == 0 for d in logits.shape[:-1]):
        raise ValueError(
            f"{name} has an empty batch (shape {logits.shape}); the mean over its "
            "examples is undefined. Pass at least one example."
        )


def energy_margin_loss(
    logits_in: jax.Array,
    logits_out: jax.Array,
    *,
    m_in: float = -23.0,
    m_out: float = -5.0,
    temperature: float = 1.0,
) -> jax.Array:
    r"""Energy-bounded regularizer of energy fine-tuning (a scalar).

    .. math::
       E(x) = -T \log \sum_k e^{f_k(x) / T}, \qquad
       \mathcal{L} = \operatorname{mean}_{in}\big(\mathrm{relu}(E_{in} - m_{in})^2\big)
                   + \operatorname{mean}_{out}\big(\mathrm{relu}(m_{out} - E_{out})^2\big)

    Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020. Each
    mean is over its own batch, so the two batches may differ in size. The
    defaults ``m_in=-23, m_out=-5`` are the authors' CIFAR-10 run script (their
    code defaults are -25 / -7; CIFAR-100 uses -27 / -5). The full fine-tuning
    loss is ``mean(cross_entropy) + 0.1 * energy_margin_loss``.

    Args:
      logits_in: ``[batch_in, num_classes]`` logits of in-distribution inputs.
      logits_out: ``[batch_out, num_classes]`` logits of auxiliary outliers.
      m_in: in-distribution energies above ``m_in`` are penalized.
      m_out: outlier energies below ``m_out`` are penalized.
      temperature: ``T > 0``.

    Returns:
      A scalar (float32 for float16/bfloat16/float32 inputs).
    """
    _check_positive(temperature, "temperature")
    logits_in = _as_logits(logits_in, "logits_in")
    logits_out = _as_logits(logits_out, "logits_out")
    _check_nonempty_batch(logits_in, "logits_in")
    _check_nonempty_batch(logits_out, "logits_out")
    if logits_in.shape[-1] != logits_out.shape[-1]:
        raise ValueError(
            f"logits_in and logits_out must have the same number of classes, got "
            f"{logits_in.shape[-1]} and {logits_out.shape[-1]} (shapes {logits_in.shape}, "
            f"{logits_out.shape})."
        )
    energy_in = _free_energy(logits_in, temperature)
    energy_out = _free_energy(logits_out, temperature)
    loss_in = jnp.mean(jnp.square(jax.nn.relu(energy_in - m_in)))
    loss_out = jnp.mean(jnp.square(jax.nn.relu(m_out - energy_out)))
    return loss_in + loss_out


def l2_normalize(x: jax.Array, *, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    r"""Scale ``x`` to unit Euclidean norm along ``axis``.

    .. math:: \hat{x} = \frac{x}{\max(\lVert x \rVert_2, \epsilon)}

    The training-time feature normalization of Haas et al., "Simple High Quality
    OoD Detection with L2 Normalization", TMLR 2023. Vectors shorter than ``eps``
    (including 0) are divided by ``eps``; the gradient is finite everywhere.

    Unlike the losses this is a feature transform inside the model, so it
    returns ``x.dtype`` (bfloat16 compute stays bfloat16); the norm itself is
    computed in float32 or wider.

    Args:
      x: array of any shape with at least one axis.
      axis: the axis holding the vector components.
      eps: ``> 0`` lower bound on the divisor.

    Returns:
      An array of the shape and dtype of ``x``.
    """
    _check_positive(eps, "eps")
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have at least one axis, got a scalar of shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}.")
    wide = x.astype(_compute_dtype(x.dtype))
    norm = _safe_norm(wide, axis=axis, keepdims=True)
    return (wide / jnp.maximum(norm, eps)).astype(x.dtype)
