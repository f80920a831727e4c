"""LogitNorm on CIFAR-10 (Wei et al., ICML 2022): ``python -m experiments.cifar10_logitnorm``.

The command of the method :mod:`experiments.methods.logitnorm` (its paper, recipe,
presets and flags; ``--help`` prints them), run by ``experiments.train``.
"""

import sys

from experiments.train import main

if __name__ == "__main__":
    main(sys.argv[1:], method="logitnorm")
