"""ood_jax: out-of-distribution detection in JAX/Flax.

Submodules are imported explicitly (``import ood_jax.losses``) so that
importing the package never starts TensorFlow or an accelerator backend.

Importing the package adds one XLA flag for the CPU backend, unless
``XLA_FLAGS`` already chooses a YNNPACK fusion set, ``OOD_JAX_DEFAULT_XLA_FLAGS=0``
is set, or a JAX backend has already started (XLA reads its flags once):
``CPU_XLA_FLAG``, YNNPACK fusion of dots and reductions. On a 2-core CPU it
runs the ResNet-9 train step at about 550 images/s instead of about 200
(``benchmarks/results/train_throughput.md``). TPU and GPU backends ignore it.
"""

import os
import sys

__version__ = "0.1.0"

CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"


def _add_default_cpu_flag() -> None:
    if os.environ.get("OOD_JAX_DEFAULT_XLA_FLAGS", "1") == "0":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is not None and getattr(bridge, "_backends", None):
        return  # too late to change: the backends have read XLA_FLAGS already
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()


_add_default_cpu_flag()
