"""Put a PyTorch state_dict into an ood_jax model, all or nothing.

Per layer, PyTorch -> Flax:

- ``nn.Conv2d.weight`` ``[out, in, kh, kw]`` (OIHW) -> ``nnx.Conv.kernel``
  ``[kh, kw, in, out]`` (HWIO); ``bias`` as is.
- ``nn.Linear.weight`` ``[out, in]`` -> ``nnx.Linear.kernel`` ``[in, out]``
  (transposed); ``bias`` as is. Every imported model pools globally before its
  head, so NCHW vs NHWC flatten order never arises.
- ``nn.BatchNorm2d`` ``weight`` / ``bias`` / ``running_mean`` /
  ``running_var`` -> ``scale`` / ``bias`` / ``mean`` / ``var``;
  ``num_batches_tracked`` is accepted and dropped (files from PyTorch < 0.4.1
  lack it). Both frameworks normalize with ``(x - mean) / sqrt(var + eps)``,
  ``eps = 1e-5`` on both sides; ood_jax's momentum 0.9 is PyTorch's 0.1.

The state_dict must fit exactly: :class:`StateDictMismatchError` names the first
missing key (in the model's order), else the first unexpected key (in the
file's order), else the first key of the wrong shape, and the model is left
untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ood_jax.interop.architectures import Architecture

OPTIONAL_SUFFIXES = ("num_batches_tracked",)


class StateDictMismatchError(ValueError):
    """A state_dict whose keys or shapes do not fit the model."""


def _hwio(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T if w.ndim == 2 else w


# (nnx variable name, PyTorch parameter name, PyTorch -> Flax layout) per layer type.
_CONV = (("kernel", "weight", _hwio), ("bias", "bias", None))
_LINEAR = (("kernel", "weight", _transpose), ("bias", "bias", None))
_BATCH_NORM = (
    ("scale", "weight", None),
    ("bias", "bias", None),
    ("mean", "running_mean", None),
    ("var", "running_var", None),
)


def _targets(model: nnx.Module, arch: Architecture) -> Iterator[tuple[str, nnx.Variable, Any]]:
    """``(PyTorch key, ood_jax variable, layout change)`` for every weight of ``model``."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            table = _BATCH_NORM
        elif isinstance(module, nnx.Conv):
            table = _CONV
        elif isinstance(module, nnx.Linear):
            table = _LINEAR
        else:
            continue
        try:
            prefix = arch.torch_name(path, model)
        except (ValueError, IndexError, KeyError):
            raise StateDictMismatchError(
                f"the {arch.model} model's module {'.'.join(map(str, path))} has no place in the "
                "PyTorch layout (an option that changes the model's structure?)."
            ) from None
        for attr, torch_attr, layout in table:
            variable = getattr(module, attr, None)
            if variable is not None:
                yield f"{prefix}.{torch_attr}", variable, layout


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], arch: Architecture):
    """Copy ``state_dict`` into ``model`` (in place) after checking that it fits exactly.

    Args:
      model: a freshly built ood_jax model of ``arch.model``.
      state_dict: PyTorch names -> arrays (as ``read_state_dict`` returns).
      arch: the :class:`Architecture` that maps the names.

    Raises:
      StateDictMismatchError: a missing, unexpected or wrong-shape key (the
        first one, by name); nothing is copied then.
    """
    targets = list(_targets(model, arch))
    expected = {key for key, _, _ in targets}
    missing = next((key for key, _, _ in targets if key not in state_dict), None)
    if missing is not None:
        raise StateDictMismatchError(
            f"missing key {missing!r}: the {arch.model} model needs it and the state_dict lacks "
            f"it ({len(state_dict)} keys, e.g. {', '.join(list(state_dict)[:3])}). Is --arch "
            "right for this file?"
        )
    for key in state_dict:
        optional = key.rsplit(".", 1)[0] + ".weight" in expected and key.endswith(OPTIONAL_SUFFIXES)
        if key not in expected and not optional:
            raise StateDictMismatchError(
                f"unexpected key {key!r}: the {arch.model} model has no place for it."
            )
    values = []
    for key, variable, layout in targets:
        value = np.asarray(state_dict[key])
        value = layout(value) if layout is not None else value
        if value.shape != variable.shape:
            raise StateDictMismatchError(
                f"key {key!r} has shape {tuple(state_dict[key].shape)}, which does not fit the "
                f"model's {tuple(variable.shape)} (after the layout change); a different width "
                "or number of classes?"
            )
        values.append(jnp.asarray(value, dtype=jnp.float32))
    for (_, variable, _), value in zip(targets, values, strict=True):
        variable.set_value(value)
