"""Outlier exposure (Hendrycks et al., ICLR 2019): ``python -m experiments.cifar10_oe``.

Cross-entropy plus 0.5 x cross-entropy to the uniform distribution on auxiliary
outliers; each step puts 128 in-distribution and 256 outlier images through
one forward pass (BatchNorm sees both). From scratch by default; with
``--init_from WORKDIR`` it fine-tunes that run's newest checkpoint for 10 epochs
with a cosine learning rate from 1e-3 (the energy paper's OE baseline). Outliers:
``--config.data.outliers.source`` (default: the offline Tiny ImageNet train
subset; its classes overlap TinyImageNet-crop/resize, so those results are
near-auxiliary). Flags as ``experiments.cifar10_logitnorm``::

    python -m experiments.cifar10_oe --workdir runs/oe --preset cpu --data local \\
        --init_from runs/ce
"""

import sys

from experiments.train import main

if __name__ == "__main__":
    main(sys.argv[1:], method="oe")
