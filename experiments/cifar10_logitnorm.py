"""LogitNorm on CIFAR-10 (Wei et al., ICML 2022): ``python -m experiments.cifar10_logitnorm``.

Cross-entropy on logits normalized to norm ``1 / tau`` (tau = 0.04, the paper's,
from the objective's registration). A preset over ``experiments.train`` (see
there for the flags)::

    python -m experiments.cifar10_logitnorm --workdir /tmp/ln --preset smoke --data local
"""

import sys

from experiments.train import main

if __name__ == "__main__":
    main(sys.argv[1:], method="logitnorm")
