"""PyTorch checkpoints for the entry points: evaluate one, or fine-tune from one.

- ``python -m experiments.evaluate --torch_checkpoint FILE --arch NAME
  [--normalization cifar10|imagenet|MEAN,STD] [--num_classes N]``
  (``experiments.evaluate_torch.evaluate_torch``): :func:`load_for_evaluation` gives the
  model in eval mode, the input normalization it is evaluated with and the
  provenance (file, sha256, arch, normalization) the report records.

- ``--init_from FILE.pt`` in training: when ``is_torch_checkpoint(source)``,
  ``initial_weights(source, identity)`` replaces
  ``experiments.workdir.Workdir(source).initial_weights(identity)`` and returns the
  same ``(params, batch_stats, step)`` (step 0), so OE and energy fine-tuning
  can start from the authors' pretrained WRN-40-2 as in their papers.

Errors a user can fix (unknown architecture, bad ``--normalization``, a file
that does not fit) are ``experiments.cli.UsageError``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from flax import nnx

from experiments.cli import UsageError
from ood_jax import interop

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


@dataclasses.dataclass(frozen=True)
class TorchImport:
    """What evaluating an imported model needs.

    Attributes:
      model: the ood_jax model in eval mode.
      identity: its model identity (``{"name", "num_classes", "options"}``).
      mean, std: the per-channel input normalization.
      provenance: ``path``, ``sha256``, ``format``, ``arch``, ``source`` (the
        PyTorch definition) and ``normalization`` (as given or the default).
    """

    model: nnx.Module
    identity: dict[str, Any]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    provenance: dict[str, Any]


def parse_normalization(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of ``--normalization``.

    Args:
      text: a name in ``ood_jax.interop.NORMALIZATIONS`` ("cifar10",
        "openood_cifar10", "kuangliu_cifar10", "imagenet"), or numbers: "MEAN,STD"
        (the same for every channel) or "M1,M2,M3,S1,S2,S3" (per RGB channel),
        on the [0, 1] pixel scale.

    Raises:
      UsageError: anything else, or a standard deviation that is not positive.
    """
    if text in interop.NORMALIZATIONS:
        return interop.NORMALIZATIONS[text]
    usage = (
        f"--normalization {text!r}: give one of {', '.join(interop.NORMALIZATIONS)}, or "
        "MEAN,STD, or M1,M2,M3,S1,S2,S3 (pixels in [0, 1])."
    )
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(usage) from None
    if len(values) == 2:
        values = [values[0]] * 3 + [values[1]] * 3
    if len(values) != 6:
        raise UsageError(usage)
    mean, std = tuple(values[:3]), tuple(values[3:])
    if min(std) <= 0:
        raise UsageError(f"--normalization {text!r}: the standard deviations must be > 0.")
    return mean, std


def is_torch_checkpoint(source: str | os.PathLike) -> bool:
    """Whether ``--init_from`` / a checkpoint argument names a PyTorch file (by its suffix)."""
    return Path(source).suffix in TORCH_SUFFIXES


def _read(path: str | os.PathLike) -> tuple[dict, dict]:
    if not Path(path).is_file():
        raise UsageError(f"no PyTorch checkpoint at {str(path)!r}.")
    try:
        return interop.read_state_dict(path)
    except (interop.UnsafeCheckpointError, interop.CheckpointFormatError) as err:
        raise UsageError(f"{path}: {err}") from err
    except ImportError as err:  # .safetensors without the package
        raise UsageError(f"{path}: {err} (or pip install 'ood_jax[interop]')") from err


def load_for_evaluation(
    path: str | os.PathLike,
    arch: str,
    *,
    normalization: str | None = None,
    num_classes: int | None = None,
    options: dict[str, Any] | None = None,
) -> TorchImport:
    """Read ``path`` as ``arch`` for ``experiments.evaluate --torch_checkpoint``.

    Args:
      path: the PyTorch file.
      arch: one of ``ood_jax.interop.ARCH_NAMES``.
      normalization: ``--normalization`` (see :func:`parse_normalization`);
        default: the one the architecture's authors used.
      num_classes: the head's size; default: read from the file.
      options: model options for non-standard widths (e.g. ``{"base_width": 8}``).

    Raises:
      UsageError: unknown ``arch``, bad ``normalization``, a missing, unsafe or
        unreadable file, or a state_dict that does not fit ``arch``.
    """
    if arch not in interop.ARCH_NAMES:
        raise UsageError(f"--arch {arch!r}: known: {', '.join(interop.ARCH_NAMES)}.")
    spec = interop.get_architecture(arch)
    normalization = normalization or spec.normalization
    mean, std = parse_normalization(normalization)
    state_dict, provenance = _read(path)
    try:
        model, identity = interop.convert_state_dict(
            state_dict, arch, num_classes=num_classes, options=options
        )
    except interop.StateDictMismatchError as err:
        raise UsageError(f"{path} as --arch {arch}: {err}") from err
    provenance = {
        **provenance,
        "arch": arch,
        "source": spec.source,
        "normalization": normalization,
    }
    return TorchImport(model, identity, mean, std, provenance)


def initial_weights(source: str | os.PathLike, identity: dict[str, Any]) -> tuple[Any, Any, int]:
    """``(params, batch_stats, 0)`` of a PyTorch file, for ``--init_from FILE.pt``.

    The file is tried as every imported architecture that builds
    ``identity["name"]`` (e.g. OpenOOD's and kuangliu's ResNet-18 both become
    "resnet18"), with the run's class count and options; the first that fits
    exactly is used.

    Raises:
      UsageError: no architecture builds that model, or none fits the file
        (each one's first bad key is named).
    """
    from ood_jax.train import split_model

    candidates = [
        a for a in interop.ARCH_NAMES if interop.get_architecture(a).model == identity["name"]
    ]
    if not candidates:
        raise UsageError(
            f"--init_from {str(source)!r}: no PyTorch architecture converts to "
            f"{identity['name']!r} "
            f"(importable: {', '.join(interop.ARCH_NAMES)})."
        )
    state_dict, _ = _read(source)
    errors = []
    for arch in candidates:
        try:
            model, _ = interop.convert_state_dict(
                state_dict,
                arch,
                num_classes=int(identity["num_classes"]),
                options=identity.get("options", {}),
            )
        except interop.StateDictMismatchError as err:
            errors.append(f"as {arch}: {err}")
            continue
        _, params, batch_stats = split_model(model)
        return params, batch_stats, 0
    raise UsageError(
        f"--init_from {str(source)!r} does not fit this run's model: " + "; ".join(errors)
    )
