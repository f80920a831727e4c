"""Energy-bounded fine-tuning (Liu et al., 2020): ``python -m experiments.cifar10_energy_ft``.

The command of the method :mod:`experiments.methods.energy_ft` (its paper, recipe,
presets and flags; ``--help`` prints them), run by ``experiments.train``.
"""

import sys

from experiments.train import main

if __name__ == "__main__":
    main(sys.argv[1:], method="energy_ft")
