"""ResNets (He et al., CVPR 2016) in Flax NNX: the CIFAR stem by default, torchvision's on request.

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

``stem="imagenet"`` gives torchvision's ``resnet18`` / ``resnet50`` (v1.5:
the stride of a Bottleneck is on its 3x3 conv, as here): a 7x7 stride-2 conv
padded by 3, BN, act, and a 3x3 stride-2 max-pool padded by 1 with ``-inf``
(PyTorch's ``MaxPool2d(3, 2, 1)``), then the same stages; with 1000 classes
11,689,512 and 25,557,032 parameters, as torchvision's. ``widths`` scales the
four stages (reduced-width copies for tests keep the key layout).
"""

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ood_jax.models.classifier import Classifier, keep
from ood_jax.models.layers import batch_norm, torch_default_init

STEMS = ("cifar", "imagenet")


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    """PyTorch's ``MaxPool2d(3, stride=2, padding=1)`` on NHWC: the padding is ``-inf``."""
    return jax.lax.reduce_window(
        x,
        jnp.array(-jnp.inf, x.dtype),
        jax.lax.max,
        (1, 3, 3, 1),
        (1, 2, 2, 1),
        ((0, 0), (1, 1), (1, 1), (0, 0)),
    )


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
    """ResNet; variants are partials (``ResNet18``, ``ResNet50``, ``ResNet18ImageNet``, ...).

    Args:
      stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
      block_cls: ``BasicBlock`` or ``Bottleneck``.
      num_classes: size of the head.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      stem: "cifar" (3x3 stride-1 conv, no max-pool) or "imagenet" (torchvision's
        7x7 stride-2 conv and 3x3 stride-2 max-pool).
      widths: channels of the four stages (before the Bottleneck expansion).
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
        stem: str = "cifar",
        widths: Sequence[int] = (64, 128, 256, 512),
        **options: Any,
    ):
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}.")
        if len(widths) != 4:
            raise ValueError(f"widths must give the four stages' channels, got {widths!r}.")
        super().__init__(
            widths[-1] * block_cls.expansion,
            num_classes=num_classes,
            zero_head_bias=False,
            rngs=rngs,
            **options,
        )
        conv = self.conv_factory(torch_default_init)
        dtype = self.dtype
        self.stem = stem
        self.stage_sizes = tuple(stage_sizes)
        self.conv1 = conv(
            3, widths[0], 7 if stem == "imagenet" else 3, rngs=rngs, stride=1 + (stem == "imagenet")
        )
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

    def feature_map(self, images: jax.Array, blocks: list | None = None) -> jax.Array:
        x = self.act(self.bn1(self.conv1(images)))
        if self.stem == "imagenet":
            x = max_pool_3x3_stride2(x)
        x = keep(blocks, x)
        last = {sum(self.stage_sizes[: s + 1]) - 1 for s in range(len(self.stage_sizes))}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in last:
                x = keep(blocks, x)
        return x


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet18ImageNet = partial(ResNet18, stem="imagenet")
ResNet50ImageNet = partial(ResNet50, stem="imagenet")
