"""Experiment entry points (the only code that reads configs).

Importing this package (as ``python -m experiments.<name>`` does, before JAX
starts) adds one XLA CPU flag unless ``XLA_FLAGS`` already sets it: YNNPACK
fusion of dots and reductions (not of elementwise ops, which made the step
slower). On an idle 2-core CPU the ResNet-9 train step runs at about 550
images/s with it and about 200 without (``benchmarks/results/train_throughput.md``).
It only affects the CPU backend. Set ``OOD_JAX_DEFAULT_XLA_FLAGS=0`` to leave ``XLA_FLAGS``
untouched.
"""

import os

_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"

if os.environ.get("OOD_JAX_DEFAULT_XLA_FLAGS", "1") != "0":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} {_CPU_FLAG}".strip()
