"""CIFAR ResNets (He et al., CVPR 2016) in Flax NNX.

The CIFAR variant of kuangliu/pytorch-cifar (also used by the LogitNorm and
L2-normalization papers): a 3x3 stride-1 stem conv with 64 channels, no
max-pool, four stages of widths 64/128/256/512 with strides 1/2/2/2, global
average pooling and one linear head. ``BasicBlock`` (ResNet-18/34) is
conv3x3-BN-act-conv3x3-BN plus the shortcut, then act; ``Bottleneck``
(ResNet-50) is 1x1-3x3(stride)-1x1 with expansion 4. Projection shortcuts
(1x1 conv + BN) where the shape changes.

Initialization follows that PyTorch code, which keeps PyTorch's defaults:
convs and the head kernel ``U(+-1/sqrt(fan_in))`` (kaiming_uniform with
a=sqrt(5)), head bias ``U(+-1/sqrt(fan_in))``, BatchNorm scale 1 / bias 0.

Trainable parameters with 10 classes: ResNet-18 11,173,962; ResNet-34
21,282,122; ResNet-50 23,520,842 (the PyTorch counts).
"""

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
from flax import nnx

from ood_jax.models.classifier import Classifier, global_pool
from ood_jax.models.layers import batch_norm, torch_default_init


class BasicBlock(nnx.Module):
    """``act(bn(conv3x3(act(bn(conv3x3(x))))) + shortcut(x))``; expansion 1."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, *, conv, act, dtype, rngs):
        self.act = act
        self.conv1 = conv(in_planes, planes, 3, stride=stride, rngs=rngs)
        self.bn1 = batch_norm(planes, dtype=dtype, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, rngs=rngs)
        self.bn2 = batch_norm(planes, dtype=dtype, rngs=rngs)
        self.shortcut = _shortcut(in_planes, planes, stride, conv=conv, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + _apply_shortcut(self.shortcut, x))


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4 channels), BN after each, shortcut; expansion 4."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, *, conv, act, dtype, rngs):
        out_planes = planes * self.expansion
        self.act = act
        self.conv1 = conv(in_planes, planes, 1, rngs=rngs)
        self.bn1 = batch_norm(planes, dtype=dtype, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, stride=stride, rngs=rngs)
        self.bn2 = batch_norm(planes, dtype=dtype, rngs=rngs)
        self.conv3 = conv(planes, out_planes, 1, rngs=rngs)
        self.bn3 = batch_norm(out_planes, dtype=dtype, rngs=rngs)
        self.shortcut = _shortcut(in_planes, out_planes, stride, conv=conv, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + _apply_shortcut(self.shortcut, x))


def _shortcut(in_planes, out_planes, stride, *, conv, dtype, rngs) -> nnx.List:
    """Projection (1x1 conv + BN) when the shape changes, else identity (empty list)."""
    if stride == 1 and in_planes == out_planes:
        return nnx.List([])
    return nnx.List(
        [
            conv(in_planes, out_planes, 1, stride=stride, rngs=rngs),
            batch_norm(out_planes, dtype=dtype, rngs=rngs),
        ]
    )


def _apply_shortcut(layers: nnx.List, x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x


class ResNet(Classifier):
    """CIFAR ResNet; variants are partials (``ResNet18``, ``ResNet34``, ``ResNet50``).

    Args:
      stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
      block_cls: ``BasicBlock`` or ``Bottleneck``.
      num_classes: size of the head.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      **options: the shared options of ``Classifier`` (activation,
        spectral_norm, spectral_norm_iterations, pooling, normalize_features,
        dtype).
    """

    def __init__(
        self,
        *,
        stage_sizes: Sequence[int],
        block_cls: type[BasicBlock] | type[Bottleneck],
        num_classes: int,
        rngs: nnx.Rngs,
        **options: Any,
    ):
        widths = (64, 128, 256, 512)
        super().__init__(
            widths[-1] * block_cls.expansion,
            num_classes=num_classes,
            zero_head_bias=False,
            rngs=rngs,
            **options,
        )
        conv = self.conv_factory(torch_default_init)
        dtype = self.dtype
        self.conv1 = conv(3, widths[0], 3, rngs=rngs)
        self.bn1 = batch_norm(widths[0], dtype=dtype, rngs=rngs)
        blocks = []
        in_planes = widths[0]
        for stage, (num_blocks, planes) in enumerate(zip(stage_sizes, widths, strict=True)):
            for i in range(num_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(
                    block_cls(
                        in_planes, planes, stride, conv=conv, act=self.act, dtype=dtype, rngs=rngs
                    )
                )
                in_planes = planes * block_cls.expansion
        self.blocks = nnx.List(blocks)

    def features(self, images: jax.Array) -> jax.Array:
        x = self.act(self.bn1(self.conv1(images)))
        for block in self.blocks:
            x = block(x)
        return global_pool(x, self.pooling)


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
