"""Noise and confidence attacks of ACET/CEDA (Hein et al., CVPR 2019), pure and jittable.

Everything here works on images in ``[0, 1]`` pixel space, NHWC, and takes an
explicit PRNG key, so it runs inside a jitted train step (the noise is made on
device from the batch and the step key) as well as in the evaluation.

- :func:`permute_pixels`: each image's pixel positions shuffled (an RGB triplet
  moves as one), so every image keeps its multiset of pixels;
- :func:`uniform_noise`: i.i.d. uniform pixels;
- :func:`gaussian_lowpass`: a Gaussian blur (15x15 kernel, per channel,
  mirror padding), then each image rescaled to ``[0, 1]`` by its min and max,
  as the authors' code does;
- :func:`noise_batch`: the training noise: a fraction of permuted images and
  the rest uniform noise, both low-pass filtered with one ``sigma ~ U[1, 2.5]``
  per batch;
- :func:`pgd_confidence`: L-infinity PGD that *maximizes* the log max-softmax
  confidence inside a ball of radius ``eps`` around the start, clipped to
  ``[0, 1]``; random start, sign-gradient steps of ``eps / steps`` by default,
  and the most confident iterate of each example is kept (the authors'
  choices). One input gradient per example: the gradient of the summed
  per-example confidences of a model that treats examples independently.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The platform a step is being traced for (compile_train_step sets it from its mesh),
# when it is not jax.default_backend(): a TPU program compiled on a CPU machine.
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ood_jax_target_platform", default=None
)
# Unroll whatever the platform (a planner's unrolled copy of a step).
_FORCE_UNROLL: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ood_jax_force_unroll", default=False
)


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def tracing_for(platform: str) -> contextlib.AbstractContextManager[None]:
    """Inside it, attacks traced are built for ``platform`` ("cpu", "tpu", "gpu")
    rather than for ``jax.default_backend()``: their ``unroll`` default follows it."""
    return _setting(_TARGET_PLATFORM, platform)


def unrolling() -> contextlib.AbstractContextManager[None]:
    """Inside it, attacks traced with the default ``unroll`` are unrolled whatever the
    platform: XLA's cost analysis counts a loop body once, so a planner counts an
    attack's steps on an unrolled copy (``experiments.plan.core``)."""
    return _setting(_FORCE_UNROLL, True)


def _platform() -> str:
    """The platform being traced for (:func:`tracing_for`), else JAX's default backend."""
    return _TARGET_PLATFORM.get() or jax.default_backend()


def _default_unroll() -> bool:
    if _FORCE_UNROLL.get():
        return True
    return _platform() == "cpu"


LOWPASS_RADIUS = 7  # the kernel is (2 * 7 + 1)^2 = 15 x 15
LOWPASS_SIGMA = (1.0, 2.5)


def _check_images(x: jax.Array, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what}: expected images [B, H, W, C] in [0, 1], got shape {x.shape}.")


def permute_pixels(images: jax.Array, key: jax.Array) -> jax.Array:
    """Each image with its pixel positions randomly permuted (channels move together)."""
    _check_images(images, "permute_pixels")
    b, h, w, c = images.shape
    flat = images.reshape(b, h * w, c)
    perms = jax.vmap(lambda k: jax.random.permutation(k, h * w))(jax.random.split(key, b))
    return jnp.take_along_axis(flat, perms[:, :, None], axis=1).reshape(images.shape)


def uniform_noise(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """I.i.d. uniform pixels in ``[0, 1)``."""
    return jax.random.uniform(key, shape, dtype)


def _blur_matrix(n: int, taps: jax.Array, radius: int) -> jax.Array:
    """``[n, n]`` matrix of a 1-D convolution with mirror padding (``mode="symmetric"``).

    Row ``i`` holds ``taps[t]`` at the mirrored index of ``i + t - radius``.
    """
    offsets = np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :]
    mirrored = np.mod(offsets, 2 * n)
    mirrored = np.where(mirrored >= n, 2 * n - 1 - mirrored, mirrored)
    rows = np.repeat(np.arange(n), 2 * radius + 1)
    return jnp.zeros((n, n), taps.dtype).at[rows, mirrored.ravel()].add(jnp.tile(taps, n))


def _separable_blur(x: jax.Array, taps: jax.Array, radius: int) -> jax.Array:
    """The blur of :func:`_blur_matrix`'s rows and columns as two depthwise convolutions
    of the mirror-padded images (``[B, H, W, C]`` float32; the taps are symmetric, so
    XLA's cross-correlation is the convolution)."""
    channels = x.shape[-1]
    padded = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="symmetric")
    size = 2 * radius + 1
    kernels = (
        jnp.broadcast_to(taps[:, None, None, None], (size, 1, 1, channels)),  # along H
        jnp.broadcast_to(taps[None, :, None, None], (1, size, 1, channels)),  # along W
    )
    for kernel in kernels:
        padded = jax.lax.conv_general_dilated(
            padded,
            kernel,
            window_strides=(1, 1),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels,
            precision=jax.lax.Precision.HIGHEST,
        )
    return padded


def gaussian_lowpass(images: jax.Array, sigma: jax.Array) -> jax.Array:
    """Blur each channel with a 15x15 Gaussian of std ``sigma``, then rescale to ``[0, 1]``.

    Borders are mirror-padded (``numpy.pad(mode="symmetric")``); each image is then
    mapped to ``[0, 1]`` by its own minimum and maximum (a constant image maps to 0).
    The Gaussian is separable. On CPU and TPU the blur is two ``[32, 32]`` matrix
    products per channel (on a CPU about 10x faster than a 15x15 depthwise
    convolution); on GPU it is two 15-tap depthwise convolutions of the mirror-padded
    images, the same blur: XLA's GPU compiler finds no Triton tiling for the matrix
    form at full float32 precision. The platform is the one traced for
    (:func:`tracing_for`), else JAX's default backend.
    """
    _check_images(images, "gaussian_lowpass")
    r = LOWPASS_RADIUS
    t = jnp.arange(-r, r + 1, dtype=jnp.float32)
    taps = jnp.exp(-0.5 * jnp.square(t / sigma))
    taps = taps / jnp.sum(taps)  # outer(taps, taps) is the normalized 2-D kernel
    x = images.astype(jnp.float32)
    if _platform() in ("gpu", "cuda", "rocm"):
        blurred = _separable_blur(x, taps, r)
    else:
        rows = _blur_matrix(images.shape[1], taps, r)
        cols = _blur_matrix(images.shape[2], taps, r)
        blurred = jnp.einsum("ij,bjlc,kl->bikc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)
    low = jnp.min(blurred, axis=(1, 2, 3), keepdims=True)
    high = jnp.max(blurred, axis=(1, 2, 3), keepdims=True)
    return (blurred - low) / jnp.maximum(high - low, 1e-12)


def noise_batch(
    images: jax.Array,
    key: jax.Array,
    *,
    num: int | None = None,
    frac_perm: float = 0.5,
    lowpass: bool = True,
) -> jax.Array:
    """The CEDA/ACET training noise made from a batch of ``[0, 1]`` images.

    The first ``round(num * frac_perm)`` noise images are pixel-permuted images of the
    batch (cycling through it when ``num`` exceeds the batch), the rest uniform noise;
    with ``lowpass`` all of them go through :func:`gaussian_lowpass` with one
    ``sigma ~ U[1, 2.5]`` for the whole batch.

    Args:
      images: ``[B, H, W, C]`` in ``[0, 1]``.
      key: PRNG key (typed or raw).
      num: noise images to make (default ``B``).
      frac_perm: fraction of permuted images (0.5 in the authors' runs).
      lowpass: apply the low-pass filter.
    """
    _check_images(images, "noise_batch")
    b = images.shape[0]
    num = b if num is None else int(num)
    if num < 1 or not 0.0 <= frac_perm <= 1.0:
        raise ValueError(
            f"noise_batch: need num >= 1 and frac_perm in [0, 1], got {num}, {frac_perm}."
        )
    n_perm = int(round(num * frac_perm))
    k_perm, k_unif, k_sigma = jax.random.split(key, 3)
    source = jnp.resize(images, (num, *images.shape[1:]))  # repeats the batch cyclically
    parts = []
    if n_perm:
        parts.append(permute_pixels(source[:n_perm], k_perm))
    if num - n_perm:
        parts.append(uniform_noise(k_unif, (num - n_perm, *images.shape[1:]), images.dtype))
    noise = jnp.concatenate(parts, axis=0)
    if lowpass:
        sigma = jax.random.uniform(k_sigma, (), minval=LOWPASS_SIGMA[0], maxval=LOWPASS_SIGMA[1])
        noise = gaussian_lowpass(noise, sigma)
    return noise.astype(images.dtype)


def log_confidence(logits: jax.Array) -> jax.Array:
    """``log max_k softmax(logits)_k`` per row (the quantity ACET's attack maximizes)."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return jnp.max(jax.nn.log_softmax(logits, axis=-1), axis=-1)


class PGDState(NamedTuple):
    """An attack in progress: the start ``x0``, the iterate ``x``, and per example the
    most confident point so far and its log-confidence."""

    x0: jax.Array
    x: jax.Array
    best: jax.Array
    best_conf: jax.Array


def pgd_start(
    images: jax.Array, key: jax.Array, *, eps: float, random_start: bool = True
) -> PGDState:
    """The :class:`PGDState` before the first step of :func:`pgd_confidence`."""
    _check_images(images, "pgd_confidence")
    x0 = images if jnp.issubdtype(images.dtype, jnp.floating) else images.astype(jnp.float32)
    start = x0
    if random_start:
        k_scale, k_dir = jax.random.split(key)
        scale = jax.random.uniform(k_scale, (x0.shape[0], 1, 1, 1))
        offset = scale * jax.random.uniform(k_dir, x0.shape, minval=-eps, maxval=eps)
        start = _project(x0 + offset, x0, eps)
    conf = jnp.full((x0.shape[0],), -jnp.inf, jnp.promote_types(x0.dtype, jnp.float32))
    return PGDState(x0, start, start, conf)


def pgd_advance(
    apply_logits: Callable[[jax.Array], jax.Array],
    state: PGDState,
    *,
    eps: float,
    step_size: float,
    steps: int,
    unroll: bool | None = None,
) -> PGDState:
    """``steps`` steps of :func:`pgd_confidence` from ``state`` (see there)."""

    def confidences_and_grads(x):
        # The gradient of the summed confidences: for a model that treats examples
        # independently (evaluation mode), row i is example i's own input gradient, at
        # the cost of one batched backward pass.
        conf, vjp = jax.vjp(lambda e: log_confidence(apply_logits(e)), x)
        return conf, vjp(jnp.ones_like(conf))[0]

    def body(_, carry):
        x, best, best_conf = carry
        conf, grad = confidences_and_grads(x)  # x's confidence comes with its gradient
        best, best_conf = _keep_best(x, conf, best, best_conf)
        return _project(x + step_size * jnp.sign(grad), state.x0, eps), best, best_conf

    carry = (state.x, state.best, state.best_conf)
    if unroll is None:
        unroll = _default_unroll()
    if unroll:  # what fori_loop(..., unroll=True) means, also for a single step
        for i in range(steps):
            carry = body(i, carry)
    else:
        carry = jax.lax.fori_loop(0, steps, body, carry)
    return PGDState(state.x0, *carry)


def pgd_finish(apply_logits: Callable[[jax.Array], jax.Array], state: PGDState) -> jax.Array:
    """The attacked images: per example the most confident of all points visited, the
    last iterate included (its one extra forward pass)."""
    last = log_confidence(apply_logits(state.x))
    best, _ = _keep_best(state.x, last, state.best, state.best_conf)
    return jax.lax.stop_gradient(best).astype(state.x0.dtype)


def _project(x: jax.Array, x0: jax.Array, eps: float) -> jax.Array:
    return jnp.clip(jnp.clip(x, x0 - eps, x0 + eps), 0.0, 1.0)


def _keep_best(x, conf, best, best_conf):
    improved = conf > best_conf
    return jnp.where(improved[:, None, None, None], x, best), jnp.where(improved, conf, best_conf)


def pgd_confidence(
    apply_logits: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    key: jax.Array,
    *,
    eps: float = 0.3,
    steps: int = 40,
    step_size: float | None = None,
    random_start: bool = True,
    unroll: bool | None = None,
) -> jax.Array:
    """L-infinity PGD maximizing each image's confidence; returns the attacked images.

    .. math::
        x_{t+1} = \\Pi_{[0,1] \\cap B_\\infty(x_0, \\epsilon)}\\big(x_t + \\alpha\\,
        \\operatorname{sign} \\nabla_x \\log \\max_k \\operatorname{softmax}(f(x_t))_k\\big)

    Args:
      apply_logits: ``[0, 1]`` images ``[B, H, W, C]`` -> logits ``[B, K]``; must treat
        examples independently (an eval-mode model): the input gradient of the
        summed confidences then holds each example's own gradient.
      images: the starting points ``x_0`` in ``[0, 1]``.
      key: PRNG key of the random start ``x_0 + U(0, 1) * U(-eps, eps)`` (per image
        scale, per pixel direction), clipped to ``[0, 1]``.
      eps: radius of the ball (0.3 in the ACET paper).
      steps: number of steps (``jax.lax.fori_loop``); 0 returns the start.
      step_size: default ``eps / steps``.
      random_start: start from a random point of the ball instead of ``x_0``.
      unroll: unroll the ``fori_loop`` (default: only when compiled for CPU, the
        platform set by :func:`tracing_for` (the train step's mesh) or else the
        default backend; XLA on CPU runs convolutions inside a rolled loop about 3x
        slower: 1.0 s against 0.31 s per step for ResNet-9 at batch 128,
        benchmarks/results/acet_cost.md).
        Unrolling costs compile time (a few seconds per step) and memory: every
        step's buffers stay allocated (about 1.2 MB per image per step for ResNet-9
        width 16). A long attack on CPU is better run in chunks of steps, each its
        own call of :func:`pgd_advance` between :func:`pgd_start` and
        :func:`pgd_finish`, as the evaluation's adversarial-noise set does.

    Cost: ``steps`` forward+backward passes and one forward pass over the batch
    (each iterate's confidence comes with its gradient; only the last needs its
    own forward pass).

    Returns:
      ``[B, H, W, C]`` images within ``eps`` of ``images`` and in ``[0, 1]``: per
      example, the most confident of the start and all iterates.
    """
    alpha = (eps / max(steps, 1)) if step_size is None else step_size
    state = pgd_start(images, key, eps=eps, random_start=random_start)
    state = pgd_advance(apply_logits, state, eps=eps, step_size=alpha, steps=steps, unroll=unroll)
    return pgd_finish(apply_logits, state).astype(images.dtype)
