"""Energy-bounded fine-tuning (Liu et al., 2020): ``python -m experiments.cifar10_energy_ft``.

Fine-tunes a pretrained workdir's newest checkpoint (weights and BatchNorm
statistics; a fresh optimizer) with cross-entropy plus 0.1 x the squared-hinge
energy margins ``relu(E_in - m_in)^2 + relu(m_out - E_out)^2`` on 128
in-distribution and 256 auxiliary outlier images per step: 10 epochs, Nesterov
SGD, lr 1e-3 cosine to 1e-6 per step (2 epochs in ``cpu``, 1 in ``smoke``).
Margins: numbers (defaults -23 / -5 on CIFAR-10, -27 / -5 on CIFAR-100), or
``auto``: the initial model's mean energy on in-distribution / outlier training
data, recorded in ``config.json`` and the report::

    python -m experiments.cifar10_energy_ft --workdir runs/energy --init_from runs/ce \\
        --preset cpu --data local --m_in auto --m_out auto
"""

import ml_collections

from experiments.methods.base import HparamFlag, Method, StudyRuns, fine_tuning_recipe


def recipe(c: ml_collections.ConfigDict, preset: str, finetune: bool) -> None:
    c.data.outliers.ratio = 2  # 128 in + 256 outliers per step in the paper
    fine_tuning_recipe(c, preset)  # ``finetune`` is always true: fine-tuning only


METHOD = Method(
    name="energy_ft",
    label="Energy FT",
    objective="energy",
    headline_score="energy",
    doc=__doc__,
    recipe=recipe,
    fine_tuning="required",
    flags=(
        HparamFlag(
            "m_in",
            "a number, or auto: the initial model's mean energy on in-distribution training data",
        ),
        HparamFlag(
            "m_out",
            "a number, or auto: the initial model's mean energy on auxiliary outlier training data",
        ),
    ),
    near_auxiliary=True,
    study=StudyRuns(seeds=2, init_from="ce"),
)
