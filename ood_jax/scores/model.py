"""OOD scores that need gradients through the model or its last layer: ODIN, GradNorm.

These take callables and arrays, not model objects: ``odin`` takes
``apply_fn(images) -> logits`` (for an ``ood_jax.models`` model in eval mode,
``lambda x: model(x)[0]``), ``gradnorm`` takes the penultimate features and the
last layer's ``kernel``/``bias`` (``model.head.kernel.value`` etc.).

Gradients are taken **per example**: ``jax.vmap`` of ``jax.grad`` of a
single-example function, so no statistic couples examples of a batch (the
LogitNorm repository's GradNorm takes one gradient of a batch-mean loss, a
known bug). Scores are float32, one per example, higher = more in-distribution.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ood_jax.data.dataset import CIFAR10_STD
from ood_jax.scores.logit import _as_float, _check_chunk_size, _check_positive, _linear_head, msp

__all__ = ["CIFAR10_STD", "gradnorm", "odin"]


def odin(
    apply_fn: Callable[[jax.Array], jax.Array],
    images: ArrayLike,
    *,
    temperature: float = 1000.0,
    epsilon: float = 0.0014,
    std: Sequence[float] | ArrayLike = CIFAR10_STD,
) -> jax.Array:
    r"""ODIN: temperature scaling plus input perturbation (Liang et al., ICLR 2018).

    .. math::
        S_T(x) = \max_k \operatorname{softmax}(f(x) / T)_k, \qquad
        x' = x - \frac{\epsilon}{\sigma_c} \operatorname{sign}\big(-\nabla_x \log S_T(x)\big),
        \qquad s(x) = S_T(x')

    The step moves each input *towards higher* confidence (it increases
    ``S_T``); in-distribution inputs gain more than OOD ones. ``images`` are
    already normalized (``(x - mean) / std``), so as in the authors' code the
    step ``epsilon`` (in [0, 1] pixel units) is divided by the per-channel
    ``std`` of the last (channel) axis. Defaults: ``T = 1000``,
    ``epsilon = 0.0014`` (the paper's CIFAR-10 DenseNet choice).

    The gradient is per example (``vmap(grad)`` of a batch-of-one call), so a
    model with BatchNorm must be in eval mode. Where a gradient entry is
    exactly zero, ``sign`` gives 0 (no step); the PyTorch code steps by
    ``-epsilon`` there.

    Args:
      apply_fn: ``images [B, ...] -> logits [B, K]``, differentiable, batch-independent.
      images: ``[B, H, W, C]`` (any ``[B, ..., C]``) normalized images.
      temperature: ``T > 0``.
      epsilon: perturbation size ``>= 0``; 0 gives temperature-scaled MSP.
      std: ``[C]`` per-channel std in [0, 1] units (a scalar for all channels).

    Returns:
      ``[B]`` float32 scores in ``[1 / K, 1]``.
    """
    _check_positive(temperature, "temperature")
    if isinstance(epsilon, numbers.Real) and not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}.")
    x = _as_float(images, "images")
    if x.ndim < 2:
        raise ValueError(f"images must be a batch [B, ..., C], got shape {x.shape}.")
    scale = jnp.asarray(std, x.dtype)
    if scale.ndim > 1 or scale.size not in (1, x.shape[-1]):
        raise ValueError(
            f"std must be a scalar or have one entry per channel ({x.shape[-1]}, the last "
            f"axis of images), got shape {scale.shape}."
        )

    def log_confidence(image: jax.Array) -> jax.Array:
        logits = apply_fn(image[None])
        if not isinstance(logits, jax.Array) or logits.ndim != 2 or logits.shape[0] != 1:
            raise ValueError(
                "apply_fn must map images [B, ...] to a logits array [B, num_classes]; got "
                f"{type(logits).__name__} {getattr(logits, 'shape', '')}. For a model that "
                "returns (logits, features) pass `lambda x: model(x)[0]`."
            )
        return jnp.max(jax.nn.log_softmax(logits[0].astype(x.dtype) / temperature))

    grads = jax.vmap(jax.grad(log_confidence))(x)
    # x - eps * sign(-grad) == x + eps * sign(grad): ascend the log confidence.
    perturbed = jax.lax.stop_gradient(x + epsilon * jnp.sign(grads) / scale)
    return msp(apply_fn(perturbed), temperature=temperature)


def gradnorm(
    features: ArrayLike,
    head_kernel: ArrayLike,
    head_bias: ArrayLike | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> jax.Array:
    r"""GradNorm (Huang, Geng & Li, NeurIPS 2021): size of the last-layer gradient.

    For one example with features ``z`` and logits ``f = z W + b``:

    .. math::
        L(W) = \sum_k -\tfrac{1}{K} \log \operatorname{softmax}(f / T)_k
             = D_{KL}(u \,\|\, \operatorname{softmax}(f / T)) + \text{const},
        \qquad s = \lVert \partial L / \partial W \rVert_1
                 = \lVert z \rVert_1 \cdot \lVert (\operatorname{softmax}(f/T) - u) / T \rVert_1

    with ``u = 1/K``: the L1 norm of the gradient of the KL divergence to the
    uniform distribution w.r.t. the last layer's *weight* (not the bias), as in
    the authors' code. In-distribution inputs have larger norms. Computed with
    ``jax.grad`` of the single-example loss, ``vmap``-ed over chunks of
    ``chunk_size`` examples (``lax.map(..., batch_size=chunk_size)``), so
    memory is ``O(chunk_size * D * K)``.

    Args:
      features: ``[..., D]`` penultimate features.
      head_kernel: ``[D, K]`` last-layer weight (``model.head.kernel``).
      head_bias: ``[K]`` last-layer bias or ``None``.
      temperature: ``T > 0`` (the paper uses 1).
      chunk_size: examples per vmapped chunk, ``>= 1``, static.

    Returns:
      ``[...]`` float32 non-negative scores.
    """
    _check_positive(temperature, "temperature")
    _check_chunk_size(chunk_size)
    z = _as_float(features, "features")
    kernel, bias = _linear_head(z.shape[-1], head_kernel, head_bias)
    return _gradnorm(z, kernel, bias, temperature, chunk_size)


# Jitted apart from the checks so that a Python temperature is validated, not traced.
@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _gradnorm(
    z: jax.Array, kernel: jax.Array, bias: jax.Array, temperature: ArrayLike, chunk_size: int
) -> jax.Array:
    def uniform_cross_entropy(w: jax.Array, example: jax.Array) -> jax.Array:
        logits = jnp.matmul(example, w, precision=jax.lax.Precision.HIGHEST) + bias
        return -jnp.mean(jax.nn.log_softmax(logits / temperature))

    def one(example: jax.Array) -> jax.Array:
        return jnp.sum(jnp.abs(jax.grad(uniform_cross_entropy)(kernel, example)))

    flat = z.reshape(-1, z.shape[-1])
    if flat.shape[0] == 0:
        return jnp.zeros(z.shape[:-1], z.dtype)
    scores = jax.lax.map(one, flat, batch_size=min(chunk_size, flat.shape[0]))
    return scores.reshape(z.shape[:-1])
