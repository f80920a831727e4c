"""Experiment entry points (the only code that reads configs).

Importing this package (as ``python -m experiments.<name>`` does, before JAX
starts) adds one XLA CPU flag unless ``XLA_FLAGS`` already sets it: YNNPACK
fusion of dots, elementwise ops and reductions, which makes the conv weight
gradients of the train step much faster on CPU (ResNet-18 0.87x -> 1.28x
PyTorch's speed; ``benchmarks/results/train_throughput.md``). It only affects
the CPU backend. Set ``OOD_JAX_DEFAULT_XLA_FLAGS=0`` to leave ``XLA_FLAGS``
untouched.
"""

import os

_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"

if os.environ.get("OOD_JAX_DEFAULT_XLA_FLAGS", "1") != "0":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} {_CPU_FLAG}".strip()
