"""Wide ResNets (Zagoruyko & Komodakis, BMVC 2016) in Flax NNX.

A port of the WideResNet used by the outlier-exposure, energy-OOD and
LogitNorm repositories (``wrn.py`` in hendrycks/outlier-exposure):
pre-activation blocks ``BN -> act -> conv3x3 -> BN -> act -> dropout ->
conv3x3`` plus the shortcut; ``(depth - 4) / 6`` blocks in each of three
groups of widths ``16k, 32k, 64k`` (strides 1, 2, 2) after a 16-channel 3x3
stem; final BN -> act -> global average pooling -> linear head. Where a block
changes the width, the 1x1 projection shortcut reads the *pre-activated*
input, exactly as in that code.

Initialization as in that code: convs kaiming normal with fan_out
(``N(0, 2 / (k*k*out))``), BatchNorm scale 1 / bias 0, head bias 0 and head
kernel PyTorch's default ``U(+-1/sqrt(fan_in))``.

WRN-40-2 with 10 classes has 2,243,546 trainable parameters.
"""

from functools import partial
from typing import Any

import jax
from flax import nnx

from ood_jax.models.classifier import Classifier, keep
from ood_jax.models.layers import batch_norm, kaiming_normal_fan_out


class WideBasicBlock(nnx.Module):
    """Pre-activation wide block with dropout between the two 3x3 convs."""

    def __init__(self, in_planes, out_planes, stride, *, dropout_rate, conv, act, dtype, rngs):
        self.act = act
        self.bn1 = batch_norm(in_planes, dtype=dtype, rngs=rngs)
        self.conv1 = conv(in_planes, out_planes, 3, stride=stride, rngs=rngs)
        self.bn2 = batch_norm(out_planes, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.conv2 = conv(out_planes, out_planes, 3, rngs=rngs)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.shortcut = (
            None if self.equal_in_out else conv(in_planes, out_planes, 1, stride=stride, rngs=rngs)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        pre = self.act(self.bn1(x))
        out = self.act(self.bn2(self.conv1(pre)))
        out = self.conv2(self.dropout(out))
        residual = x if self.shortcut is None else self.shortcut(pre)
        return out + residual


class WideResNet(Classifier):
    """WRN-depth-k; ``WRN40_2 = partial(WideResNet, depth=40, widen_factor=2, dropout_rate=0.3)``.

    Args:
      depth: total depth, ``6n + 4``.
      widen_factor: width multiplier ``k``.
      dropout_rate: dropout inside every block (training mode only).
      base_width: channels of the stem (16 in the paper); the groups have
        ``base_width * k * (1, 2, 4)``. Smaller values give reduced-width
        copies with the same layout (test fixtures).
      num_classes: size of the head.
      rngs: ``nnx.Rngs`` with ``params`` and, for dropout, ``dropout`` streams
        (a lone seed such as ``nnx.Rngs(0)`` serves both).
      **options: the shared options of ``Classifier``.
    """

    def __init__(
        self,
        *,
        depth: int,
        widen_factor: int,
        dropout_rate: float = 0.0,
        base_width: int = 16,
        num_classes: int,
        rngs: nnx.Rngs,
        **options: Any,
    ):
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (e.g. 40), got {depth}.")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
        widths = (base_width, *(base_width * widen_factor * m for m in (1, 2, 4)))
        super().__init__(
            widths[-1], num_classes=num_classes, zero_head_bias=True, rngs=rngs, **options
        )
        conv = self.conv_factory(kaiming_normal_fan_out)
        dtype = self.dtype
        self.conv1 = conv(3, widths[0], 3, rngs=rngs)
        blocks = []
        for group, stride in enumerate((1, 2, 2)):
            for i in range((depth - 4) // 6):
                in_planes = widths[group] if i == 0 else widths[group + 1]
                blocks.append(
                    WideBasicBlock(
                        in_planes,
                        widths[group + 1],
                        stride if i == 0 else 1,
                        dropout_rate=dropout_rate,
                        conv=conv,
                        act=self.act,
                        dtype=dtype,
                        rngs=rngs,
                    )
                )
        self.blocks = nnx.List(blocks)
        self.bn = batch_norm(widths[-1], dtype=dtype, rngs=rngs)

    def feature_map(self, images: jax.Array, blocks: list | None = None) -> jax.Array:
        x = keep(blocks, self.conv1(images))
        per_group = len(self.blocks) // 3
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i % per_group == per_group - 1:
                x = keep(blocks, x)
        return self.act(self.bn(x))


WRN40_2 = partial(WideResNet, depth=40, widen_factor=2, dropout_rate=0.3)
