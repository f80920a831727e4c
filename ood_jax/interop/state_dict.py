"""A PyTorch state_dict from a file: ``.pt`` / ``.pth`` / ``.ckpt`` or ``.safetensors``.

``read_state_dict(path)`` returns ``{key: np.ndarray}`` with the wrapping that
training scripts add taken off:

- a checkpoint dict holding the weights under one of ``WRAPPER_KEYS``
  (``{"state_dict": ...}`` as PyTorch Lightning and many scripts save,
  ``{"model": ...}``, ``{"net": ...}`` as kuangliu/pytorch-cifar saves, beside
  ``epoch`` / ``optimizer`` / ``acc`` entries);
- a prefix on every key (``module.`` from ``nn.DataParallel`` /
  DistributedDataParallel, ``_orig_mod.`` from ``torch.compile``, ``model.`` /
  ``net.`` from a LightningModule's attribute), stripped while all keys share it.

Anything else (a pickled ``nn.Module``, a dict whose values are not all
tensors) is one :class:`CheckpointFormatError` naming what was found.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ood_jax.interop.torch_pickle import UnsafeCheckpointError, load_pickle_checkpoint

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
PREFIXES = ("module.", "_orig_mod.", "model.", "net.")


class CheckpointFormatError(ValueError):
    """A checkpoint file that holds no state_dict this module can find."""


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())
    )


def unwrap_state_dict(obj: Any) -> dict[str, np.ndarray]:
    """The state_dict inside a loaded checkpoint object (see the module docstring)."""
    while not _is_state_dict(obj):
        inner = None
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj), None)
        if inner is None:
            raise CheckpointFormatError(_describe(obj))
        obj = inner
    state = dict(obj)
    for prefix in PREFIXES:
        while all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _describe(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f"the checkpoint holds a {type(obj).__name__}, not a state_dict of tensors."
    bad = next((k for k, v in obj.items() if not isinstance(v, np.ndarray)), None)
    return (
        f"the checkpoint is a dict without a state_dict: entry {bad!r} is a "
        f"{type(obj.get(bad)).__name__}, not a tensor, and none of {WRAPPER_KEYS} is present "
        f"(keys: {', '.join(map(str, list(obj)[:8]))})."
    )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as err:
        raise ImportError(
            "reading .safetensors needs the safetensors package: pip install safetensors"
        ) from err
    return load_file(str(path))


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(state_dict, provenance)`` of a PyTorch checkpoint file; never runs code from it.

    Args:
      path: a ``torch.save`` file (zip or legacy layout; ``.pt``, ``.pth``,
        ``.ckpt``, ...) or a ``.safetensors`` file.

    Returns:
      The unwrapped state_dict (NumPy arrays, the file's dtypes) and
      ``{"path", "sha256", "format"}`` with ``format`` "zip", "legacy" or
      "safetensors".

    Raises:
      FileNotFoundError: no such file.
      UnsafeCheckpointError: the pickle asks for anything but tensors and plain
        containers (refused before anything runs) or is malformed.
      CheckpointFormatError: no state_dict inside.
    """
    path = Path(path)
    raw = path.read_bytes()
    provenance = {"path": str(path), "sha256": hashlib.sha256(raw).hexdigest()}
    if path.suffix == ".safetensors":
        return _read_safetensors(path), {**provenance, "format": "safetensors"}
    obj, layout = load_pickle_checkpoint(raw)
    return unwrap_state_dict(obj), {**provenance, "format": layout}


__all__ = [
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "read_state_dict",
    "unwrap_state_dict",
]
