"""Test session setup: 8 virtual CPU devices, set before JAX initializes.

Single-device tests simply use the default device; multi-device tests build a
mesh over ``jax.devices()``.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The commands' persistent compilation cache stays off in tests (tests/test_compile_cache.py
# turns it on in processes of its own): no test writes to the user's cache.
os.environ.setdefault("OOD_JAX_COMPILATION_CACHE", "off")

# The tests run the project's commands and read the checkout's files: the commands'
# process defaults (the CPU XLA flag, the offline data, the published checkpoints).
import jax  # noqa: E402

import experiments  # noqa: E402, F401

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
