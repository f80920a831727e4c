"""Image classifiers for OOD detection (Flax NNX), built by name.

``create_model(name, *, num_classes, rngs, **options)`` with ``name`` in
``MODEL_NAMES``, or ``build_model(identity, seed)`` from a model identity (what a
checkpoint records: workdirs, published checkpoints and imported files all use it);
every model maps float32 NHWC images ``[B, 32, 32, 3]`` to
``(logits, features)`` and exposes its final ``nnx.Linear`` as ``model.head``.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from ood_jax.models.classifier import Classifier, check_images
from ood_jax.models.densenet import DenseNet, DenseNet100
from ood_jax.models.layers import SpectralNormConv
from ood_jax.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNet18,
    ResNet18ImageNet,
    ResNet34,
    ResNet50,
    ResNet50ImageNet,
)
from ood_jax.models.resnet9 import ResNet9
from ood_jax.models.tiny import TinyCNN
from ood_jax.models.wrn import WRN40_2, WideResNet

_REGISTRY: dict[str, Callable[..., Classifier]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "wrn40_2": WRN40_2,
    "resnet9": ResNet9,
    "tiny": TinyCNN,
    "resnet18_imagenet": ResNet18ImageNet,
    "resnet50_imagenet": ResNet50ImageNet,
    "densenet100": DenseNet100,
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def create_model(name: str, *, num_classes: int, rngs: nnx.Rngs, **options) -> Classifier:
    """Build the model called ``name``.

    Args:
      name: one of ``MODEL_NAMES``: "resnet18", "resnet34", "resnet50" (CIFAR
        stem), "wrn40_2" (WRN-40-2, dropout 0.3), "resnet9"
        (DAWNBench ResNet-9, ``width`` option; the CPU preset), "tiny" (tests only),
        "resnet18_imagenet", "resnet50_imagenet" (torchvision's ImageNet stem),
        "densenet100" (DenseNet-BC-100-12).
      num_classes: size of the linear head.
      rngs: ``nnx.Rngs``; ``params`` initializes weights, ``dropout`` drives
        dropout (``nnx.Rngs(seed)`` provides both).
      **options: keyword options of the model class: ``activation``
        ("relu" | "leaky_relu"), ``spectral_norm`` (bool),
        ``spectral_norm_iterations``, ``pooling`` ("avg"),
        ``normalize_features`` (bool, training-only L2 normalization of the
        features before the head), ``dtype`` (compute dtype), and per model
        e.g. ``dropout_rate`` (WRN, tiny) or ``width`` (tiny).

    Returns:
      An ``nnx.Module`` in training mode; ``model(images) -> (logits, features)``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model name {name!r}; known models: {', '.join(MODEL_NAMES)}.")
    try:
        return _REGISTRY[name](num_classes=num_classes, rngs=rngs, **options)
    except TypeError as err:
        raise ValueError(f"Bad options for model {name!r}: {err}") from err


def build_model(identity: Mapping[str, Any], seed: int = 0) -> nnx.Module:
    """The freshly initialized model a model identity describes.

    Args:
      identity: ``{"name", "num_classes", "options"}`` as a checkpoint records it (JSON
        values): ``options`` are :func:`create_model`'s, with ``"dtype": "bfloat16"``
        meaning bfloat16 compute.
      seed: ``nnx.Rngs(seed)`` initializes the weights.
    """
    options = dict(identity.get("options", {}))
    if options.get("dtype") == "bfloat16":
        options["dtype"] = jnp.bfloat16
    return create_model(
        identity["name"], num_classes=int(identity["num_classes"]), rngs=nnx.Rngs(seed), **options
    )


__all__ = [
    "MODEL_NAMES",
    "WRN40_2",
    "BasicBlock",
    "Bottleneck",
    "Classifier",
    "DenseNet",
    "DenseNet100",
    "ResNet",
    "ResNet18",
    "ResNet18ImageNet",
    "ResNet34",
    "ResNet50",
    "ResNet50ImageNet",
    "ResNet9",
    "SpectralNormConv",
    "TinyCNN",
    "WideResNet",
    "build_model",
    "check_images",
    "create_model",
]
