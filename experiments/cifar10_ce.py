"""Cross-entropy baseline on CIFAR-10: ``python -m experiments.cifar10_ce``.

Same presets, flags and evaluation as ``experiments.cifar10_logitnorm``; only the
objective differs (plain softmax cross-entropy)::

    python -m experiments.cifar10_ce --workdir /tmp/ce --preset smoke --data local
"""

import sys

from experiments.cifar10_train import main

if __name__ == "__main__":
    main(sys.argv[1:], objective="ce")
