"""Experiment entry points (the only code that reads configs).

Every ``python -m experiments.<name>`` imports this package first, before JAX
starts; it sets three process defaults for the commands, each only where the
user has not chosen:

- ``XLA_FLAGS`` gets ``ood_jax.CPU_XLA_FLAG`` (:func:`ood_jax.use_cpu_xla_flag`;
  ``OOD_JAX_DEFAULT_XLA_FLAGS=0`` leaves it untouched).
- ``OOD_JAX_DATA_DIR``: the offline data folder beside the checkout
  (``<checkout>/../shared/data``), where there is one.
- ``OOD_JAX_PRETRAINED``: the checkout's published checkpoints
  (``<checkout>/results/cpu_study/checkpoints``), where there are.

The library itself (``ood_jax``) reads only those variables or its arguments.
"""

import os
from pathlib import Path

import ood_jax

CHECKOUT = Path(__file__).resolve().parents[1]
CHECKOUT_DEFAULTS = {
    "OOD_JAX_DATA_DIR": CHECKOUT.parent / "shared" / "data",
    "OOD_JAX_PRETRAINED": CHECKOUT / "results" / "cpu_study" / "checkpoints",
}


def _use_checkout_defaults() -> None:
    for name, folder in CHECKOUT_DEFAULTS.items():
        if not os.environ.get(name) and folder.is_dir():
            os.environ[name] = str(folder)


ood_jax.use_cpu_xla_flag()
_use_checkout_defaults()
