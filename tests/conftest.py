"""Test session setup: 8 virtual CPU devices, set before JAX initializes.

Single-device tests simply use the default device; multi-device tests build a
mesh over ``jax.devices()``.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# The tests run the project's commands and read the checkout's files: the commands'
# process defaults (the CPU XLA flag, the offline data, the published checkpoints).
import jax  # noqa: E402

import experiments  # noqa: E402, F401

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
