"""ood_jax: out-of-distribution detection in JAX/Flax.

Submodules are imported explicitly (``import ood_jax.losses``) so that
importing the package never starts TensorFlow or an accelerator backend.

Importing the package changes nothing in the process. Two things are offered:

- :func:`use_cpu_xla_flag` adds one XLA flag for the CPU backend,
  ``CPU_XLA_FLAG`` (YNNPACK fusion of dots and reductions): on a 2-core CPU it
  runs the ResNet-9 train step at about 550 images/s instead of about 200
  (``benchmarks/results/train_throughput.md``). TPU and GPU backends ignore it.
  The project's commands (``python -m experiments.<name>``) call it; a library
  user calls it before JAX starts, or sets ``XLA_FLAGS`` themselves.
- The installed jax and flax are checked against ``SUPPORTED_VERSIONS``, the
  tested ranges; outside them the import warns (:class:`UntestedVersionWarning`)
  and says what to install. ``OOD_JAX_ALLOW_UNTESTED=1`` silences it.
"""

import importlib.metadata
import os
import sys
import warnings

from packaging.specifiers import SpecifierSet

__version__ = "0.1.0"

CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
# The versions tested (requirements.txt pins jax 0.10.2 and flax 0.12.8, the newest
# releases when tested), as setup.cfg declares them; a jax or flax minor release
# changes APIs this library uses.
SUPPORTED_VERSIONS = {"jax": ">=0.10.2,<0.11", "flax": ">=0.12.8,<0.13"}


class UntestedVersionWarning(UserWarning):
    """The installed jax or flax is outside :data:`SUPPORTED_VERSIONS`."""


def _check_versions() -> None:
    if os.environ.get("OOD_JAX_ALLOW_UNTESTED") == "1":
        return
    for name, supported in SUPPORTED_VERSIONS.items():
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # its import fails with its own message
        if not SpecifierSet(supported).contains(version, prereleases=True):
            warnings.warn(
                f"ood_jax is tested with jax{SUPPORTED_VERSIONS['jax']} and "
                f"flax{SUPPORTED_VERSIONS['flax']}, found {name} {version}: "
                'pip install "jax==0.10.2" "flax==0.12.8" (on a TPU "jax[tpu]==0.10.2", '
                'on a GPU "jax[cuda12]==0.10.2"); set OOD_JAX_ALLOW_UNTESTED=1 to silence this',
                UntestedVersionWarning,
                stacklevel=3,
            )


def use_cpu_xla_flag() -> bool:
    """Adds :data:`CPU_XLA_FLAG` to ``XLA_FLAGS``; returns whether it was added.

    Left alone: ``XLA_FLAGS`` that already choose a YNNPACK fusion set, the opt-out
    ``OOD_JAX_DEFAULT_XLA_FLAGS=0``, and a process whose JAX backend has started (XLA
    reads its flags once, so a later flag would claim a setting that is not in force).
    """
    if os.environ.get("OOD_JAX_DEFAULT_XLA_FLAGS", "1") == "0":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is not None and getattr(bridge, "_backends", None):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()
    return True


_check_versions()
