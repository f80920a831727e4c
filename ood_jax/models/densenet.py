"""DenseNet-BC (Huang et al., CVPR 2017) for 32x32 images in Flax NNX.

A port of ``DenseNet3`` as the ODIN and Mahalanobis repositories use it
(``models/densenet.py`` in pokaxpoka/deep_Mahalanobis_detector, from
andreasveit/densenet-pytorch) with ``bottleneck=True, reduction=0.5``: a 3x3
stem conv with ``2 * growth_rate`` channels; three dense blocks of
``(depth - 4) // 6`` bottleneck layers ``BN -> act -> conv1x1 (4 * growth) ->
BN -> act -> conv3x3 (growth)``, each concatenated after its input
(``[input, new]`` along the channels); between the blocks a transition
``BN -> act -> conv1x1 (half the channels, floored) -> 2x2 average pooling``;
final ``BN -> act -> global average pooling -> linear head``. No dropout (the
papers' DenseNet-BC-100-12 trains without it).

Initialization as in that code: convs ``N(0, 2 / (k*k*out))``, BatchNorm
scale 1 / bias 0, head bias 0, head kernel PyTorch's default.

DenseNet-BC-100-12 with 10 classes has 769,162 trainable parameters, as the
PyTorch model.
"""

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ood_jax.models.classifier import Classifier, keep
from ood_jax.models.layers import batch_norm, kaiming_normal_fan_out


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 average pooling with stride 2 on NHWC; an odd last row/column is dropped (PyTorch's)."""
    n, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class DenseLayer(nnx.Module):
    """Bottleneck layer: ``concat([x, conv3x3(act(bn2(conv1x1(act(bn1(x))))))])``."""

    def __init__(self, in_planes: int, growth_rate: int, *, conv, act, dtype, rngs):
        self.act = act
        self.bn1 = batch_norm(in_planes, dtype=dtype, rngs=rngs)
        self.conv1 = conv(in_planes, 4 * growth_rate, 1, rngs=rngs)
        self.bn2 = batch_norm(4 * growth_rate, dtype=dtype, rngs=rngs)
        self.conv2 = conv(4 * growth_rate, growth_rate, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.conv1(self.act(self.bn1(x)))
        out = self.conv2(self.act(self.bn2(out)))
        return jnp.concatenate([x, out], axis=-1)


class Transition(nnx.Module):
    """``avg_pool_2x2(conv1x1(act(bn1(x))))``."""

    def __init__(self, in_planes: int, out_planes: int, *, conv, act, dtype, rngs):
        self.act = act
        self.bn1 = batch_norm(in_planes, dtype=dtype, rngs=rngs)
        self.conv1 = conv(in_planes, out_planes, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return avg_pool_2x2(self.conv1(self.act(self.bn1(x))))


class DenseNet(Classifier):
    """DenseNet-BC; ``DenseNet100 = partial(DenseNet, depth=100, growth_rate=12)``.

    Args:
      depth: total depth, ``6n + 4`` (``n`` bottleneck layers per dense block).
      growth_rate: channels each layer adds (12 for DenseNet-BC-100-12).
      num_classes: size of the head.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      **options: the shared options of ``Classifier``.
    """

    def __init__(
        self, *, depth: int, growth_rate: int, num_classes: int, rngs: nnx.Rngs, **options: Any
    ):
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (e.g. 100), got {depth}.")
        layers_per_block = (depth - 4) // 6
        channels = [2 * growth_rate]
        for _ in range(2):  # channels entering blocks 2 and 3 (after a transition)
            channels.append((channels[-1] + layers_per_block * growth_rate) // 2)
        feature_dim = channels[-1] + layers_per_block * growth_rate
        super().__init__(
            feature_dim, num_classes=num_classes, zero_head_bias=True, rngs=rngs, **options
        )
        conv = self.conv_factory(kaiming_normal_fan_out)
        kw = dict(conv=conv, act=self.act, dtype=self.dtype, rngs=rngs)
        self.conv1 = conv(3, channels[0], 3, rngs=rngs)
        blocks, transitions = [], []
        for b, in_planes in enumerate(channels):
            layers = [
                DenseLayer(in_planes + i * growth_rate, growth_rate, **kw)
                for i in range(layers_per_block)
            ]
            blocks.append(nnx.List(layers))
            if b < 2:
                transitions.append(
                    Transition(in_planes + layers_per_block * growth_rate, channels[b + 1], **kw)
                )
        self.blocks = nnx.List(blocks)
        self.transitions = nnx.List(transitions)
        self.bn = batch_norm(feature_dim, dtype=self.dtype, rngs=rngs)

    def feature_map(self, images: jax.Array, blocks: list | None = None) -> jax.Array:
        x = keep(blocks, self.conv1(images))
        for b, block in enumerate(self.blocks):
            for layer in block:
                x = layer(x)
            if b < len(self.transitions):
                x = self.transitions[b](x)
            x = keep(blocks, x)
        return self.act(self.bn(x))


DenseNet100 = partial(DenseNet, depth=100, growth_rate=12)
