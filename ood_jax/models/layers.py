"""Building blocks shared by the ood_jax models.

Conventions (chosen to match the PyTorch reference implementations so that
hyperparameters and results carry over):

- Images and activations are NHWC (the TPU/XLA-native layout).
- BatchNorm: ``momentum=0.9`` (PyTorch's ``momentum=0.1``) and ``epsilon=1e-5``.
  Under ``jax.jit`` with the batch sharded by a ``NamedSharding`` the batch mean
  and variance are already taken over the *global* batch (XLA inserts the
  cross-device reductions), so no ``axis_name`` / sync-BN is needed. One small
  difference from PyTorch: the running variance is updated with the biased
  batch variance (PyTorch uses the unbiased one); at batch 128 that is a 0.8%
  factor on an exponential average and does not matter in practice.
- Training-mode BatchNorm in a low-precision dtype (bf16, the presets' TPU/GPU
  precision) normalizes as ``x * a + (bias - mean * a)``, ``a = scale /
  sqrt(var + eps)``, in float32, then casts: ``nnx.BatchNorm``'s
  ``(x - mean) * a + bias`` with the normalization folded into one per-channel
  multiply-add. Same function and statistics; the form ``nnx.BatchNorm`` uses
  crashes libtpu 0.0.42.1's compiler for v6e (a stack overflow in
  ``MigrateInstructionUsers``) on the train steps of the CIFAR ResNets and
  WRN-40-2 at small per-device batches (``results/plans/v6e_compiler_crash.py``).
- Spectral normalization (Miyato et al., ICLR 2018) as in
  ``torch.nn.utils.spectral_norm``: the kernel is reshaped to a matrix
  ``M`` of shape ``[fan_in, out]``, one power-iteration step per training
  forward pass refines the stored right singular vector ``u``, and the layer
  uses ``kernel / sigma`` with ``sigma = v^T M u`` (``u``, ``v`` treated as
  constants for the gradient).
"""

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
ACTIVATIONS = ("relu", "leaky_relu")
LEAKY_RELU_SLOPE = 0.01  # PyTorch's nn.LeakyReLU default

# PyTorch's default conv/linear init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# Kaiming normal with fan_out (He et al. 2015), used by the WRN code and torchvision.
kaiming_normal_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias_init(fan_in: int) -> Callable[..., jax.Array]:
    """PyTorch's default bias init for a layer with ``fan_in`` inputs: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """Return the elementwise activation called ``name`` ("relu" or "leaky_relu")."""
    if name == "relu":
        return jax.nn.relu
    if name == "leaky_relu":
        return partial(jax.nn.leaky_relu, negative_slope=LEAKY_RELU_SLOPE)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}.")


def batch_norm(num_features: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm over the channel (last) axis with PyTorch's momentum and epsilon."""
    return BatchNorm(num_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm over every axis but the last: ``(y, batch mean, batch var)``.

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` with the biased batch
    variance ``E[x^2] - E[x]^2`` (clipped at 0), as ``nnx.BatchNorm`` computes
    it. The backward pass is the closed form (two per-channel sums over ``g``
    and ``g * x_hat``, then one elementwise pass), as cuDNN and oneDNN compute
    it, instead of the transposed graph of the forward computation.
    """
    return _bn_forward(x, scale, bias, epsilon)[0]


def _bn_forward(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.maximum(0.0, (x * x).mean(axes) - mean * mean)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * (rstd * scale) + bias
    return (y, mean, var), (x, mean, var, rstd, scale)


def _bn_backward(epsilon, residuals, cotangents):
    del epsilon
    x, mean, var, rstd, scale = residuals
    g, g_mean, g_var = cotangents
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    centered = x - mean
    x_hat = centered * rstd
    g_bias = g.sum(axes)
    g_scale = (g * x_hat).sum(axes)
    # dy/dx through the batch statistics, plus the statistics' own cotangents
    # (zero in training, where they only feed the stop-gradient running averages).
    g_var = jnp.where(var > 0, g_var, 0.0)
    g_x = (scale * rstd) * (g - (g_bias + x_hat * g_scale) / count)
    g_x = g_x + (g_mean + 2.0 * g_var * centered) / count
    return g_x, g_scale, g_bias


batch_norm_train.defvjp(_bn_forward, _bn_backward)


def batch_norm_train_folded(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm with a ``dtype`` result: ``(y, batch mean, batch var)``.

    ``nnx.BatchNorm``'s function for a low-precision ``dtype`` (``x``, ``scale`` and
    ``bias`` cast to ``dtype``; the statistics of ``x`` in float32 with the biased
    fast variance, clipped at 0; the normalization in float32; ``y`` cast to
    ``dtype``), written ``x * a + (bias - mean * a)`` with ``a = scale *
    rsqrt(var + epsilon)`` instead of ``(x - mean) * a + bias``. The two differ by
    float32 rounding, far below ``dtype``'s. The gradient is autodiff's.
    ``nnx.BatchNorm``'s form makes libtpu 0.0.42.1's v6e compiler overflow its
    stack (the module docstring).
    """
    axes = tuple(range(x.ndim - 1))
    x, scale, bias = (v.astype(dtype) for v in (x, scale, bias))  # nnx's promote_dtype
    xf = x.astype(jnp.float32)  # the statistics' own copy, as nnx's: the same gradient
    mean = xf.mean(axes)
    var = jnp.maximum(0.0, (xf * xf).mean(axes) - mean * mean)
    a = jax.lax.rsqrt(var + epsilon) * scale
    return (x.astype(jnp.float32) * a + (bias - mean * a)).astype(dtype), mean, var


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` whose training-mode pass uses ``batch_norm_train`` (float32)
    or ``batch_norm_train_folded`` (a low-precision ``dtype``, e.g. bf16).

    Same parameters, statistics and results as ``nnx.BatchNorm`` (so checkpoints
    are interchangeable). In float32 only the gradient is computed in closed form,
    which XLA:CPU runs faster than the autodiff graph; in a low-precision dtype the
    normalization is one multiply-add (the v6e compiler crash of the module
    docstring). Anything else (a mask, an ``axis_name``, no scale or bias, another
    axis) falls back to ``nnx.BatchNorm``.
    """

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask=None):
        training = not (
            self.use_running_average if use_running_average is None else use_running_average
        )
        plain = (
            training
            and mask is None
            and self.axis_name is None
            and self.axis in (-1, x.ndim - 1)
            and self.scale is not None
            and self.bias is not None
            and self.use_fast_variance
            and self.param_dtype == jnp.float32
        )
        # nnx.BatchNorm's result dtype: its dtype, else that of x, scale and bias.
        out_dtype = jnp.dtype(self.dtype or jnp.result_type(x, jnp.float32))
        if plain and x.dtype == jnp.float32 and out_dtype == jnp.float32:
            y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.epsilon)
        elif plain and jnp.issubdtype(out_dtype, jnp.floating) and jnp.finfo(out_dtype).bits < 32:
            y, mean, var = batch_norm_train_folded(
                x, self.scale[...], self.bias[...], self.epsilon, out_dtype
            )
        else:
            return super().__call__(x, use_running_average, mask=mask)
        momentum = self.momentum
        self.mean[...] = jax.lax.stop_gradient(momentum * self.mean[...] + (1 - momentum) * mean)
        self.var[...] = jax.lax.stop_gradient(momentum * self.var[...] + (1 - momentum) * var)
        return y


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 (``VALID``: an odd last row/column is dropped), NHWC.

    A reshape and a max over the two window axes. Its gradient (to the maximum
    of each window; shared equally on exact ties) is elementwise, where the
    gradient of ``lax.reduce_window`` lowers on XLA:CPU to a select-and-scatter
    with four index arrays the size of the input.
    """
    n, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SpectralNormConv(nnx.Module):
    """A convolution whose kernel is divided by its largest singular value.

    ``y = conv(x, W / sigma(W))`` with ``W`` of shape ``[kh, kw, in, out]`` seen
    as a matrix ``M = W.reshape(-1, out)`` (same singular values as PyTorch's
    ``[out, in*kh*kw]`` view). ``sigma`` is estimated by power iteration
    (Miyato et al., ICLR 2018): in training mode (``use_running_average``
    False, set by ``model.train()``) ``n_iterations`` steps
    ``v = normalize(M u); u = normalize(M^T v)`` update the stored ``u``
    (an ``nnx.BatchStat``: non-parameter state, like BatchNorm statistics);
    in eval mode the stored ``u`` is used as is. ``sigma = v^T M u``.

    Unlike ``nnx.SpectralNorm`` this never writes the normalized kernel back
    into the parameter, so the optimizer always updates the raw ``W``.
    """

    def __init__(
        self,
        conv: nnx.Conv,
        *,
        n_iterations: int = 1,
        eps: float = 1e-12,
        rngs: nnx.Rngs,
    ):
        self.conv = conv
        self.n_iterations = n_iterations
        self.eps = eps
        self.use_running_average = False
        out_features = conv.kernel.shape[-1]
        u = jax.random.normal(rngs.params(), (out_features,), jnp.float32)
        self.u = nnx.BatchStat(u / jnp.linalg.norm(u))

    def _sigma(self, matrix: jax.Array, *, update: bool) -> jax.Array:
        u = self.u[...]
        v = _normalize(matrix @ u, self.eps)
        if update:
            for _ in range(self.n_iterations):
                u = _normalize(matrix.T @ v, self.eps)
                v = _normalize(matrix @ u, self.eps)
            self.u[...] = u
        u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
        return v @ (matrix @ u)

    def normalized_kernel(self, *, update: bool = False) -> jax.Array:
        """``W / sigma``; ``update=True`` also runs the power iteration and stores ``u``."""
        kernel = self.conv.kernel[...]
        sigma = self._sigma(kernel.reshape(-1, kernel.shape[-1]), update=update)
        return kernel / sigma

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.normalized_kernel(update=not self.use_running_average)
        conv = self.conv
        dtype = conv.dtype or jnp.result_type(x, kernel)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=conv.strides,
            padding=conv.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


def conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    kernel_init: Callable[..., jax.Array],
    spectral_norm: bool,
    spectral_norm_iterations: int = 1,
    dtype: Any,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Bias-free ``kernel_size`` x ``kernel_size`` conv with PyTorch padding ``k // 2``.

    Explicit symmetric padding (not "SAME") so that stride-2 3x3 convs see
    the same pixels as PyTorch's ``padding=1`` (SAME would pad (0, 1)).
    """
    pad = kernel_size // 2
    layer = nnx.Conv(
        in_features,
        out_features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=kernel_init,
        dtype=dtype,
        rngs=rngs,
    )
    if spectral_norm:
        return SpectralNormConv(layer, n_iterations=spectral_norm_iterations, rngs=rngs)
    return layer
