"""Cross-entropy baseline on CIFAR-10: ``python -m experiments.cifar10_ce``.

The command of the method :mod:`experiments.methods.ce` (its paper, recipe,
presets and flags; ``--help`` prints them), run by ``experiments.train``.
"""

import sys

from experiments.train import main

if __name__ == "__main__":
    main(sys.argv[1:], method="ce")
