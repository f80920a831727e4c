"""Toy models and data shared by the tests: a model with closed-form gradients, a tiny
CNN in eval mode, random and labelled batches, random CIFAR-like npz files."""

import numpy as np
from flax import nnx

from ood_jax.models import create_model


class FlatLinear(nnx.Module):
    """logits = flatten(x) @ W + b; features = flatten(x). Gradients are closed-form."""

    def __init__(self, in_dim, num_classes, *, rngs):
        self.head = nnx.Linear(in_dim, num_classes, rngs=rngs)

    def __call__(self, images):
        z = images.reshape(images.shape[0], -1)
        return self.head(z), z


def write_cifar_split(folder, split, n, seed):
    """``folder/cifar10_<split>.npz``: ``n`` random 32x32 RGB images, random labels 0-9
    (what ``config.data.source = folder`` reads)."""
    rng = np.random.default_rng(seed)
    np.savez(
        folder / f"cifar10_{split}.npz",
        images=rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
        labels=rng.integers(0, 10, n).astype(np.int32),
    )


def make_batch(rng, n, shape=(2, 2, 3), num_classes=4):
    """Random normalized images, labels and an all-True mask."""
    return {
        "image": rng.normal(size=(n, *shape)).astype(np.float32),
        "label": rng.integers(0, num_classes, n).astype(np.int32),
        "mask": np.ones(n, bool),
    }


def tiny_eval_model(*, width, image_size, num_classes=3, **options):
    """The ``tiny`` CNN after one training-mode call (BatchNorm statistics moved), in eval mode."""
    model = create_model("tiny", num_classes=num_classes, rngs=nnx.Rngs(0), width=width, **options)
    images = np.random.default_rng(5).normal(size=(8, image_size, image_size, 3))
    model(images.astype(np.float32))
    model.eval()
    return model


def labelled_batches(images, labels, size):
    """Batches of ``size`` of ``images`` and ``labels`` (the last one shorter), masks all True."""
    for start in range(0, len(images), size):
        part = slice(start, start + size)
        n = len(images[part])
        yield {"image": images[part], "label": labels[part], "mask": np.ones(n, bool)}
