"""A model with closed-form gradients and random batches, shared by the training tests."""

import numpy as np
from flax import nnx


class FlatLinear(nnx.Module):
    """logits = flatten(x) @ W + b; features = flatten(x). Gradients are closed-form."""

    def __init__(self, in_dim, num_classes, *, rngs):
        self.head = nnx.Linear(in_dim, num_classes, rngs=rngs)

    def __call__(self, images):
        z = images.reshape(images.shape[0], -1)
        return self.head(z), z


def make_batch(rng, n, shape=(2, 2, 3), num_classes=4):
    """Random normalized images, labels and an all-True mask."""
    return {
        "image": rng.normal(size=(n, *shape)).astype(np.float32),
        "label": rng.integers(0, num_classes, n).astype(np.int32),
        "mask": np.ones(n, bool),
    }
