"""ResNet-9 (Page, "How to train your ResNet", 2018; the DAWNBench CIFAR-10 net) in Flax NNX.

A fast, shallow residual net for short CPU schedules (the ``cpu`` preset of
the experiments): prep conv (w) -> conv (2w) + max-pool -> residual block of
two convs (2w) -> conv (4w) + max-pool -> conv (8w) + max-pool -> residual
block (8w) -> global pooling -> linear head. Every conv is 3x3, stride 1, no
bias, followed by BatchNorm and the activation. ``width`` is the prep conv's
channels: 64 is the original (6.57M parameters with 10 classes), 16 costs
about a sixteenth of the compute and trained to 82% CIFAR-10 (JPEG) accuracy
in 11 epochs (24 minutes) on two CPU cores with LogitNorm.

The original ends with a global max-pool: pass ``pooling="max"`` for it (the
``cpu`` preset does); the default is global average pooling like the other
models. Convs use Flax's default LeCun-normal initialization. With BatchNorm
after every conv, the initial weight scale sets the effective learning rate
under weight decay; in the 7-epoch CPU schedule, PyTorch's smaller default
init (std ``1/sqrt(3 fan_in)``) with average pooling reached 66% test accuracy
after 5 of 7 epochs where LeCun-normal init with max pooling reached 80%
(two single runs, both factors changed at once).
"""

from typing import Any

import jax
from flax import nnx

from ood_jax.models.classifier import Classifier, keep
from ood_jax.models.layers import batch_norm, max_pool_2x2


class ConvBlock(nnx.Module):
    """``act(bn(conv3x3(x)))``, optionally followed by a 2x2 max-pool."""

    def __init__(self, in_planes: int, planes: int, *, pool: bool, conv, act, dtype, rngs):
        self.conv = conv(in_planes, planes, 3, rngs=rngs)
        self.bn = batch_norm(planes, dtype=dtype, rngs=rngs)
        self.act = act
        self.pool = pool

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.act(self.bn(self.conv(x)))
        return max_pool_2x2(x) if self.pool else x


class ResNet9(Classifier):
    """ResNet-9 with base width ``width`` (channels w, 2w, 4w, 8w).

    Args:
      width: channels of the prep conv (64 in the original).
      num_classes: size of the head.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      **options: the shared ``Classifier`` options.
    """

    def __init__(self, *, width: int = 64, num_classes: int, rngs: nnx.Rngs, **options: Any):
        if width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}.")
        super().__init__(
            8 * width, num_classes=num_classes, zero_head_bias=False, rngs=rngs, **options
        )
        block = dict(
            conv=self.conv_factory(nnx.initializers.lecun_normal()),
            act=self.act,
            dtype=self.dtype,
            rngs=rngs,
        )
        w = width
        self.prep = ConvBlock(3, w, pool=False, **block)
        self.layer1 = ConvBlock(w, 2 * w, pool=True, **block)
        self.res1 = nnx.List([ConvBlock(2 * w, 2 * w, pool=False, **block) for _ in range(2)])
        self.layer2 = ConvBlock(2 * w, 4 * w, pool=True, **block)
        self.layer3 = ConvBlock(4 * w, 8 * w, pool=True, **block)
        self.res3 = nnx.List([ConvBlock(8 * w, 8 * w, pool=False, **block) for _ in range(2)])

    def feature_map(self, images: jax.Array, blocks: list | None = None) -> jax.Array:
        x = self.layer1(keep(blocks, self.prep(images)))
        x = keep(blocks, x + self.res1[1](self.res1[0](x)))
        x = self.layer3(keep(blocks, self.layer2(x)))
        return keep(blocks, x + self.res3[1](self.res3[0](x)))
