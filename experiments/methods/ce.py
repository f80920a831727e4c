"""Cross-entropy baseline on CIFAR-10: ``python -m experiments.cifar10_ce``.

The same presets and flags as ``experiments.cifar10_logitnorm`` (see
``experiments.train``), with the plain softmax cross-entropy objective: WRN-40-2,
200 epochs, SGD lr 0.1 x0.1 at epochs 80 and 140, batch 128 (the ``paper`` preset
of ``experiments.configs.default``)::

    python -m experiments.cifar10_ce --workdir runs/ce --preset cpu --data local
"""

from experiments.methods.base import Method, StudyRuns

METHOD = Method(
    name="ce",
    label="Cross-entropy",
    objective="ce",
    headline_score="msp",
    doc=__doc__,
    study=StudyRuns(seeds=3),
)
