"""ood_jax: out-of-distribution detection in JAX/Flax.

Submodules are imported explicitly (``import ood_jax.losses``) so that
importing the package never starts TensorFlow or an accelerator backend.
"""

__version__ = "0.1.0"
