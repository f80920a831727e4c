"""The backbone + linear-head contract shared by every ood_jax model.

``model(images) -> (logits, features)``: ``features`` are the raw penultimate
activations ``z`` ``[B, D]`` (after global pooling); ``logits = head(z)``
``[B, num_classes]``. With ``normalize_features=True`` (L2 feature
normalization, Haas et al., TMLR 2023, "Simple High Quality OoD Detection
with L2 Normalization") the head sees ``z / max(||z||_2, eps)`` in training
mode only; in eval mode it sees the raw ``z``, and the returned features are
raw in both modes so that ``||z||`` can be used as the OOD score.

``model(images, capture=("pre_pool", "blocks")) -> (logits, features, out)``
also returns intermediates (big_vision's ``out`` dict), for the scores that
declare they consume them: ``out["pre_pool"]`` the last feature map
``[B, H, W, D]`` that global pooling turns into ``features``, ``out["blocks"]``
a tuple of NHWC activations after the stem and after each stage (the
``feature_list`` of OpenOOD's and deep_Mahalanobis_detector's networks; the
last is the stage output before any final BN/act). Without ``capture`` the
call and its outputs are unchanged.
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
CAPTURES = ("pre_pool", "blocks")


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
    """Base class: subclasses implement ``feature_map(images, blocks)`` -> ``[B, H, W, D]``.

    ``feature_map`` returns the map that global pooling turns into the features
    and appends the stem's and every stage's output to ``blocks`` when it is a list.

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

    def feature_map(self, images: jax.Array, blocks: list | None = None) -> jax.Array:
        raise NotImplementedError

    def features(self, images: jax.Array) -> jax.Array:
        """The penultimate features ``[B, D]``: the pooled :meth:`feature_map`."""
        return global_pool(self.feature_map(images), self.pooling)

    def logits_from_pre_pool(self, pre_pool: jax.Array) -> jax.Array:
        """``head(global_pool(pre_pool))`` in eval mode: the rest of the network after
        ``out["pre_pool"]`` (for scores that reshape that map, e.g. ASH, RankFeat)."""
        return self.head(global_pool(pre_pool.astype(jnp.float32), self.pooling))

    def logits_with_block_edit(
        self, images: jax.Array, index: int, edit: Callable[[jax.Array], jax.Array]
    ) -> jax.Array:
        """Eval-mode logits with ``out["blocks"][index]`` replaced by ``edit`` of itself and
        the network after it run on that (``index`` counts from 0, the stem)."""
        edited = BlockEdit(index, edit)
        pre_pool = self.feature_map(images.astype(self.dtype), edited)
        if len(edited) <= index:
            raise ValueError(f"index: the model has {len(edited)} blocks, got {index}.")
        return self.logits_from_pre_pool(pre_pool)

    def __call__(
        self, images: jax.Array, *, capture: tuple[str, ...] = ()
    ) -> tuple[jax.Array, ...]:
        """Forward pass.

        Dropout draws from the model's ``dropout`` stream; the train step re-seeds it
        every step (``ood_jax.train.ModelDef.merge``).

        Args:
          images: float ``[B, H, W, 3]`` NHWC, normalized.
          capture: intermediates to return too, a subset of ``CAPTURES``.

        Returns:
          ``(logits [B, num_classes] float32, features [B, D] float32)``, and with
          ``capture`` a third item ``{name: float32 intermediates}`` (see the module
          docstring).
        """
        check_images(images)
        unknown = sorted(set(capture) - set(CAPTURES))
        if unknown:
            raise ValueError(f"capture: unknown {unknown}; choose from {CAPTURES}.")
        blocks = [] if "blocks" in capture else None
        pre_pool = self.feature_map(images.astype(self.dtype), blocks)
        z = global_pool(pre_pool, self.pooling).astype(jnp.float32)
        head_input = l2_normalize(z) if self.normalize_features and not self.deterministic else z
        logits = self.head(head_input)
        if not capture:
            return logits, z
        out = {"pre_pool": pre_pool.astype(jnp.float32)} if "pre_pool" in capture else {}
        if blocks is not None:
            out["blocks"] = tuple(b.astype(jnp.float32) for b in blocks)
        return logits, z, out


class BlockEdit(list):
    """A ``blocks`` list that replaces block ``index``'s output by ``edit(output)``.

    Passed as ``feature_map``'s ``blocks``, it makes the rest of the network run on
    the edited activations (RankFeat's block-3 path); the list records the edited ones.
    """

    def __init__(self, index: int, edit: Callable[[jax.Array], jax.Array]):
        super().__init__()
        self.index = index
        self.edit = edit


def keep(blocks: list | None, x: jax.Array) -> jax.Array:
    """Appends ``x`` to ``blocks`` when capturing (a list), returns ``x`` (edited where a
    :class:`BlockEdit` says so)."""
    if blocks is None:
        return x
    if isinstance(blocks, BlockEdit) and len(blocks) == blocks.index:
        x = blocks.edit(x)
    blocks.append(x)
    return x
