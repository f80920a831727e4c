"""L2 feature normalization (Haas et al., TMLR 2023): ``python -m experiments.cifar10_l2norm``.

ResNet-18 with spectral normalization, leaky ReLU and global average pooling;
the penultimate features are L2-normalized in training only, and their norm is
the OOD score at test time (``feature_norm`` in the report). ``paper``: 60
epochs, batch 1024, SGD lr 0.1 x0.1 at epochs 40 and 50. ``--preset
logitnorm_plus``: LogitNorm with the same three model options (350 epochs, steps
at 150 and 250, batch 128), the paper's LogitNorm+::

    python -m experiments.cifar10_l2norm --workdir runs/l2 --preset cpu --data local
"""

import sys

from experiments.train import main

if __name__ == "__main__":
    main(sys.argv[1:], method="l2norm")
