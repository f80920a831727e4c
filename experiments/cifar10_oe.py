"""Outlier exposure (Hendrycks et al., ICLR 2019): ``python -m experiments.cifar10_oe``.

The command of the method :mod:`experiments.methods.oe` (its paper, recipe,
presets and flags; ``--help`` prints them), run by ``experiments.train``.
"""

import sys

from experiments.train import main

if __name__ == "__main__":
    main(sys.argv[1:], method="oe")
