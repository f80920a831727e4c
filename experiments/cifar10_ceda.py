"""CEDA (Hein et al., CVPR 2019): ``python -m experiments.cifar10_ceda``.

Each step adds as many noise images as in-distribution ones, made on device
from the batch and the step key (half pixel-permuted training images, half
uniform noise, both low-pass filtered), and trains them towards low confidence
(log max softmax; ``--config.objective.hparams.out_loss=uniform`` for
cross-entropy to uniform). Flags as ``experiments.cifar10_logitnorm``::

    python -m experiments.cifar10_ceda --workdir runs/ceda --preset cpu --data local
"""

import sys

from experiments.train import main

if __name__ == "__main__":
    main(sys.argv[1:], method="ceda")
