"""Outlier exposure (Hendrycks et al., ICLR 2019): ``python -m experiments.cifar10_oe``.

Cross-entropy plus 0.5 x cross-entropy to the uniform distribution on auxiliary
outliers; each step puts 128 in-distribution and 256 outlier images through
one forward pass (BatchNorm sees both). From scratch by default (the ``paper``
preset's WRN-40-2 and 200 epochs); with ``--init_from WORKDIR`` it fine-tunes
that run's newest checkpoint for 10 epochs with a cosine learning rate from
1e-3 (the energy paper's OE baseline; 2 epochs in ``cpu``, 1 in ``smoke``).
Outliers: ``--config.data.outliers.source`` (default: the offline Tiny ImageNet
train subset; its classes overlap TinyImageNet-crop/resize, so those results are
near-auxiliary). Flags as ``experiments.cifar10_logitnorm``::

    python -m experiments.cifar10_oe --workdir runs/oe --preset cpu --data local \\
        --init_from runs/ce
"""

import ml_collections

from experiments.methods.base import Method, StudyRuns, fine_tuning_recipe


def recipe(c: ml_collections.ConfigDict, preset: str, finetune: bool) -> None:
    c.data.outliers.ratio = 2  # 128 in + 256 outliers per step in the papers
    if finetune:
        fine_tuning_recipe(c, preset)


METHOD = Method(
    name="oe",
    label="Outlier exposure (FT)",
    objective="outlier_exposure",
    headline_score="msp",
    doc=__doc__,
    recipe=recipe,
    fine_tuning="optional",
    near_auxiliary=True,
    study=StudyRuns(seeds=2, init_from="ce"),
)
