"""Cross-entropy baseline on CIFAR-10: ``python -m experiments.cifar10_ce``.

The same presets and flags as ``experiments.cifar10_logitnorm`` (see
``experiments.train``), with the plain softmax cross-entropy objective.
"""

import sys

from experiments.train import main

if __name__ == "__main__":
    main(sys.argv[1:], method="ce")
