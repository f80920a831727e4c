"""The backbone + linear-head contract shared by every ood_jax model.

``model(images) -> (logits, features)``: ``features`` are the raw penultimate
activations ``z`` ``[B, D]`` (after global pooling); ``logits = head(z)``
``[B, num_classes]``. With ``normalize_features=True`` (L2 feature
normalization, Haas et al., TMLR 2023, "Simple High Quality OoD Detection
with L2 Normalization") the head sees ``z / max(||z||_2, eps)`` in training
mode only; in eval mode it sees the raw ``z``, and the returned features are
raw in both modes so that ``||z||`` can be used as the OOD score.
"""

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ood_jax.losses import l2_normalize
from ood_jax.models.layers import (
    activation_fn,
    torch_default_bias_init,
    torch_default_init,
)
from ood_jax.models.layers import conv as make_conv

POOLINGS = ("avg", "max")


def check_images(images: jax.Array, *, in_channels: int = 3) -> None:
    """Raise a ValueError unless ``images`` is a float NHWC batch ``[B, H, W, in_channels]``.

    Runs on static shapes/dtypes only, so it is free under ``jax.jit``.
    """
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(
            f"images must be a 4-D NHWC batch [batch, height, width, {in_channels}], "
            f"got shape {shape}; add a batch axis for a single image."
        )
    if shape[-1] != in_channels:
        hint = (
            " It looks like NCHW: transpose with images.transpose(0, 2, 3, 1)."
            if shape[1] == in_channels
            else ""
        )
        raise ValueError(
            f"images must be NHWC with {in_channels} channels last, got shape {shape}.{hint}"
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"images must be floating point (normalized with the dataset mean/std), "
            f"got dtype {images.dtype}; convert with images.astype(jnp.float32)."
        )


def global_pool(x: jax.Array, pooling: str) -> jax.Array:
    """Global pooling over the spatial axes of an NHWC tensor -> ``[B, C]``."""
    if pooling == "avg":
        return jnp.mean(x, axis=(1, 2))
    if pooling == "max":
        return jnp.max(x, axis=(1, 2))
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")


class Classifier(nnx.Module):
    """Base class: subclasses implement ``features(images)`` -> ``[B, D]``.

    Options shared by every model (keyword-only, passed through
    ``create_model``):
      activation: "relu" or "leaky_relu" (slope 0.01).
      spectral_norm: spectral-normalize every conv (``SpectralNormConv``); the
        head stays a plain ``nnx.Linear`` so scores can read its weights.
      spectral_norm_iterations: power-iteration steps per training forward pass.
      pooling: "avg" (global average pooling, the default) or "max".
      normalize_features: training-only L2 normalization of the features
        before the head (Haas et al., TMLR 2023).
      dtype: compute dtype (e.g. ``jnp.bfloat16`` on accelerators); parameters
        stay float32.

    ``deterministic`` is toggled by ``model.train()`` (False) / ``model.eval()``
    (True), the same switch nnx uses for Dropout, and decides whether the
    training-only feature normalization applies.
    """

    # The options every model takes as keywords (a config's model.options passed through
    # create_model), each with a default; a subclass passes them on unchanged.
    def __init__(
        self,
        feature_dim: int,
        *,
        num_classes: int,
        zero_head_bias: bool,
        activation: str = "relu",
        spectral_norm: bool = False,
        spectral_norm_iterations: int = 1,
        pooling: str = "avg",
        normalize_features: bool = False,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        if spectral_norm_iterations < 1:
            raise ValueError(
                f"spectral_norm_iterations must be >= 1, got {spectral_norm_iterations}."
            )
        self.act = activation_fn(activation)
        self.spectral_norm = spectral_norm
        self.spectral_norm_iterations = spectral_norm_iterations
        self.normalize_features = normalize_features
        self.pooling = pooling
        self.dtype = dtype
        self.deterministic = False
        bias_init = (
            nnx.initializers.zeros if zero_head_bias else torch_default_bias_init(feature_dim)
        )
        # The head computes in float32 even under bfloat16: it is tiny and the
        # logits feed losses and OOD scores that are sensitive to rounding.
        self.head = nnx.Linear(
            feature_dim,
            num_classes,
            kernel_init=torch_default_init,
            bias_init=bias_init,
            dtype=jnp.float32,
            rngs=rngs,
        )

    def conv_factory(self, kernel_init: Callable[..., jax.Array]) -> Callable[..., nnx.Module]:
        """``conv(in, out, kernel_size, stride=..., rngs=...)`` with this model's options."""
        return partial(
            make_conv,
            kernel_init=kernel_init,
            spectral_norm=self.spectral_norm,
            spectral_norm_iterations=self.spectral_norm_iterations,
            dtype=self.dtype,
        )

    def features(self, images: jax.Array) -> jax.Array:
        raise NotImplementedError

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Forward pass.

        Dropout draws from the model's ``dropout`` stream; the train step re-seeds it
        every step (``ood_jax.train.ModelDef.merge``).

        Args:
          images: float ``[B, H, W, 3]`` NHWC, normalized.

        Returns:
          ``(logits [B, num_classes] float32, features [B, D] float32)``.
        """
        check_images(images)
        z = self.features(images.astype(self.dtype)).astype(jnp.float32)
        head_input = l2_normalize(z) if self.normalize_features and not self.deterministic else z
        return self.head(head_input), z
