"""Experiment entry points (the only code that reads configs).

Every ``python -m experiments.<name>`` imports this package first, before JAX
starts; it sets three process defaults for the commands, each only where the
user has not chosen:

- ``XLA_FLAGS`` gets ``ood_jax.CPU_XLA_FLAG`` (:func:`ood_jax.use_cpu_xla_flag`;
  ``OOD_JAX_DEFAULT_XLA_FLAGS=0`` leaves it untouched).
- ``OOD_JAX_DATA_DIR``: the offline data folder beside the checkout
  (``<checkout>/../shared/data``), where there is one.
- ``OOD_JAX_PRETRAINED``: the checkout's folders of published checkpoints
  (``<checkout>/results/cpu_study/checkpoints`` and
  ``<checkout>/results/regime_study/checkpoints``, those that exist, joined by
  ``os.pathsep``).

The library itself (``ood_jax``) reads only those variables or its arguments.
"""

import os
from pathlib import Path

import ood_jax

CHECKOUT = Path(__file__).resolve().parents[1]
# Each variable's folders, in order; the ones that exist are joined by os.pathsep.
CHECKOUT_DEFAULTS = {
    "OOD_JAX_DATA_DIR": (CHECKOUT.parent / "shared" / "data",),
    "OOD_JAX_PRETRAINED": (
        CHECKOUT / "results" / "cpu_study" / "checkpoints",
        CHECKOUT / "results" / "regime_study" / "checkpoints",
    ),
}


def checkout_default(name: str) -> str | None:
    """What the commands set ``name`` to when the user has not: the checkout's
    folders for it that exist, joined by ``os.pathsep`` (None if none exists)."""
    folders = [str(folder) for folder in CHECKOUT_DEFAULTS[name] if folder.is_dir()]
    return os.pathsep.join(folders) or None


def _use_checkout_defaults() -> None:
    for name in CHECKOUT_DEFAULTS:
        value = checkout_default(name)
        if not os.environ.get(name) and value:
            os.environ[name] = value


ood_jax.use_cpu_xla_flag()
_use_checkout_defaults()
