"""A very small CNN for tests: two conv-BN-act layers, global pooling, a head.

It shares every option and the ``(logits, features)`` contract with the real
models (``ood_jax.models.Classifier``) but trains in seconds on a CPU.
"""

from functools import partial
from typing import Any

import jax
from flax import nnx

from ood_jax.models.classifier import Classifier, keep
from ood_jax.models.layers import batch_norm, kaiming_normal_fan_out


class TinyCNN(Classifier):
    """conv3x3(3->width) -> BN -> act -> conv3x3 stride 2 (->2*width) -> BN -> act
    -> dropout -> global pool -> head. Features have ``2 * width`` dims."""

    def __init__(
        self,
        *,
        num_classes: int,
        width: int = 8,
        dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
        **options: Any,
    ):
        super().__init__(
            2 * width, num_classes=num_classes, zero_head_bias=True, rngs=rngs, **options
        )
        conv = partial(self.conv_factory(kaiming_normal_fan_out), rngs=rngs)
        dtype = self.dtype
        self.conv1 = conv(3, width, 3)
        self.bn1 = batch_norm(width, dtype=dtype, rngs=rngs)
        self.conv2 = conv(width, 2 * width, 3, stride=2)
        self.bn2 = batch_norm(2 * width, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def feature_map(self, images: jax.Array, blocks: list | None = None) -> jax.Array:
        x = keep(blocks, self.act(self.bn1(self.conv1(images))))
        x = keep(blocks, self.act(self.bn2(self.conv2(x))))
        return self.dropout(x)
