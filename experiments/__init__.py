"""Experiment entry points (the only code that reads configs).

Importing this package imports ``ood_jax`` first, before JAX starts, so that
its default XLA CPU flag (``ood_jax.CPU_XLA_FLAG``: YNNPACK fusion of dots and
reductions) applies to every ``python -m experiments.<name>`` run. Set
``OOD_JAX_DEFAULT_XLA_FLAGS=0`` to leave ``XLA_FLAGS`` untouched.
"""

import ood_jax  # noqa: F401  (sets the default CPU flag before JAX starts)
