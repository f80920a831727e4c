"""The PyTorch architectures ood_jax can import, and where each one's keys go.

Each :class:`Architecture` names the ood_jax model it becomes (a registry name
of ``ood_jax.models`` plus options) and maps every module of that model to
the PyTorch module name whose ``weight`` / ``bias`` / ``running_mean`` /
``running_var`` it takes. The layouts, as in the authors' code:

- ``wrn40_2``: hendrycks/outlier-exposure ``CIFAR/models/wrn.py`` (also the
  energy and LogitNorm repositories): ``conv1``, ``block{1,2,3}.layer.{i}.
  {bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``.
- ``resnet18_32x32`` (OpenOOD v1.5 ``ResNet18_32x32``) and ``resnet18_cifar``
  (kuangliu/pytorch-cifar ``ResNet18``): ``conv1``, ``bn1``,
  ``layer{1-4}.{i}.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}``, head ``fc``
  (OpenOOD) or ``linear`` (kuangliu).
- ``torchvision_resnet18`` / ``torchvision_resnet50``: torchvision's
  ``resnet18`` / ``resnet50``: ``conv1``, ``bn1``, ``layer{1-4}.{i}.
  {conv1,bn1,conv2,bn2[,conv3,bn3],downsample.0,downsample.1}``, ``fc``.
- ``densenet100``: ``DenseNet3(100, growth_rate=12)`` of the ODIN and
  Mahalanobis repositories (from andreasveit/densenet-pytorch): ``conv1``, ``block{1,2,3}.layer.{i}.
  {bn1,conv1,bn2,conv2}``, ``trans{1,2}.{bn1,conv1}``, ``bn1``, ``fc``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx

from ood_jax.data import CIFAR10_MEAN, CIFAR10_STD

Path = tuple[Any, ...]

# The input normalizations (per-channel mean, std of [0, 1] RGB) the authors trained with.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # hendrycks/outlier-exposure, energy_ood, LogitNorm, ODIN's DenseNet: ood_jax's own.
    "cifar10": (tuple(CIFAR10_MEAN), tuple(CIFAR10_STD)),
    # OpenOOD v1.5's CIFAR-10 benchmark (openood/preprocessors/transform.py).
    "openood_cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # kuangliu/pytorch-cifar main.py.
    "kuangliu_cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # torchvision's ImageNet weights.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A PyTorch architecture and the ood_jax model it converts to.

    Attributes:
      model: the ``ood_jax.models`` registry name.
      options: keyword options for that model.
      torch_name: ``(module path in the ood_jax model, model) -> PyTorch module name``.
      head: the PyTorch name of the final linear layer (gives ``num_classes``).
      normalization: the input normalization the authors trained with (a
        ``NORMALIZATIONS`` name).
      source: where the PyTorch definition lives.
    """

    model: str
    options: dict[str, Any]
    torch_name: Callable[[Path, nnx.Module], str]
    head: str
    normalization: str
    source: str


def _join(*parts: Any) -> str:
    return ".".join(str(p) for p in parts)


def _wrn_name(path: Path, model: nnx.Module) -> str:
    top = {"conv1": "conv1", "bn": "bn1", "head": "fc"}
    if path[0] in top:
        return top[path[0]]
    per_group = len(model.blocks) // 3
    _, k, module = path
    module = "convShortcut" if module == "shortcut" else module
    return _join(f"block{k // per_group + 1}", "layer", k % per_group, module)


def _resnet_name(stage_sizes: tuple[int, ...], shortcut: str, head: str):
    starts = [sum(stage_sizes[:s]) for s in range(len(stage_sizes))]

    def name(path: Path, model: nnx.Module) -> str:
        del model
        if path[0] == "head":
            return head
        if path[0] != "blocks":
            return path[0]
        _, k, module, *rest = path
        stage = max(s for s, start in enumerate(starts) if start <= k)
        module = shortcut if module == "shortcut" else module
        return _join(f"layer{stage + 1}", k - starts[stage], module, *rest)

    return name


def _densenet_name(path: Path, model: nnx.Module) -> str:
    del model
    top = {"conv1": "conv1", "bn": "bn1", "head": "fc"}
    if path[0] in top:
        return top[path[0]]
    if path[0] == "transitions":
        return _join(f"trans{path[1] + 1}", path[2])
    _, block, layer, module = path
    return _join(f"block{block + 1}", "layer", layer, module)


_RESNET18 = (2, 2, 2, 2)
ARCHITECTURES: dict[str, Architecture] = {
    "wrn40_2": Architecture(
        "wrn40_2",
        {},
        _wrn_name,
        "fc",
        "cifar10",
        "hendrycks/outlier-exposure CIFAR/models/wrn.py WideResNet(40, C, 2, dropRate=0.3)",
    ),
    "resnet18_32x32": Architecture(
        "resnet18",
        {},
        _resnet_name(_RESNET18, "shortcut", "fc"),
        "fc",
        "openood_cifar10",
        "Jingkang50/OpenOOD openood/networks/resnet18_32x32.py ResNet18_32x32",
    ),
    "resnet18_cifar": Architecture(
        "resnet18",
        {},
        _resnet_name(_RESNET18, "shortcut", "linear"),
        "linear",
        "kuangliu_cifar10",
        "kuangliu/pytorch-cifar models/resnet.py ResNet18",
    ),
    "torchvision_resnet18": Architecture(
        "resnet18_imagenet",
        {},
        _resnet_name(_RESNET18, "downsample", "fc"),
        "fc",
        "imagenet",
        "pytorch/vision torchvision/models/resnet.py resnet18",
    ),
    "torchvision_resnet50": Architecture(
        "resnet50_imagenet",
        {},
        _resnet_name((3, 4, 6, 3), "downsample", "fc"),
        "fc",
        "imagenet",
        "pytorch/vision torchvision/models/resnet.py resnet50",
    ),
    "densenet100": Architecture(
        "densenet100",
        {},
        _densenet_name,
        "fc",
        "cifar10",
        "pokaxpoka/deep_Mahalanobis_detector models/densenet.py DenseNet3(100, C)",
    ),
}
ARCH_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)


def get_architecture(name: str) -> Architecture:
    """The :class:`Architecture` called ``name`` (one of ``ARCH_NAMES``)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCH_NAMES)}.")
    return ARCHITECTURES[name]
