"""LogitNorm on CIFAR-10 (Wei et al., ICML 2022): ``python -m experiments.cifar10_logitnorm``.

Cross-entropy on logits normalized to norm ``1 / tau`` (tau = 0.04, the paper's,
from the objective's registration): WRN-40-2, 200 epochs, SGD lr 0.1 x0.1 at
epochs 80 and 140, batch 128 (the ``paper`` preset of
``experiments.configs.default``). A preset over ``experiments.train`` (see there
for the flags)::

    python -m experiments.cifar10_logitnorm --workdir /tmp/ln --preset smoke --data local
"""

from experiments.methods.base import Method, StudyRuns

METHOD = Method(
    name="logitnorm",
    label="LogitNorm",
    objective="logitnorm",
    headline_score="msp",
    doc=__doc__,
    study=StudyRuns(seeds=3),
)
