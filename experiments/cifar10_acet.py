"""ACET (Hein et al., CVPR 2019): ``python -m experiments.cifar10_acet``.

CEDA's noise, first attacked inside the train step by an L-infinity PGD of
radius 0.3 in [0, 1] pixel space that maximizes confidence (40 steps in the
``paper`` preset, 5 in ``cpu``, 2 in ``smoke``: ``--config.objective.hparams.attack_steps``),
then trained towards low confidence. Flags as ``experiments.cifar10_logitnorm``::

    python -m experiments.cifar10_acet --workdir runs/acet --preset cpu --data local
"""

import sys

from experiments.train import main

if __name__ == "__main__":
    main(sys.argv[1:], method="acet")
