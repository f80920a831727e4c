"""PyTorch checkpoints in: the papers', OpenOOD's and torchvision's models as ood_jax models.

    from ood_jax import interop
    model, info = interop.load_torch("cifar10_wrn_pretrained_epoch_99.pt", "wrn40_2")
    logits, features = model(images)  # NHWC, normalized with info["normalization"]

``load_torch`` reads the file without running code from it (a restricted
unpickler of our own, no torch needed; ``.safetensors`` through the
``safetensors`` package), takes off checkpoint wrappers and ``module.``
prefixes, maps the keys onto the ood_jax model of ``arch`` with the layout
changes (OIHW -> HWIO, the head transposed, BatchNorm running statistics) and
refuses a state_dict that does not fit exactly. ``ARCH_NAMES`` lists the
architectures; docs/interop.md says what differs between the frameworks per
architecture and where the papers' checkpoints live.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from ood_jax.interop.architectures import (
    ARCH_NAMES,
    NORMALIZATIONS,
    Architecture,
    get_architecture,
)
from ood_jax.interop.convert import StateDictMismatchError, load_state_dict
from ood_jax.interop.state_dict import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    read_state_dict,
    unwrap_state_dict,
)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    arch: str,
    *,
    num_classes: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[nnx.Module, dict[str, Any]]:
    """The ood_jax model of ``arch`` holding ``state_dict``, in eval mode; and its identity.

    Args:
      state_dict: PyTorch names -> arrays (unwrapped).
      arch: one of ``ARCH_NAMES``.
      num_classes: size of the head; by default read from the head's weight.
      options: extra model options (e.g. ``base_width`` / ``widths`` /
        ``growth_rate`` for reduced-width copies), merged over the architecture's.

    Returns:
      ``(model, identity)``; ``identity`` = ``{"name", "num_classes", "options"}``
      as ``ood_jax.models`` builds models from (workdirs and published
      checkpoints use the same form).

    Raises:
      StateDictMismatchError: the state_dict does not fit (first bad key named).
    """
    from ood_jax.models import create_model

    spec = get_architecture(arch)
    if num_classes is None:
        head = state_dict.get(f"{spec.head}.weight")
        if head is None:
            raise StateDictMismatchError(
                f"missing key '{spec.head}.weight' (the {arch} head): is --arch right?"
            )
        num_classes = int(np.shape(head)[0])
    identity = {
        "name": spec.model,
        "num_classes": num_classes,
        "options": {**spec.options, **(options or {})},
    }

    def create() -> nnx.Module:
        return create_model(
            spec.model, num_classes=num_classes, rngs=nnx.Rngs(0), **identity["options"]
        )

    # Only the shapes of the weights: running every initializer (one XLA:CPU compile
    # per op and shape) takes far longer than the conversion. The rest of the state
    # (dropout RNG streams) comes from one jitted call in which the initializers are
    # dead code.
    model = nnx.eval_shape(create)
    if jax.tree.leaves(nnx.state(model, _NOT_WEIGHTS)):
        nnx.update(model, jax.jit(lambda: nnx.state(create(), _NOT_WEIGHTS))())
    load_state_dict(model, state_dict, spec)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
    abstract = next((p for p, v in leaves if isinstance(v, jax.ShapeDtypeStruct)), None)
    if abstract is not None:
        raise StateDictMismatchError(
            f"the {spec.model} model's variable {jax.tree_util.keystr(abstract)} has no "
            f"PyTorch counterpart in {arch!r} (an option that adds weights?)."
        )
    model.eval()
    return model, identity


_NOT_WEIGHTS = nnx.Not(nnx.Any(nnx.Param, nnx.BatchStat))


def load_torch(
    path: str | os.PathLike,
    arch: str,
    *,
    num_classes: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[nnx.Module, dict[str, Any]]:
    """Load a PyTorch checkpoint file as an ood_jax model, ready for evaluation.

    Args:
      path: ``.pt`` / ``.pth`` / ``.ckpt`` (``torch.save``, zip or legacy
        layout; a state_dict, possibly wrapped) or ``.safetensors``.
      arch: one of ``ARCH_NAMES`` ("wrn40_2", "resnet18_32x32",
        "resnet18_cifar", "torchvision_resnet18", "torchvision_resnet50",
        "densenet100").
      num_classes: size of the head; by default read from the file.
      options: extra model options (see :func:`convert_state_dict`).

    Returns:
      ``(model, info)``: the model in eval mode (``model.train()`` for
      fine-tuning), and ``info`` with ``identity`` (the model identity),
      ``arch``, ``normalization`` (the name of the authors' input normalization
      in ``NORMALIZATIONS``), ``source`` (where the PyTorch definition lives) and
      ``provenance`` (``path``, ``sha256``, ``format``).

    Raises:
      UnsafeCheckpointError: the file is not only tensors and plain containers
        (nothing from it is run) or is malformed.
      CheckpointFormatError: no state_dict inside.
      StateDictMismatchError: the state_dict does not fit ``arch``.
    """
    state_dict, provenance = read_state_dict(path)
    model, identity = convert_state_dict(state_dict, arch, num_classes=num_classes, options=options)
    spec = get_architecture(arch)
    info = {
        "identity": identity,
        "arch": arch,
        "normalization": spec.normalization,
        "source": spec.source,
        "provenance": provenance,
    }
    return model, info


__all__ = [
    "ARCH_NAMES",
    "NORMALIZATIONS",
    "Architecture",
    "CheckpointFormatError",
    "StateDictMismatchError",
    "UnsafeCheckpointError",
    "convert_state_dict",
    "get_architecture",
    "load_state_dict",
    "load_torch",
    "read_state_dict",
    "unwrap_state_dict",
]
