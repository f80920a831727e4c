"""L2 feature normalization (Haas et al., TMLR 2023): ``python -m experiments.cifar10_l2norm``.

The command of the method :mod:`experiments.methods.l2norm` (its paper, recipe,
presets and flags; ``--help`` prints them), run by ``experiments.train``.
"""

import sys

from experiments.train import main

if __name__ == "__main__":
    main(sys.argv[1:], method="l2norm")
