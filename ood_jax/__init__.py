"""ood_jax: out-of-distribution detection in JAX/Flax.

Submodules are imported explicitly (``import ood_jax.losses``) so that
importing the package never starts TensorFlow or an accelerator backend.

Importing the package adds one XLA flag for the CPU backend, unless
``XLA_FLAGS`` already chooses a YNNPACK fusion set, ``OOD_JAX_DEFAULT_XLA_FLAGS=0``
is set, or a JAX backend has already started (XLA reads its flags once):
``CPU_XLA_FLAG``, YNNPACK fusion of dots and reductions. On a 2-core CPU it
runs the ResNet-9 train step at about 550 images/s instead of about 200
(``benchmarks/results/train_throughput.md``). TPU and GPU backends ignore it.

Importing it also checks that the installed jax and flax are within
``SUPPORTED_VERSIONS``, the tested ranges, and raises ImportError saying what to
install otherwise (``OOD_JAX_ALLOW_UNTESTED=1`` skips the check).
"""

import importlib.metadata
import os
import sys

from packaging.specifiers import SpecifierSet

__version__ = "0.1.0"

CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
# The versions tested (requirements.txt pins jax 0.10.2 and flax 0.12.8, the newest
# releases when tested), as setup.cfg declares them; a jax or flax minor release
# changes APIs this library uses.
SUPPORTED_VERSIONS = {"jax": ">=0.10.2,<0.11", "flax": ">=0.12.8,<0.13"}


def _check_versions() -> None:
    if os.environ.get("OOD_JAX_ALLOW_UNTESTED") == "1":
        return
    for name, supported in SUPPORTED_VERSIONS.items():
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # its import fails with its own message
        if not SpecifierSet(supported).contains(version, prereleases=True):
            raise ImportError(
                f"ood_jax is tested with jax{SUPPORTED_VERSIONS['jax']} and "
                f"flax{SUPPORTED_VERSIONS['flax']}, found {name} {version}: "
                'pip install "jax==0.10.2" "flax==0.12.8" (on a TPU "jax[tpu]==0.10.2", '
                'on a GPU "jax[cuda12]==0.10.2"), or set OOD_JAX_ALLOW_UNTESTED=1 to try it'
            )


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


_check_versions()
_add_default_cpu_flag()
