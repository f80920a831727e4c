"""ACET (Hein et al., CVPR 2019): ``python -m experiments.cifar10_acet``.

CEDA's noise, first attacked inside the train step by an L-infinity PGD of
radius 0.3 in [0, 1] pixel space that maximizes confidence (40 steps in the
``paper`` preset, 5 in ``cpu``, 2 in ``smoke``: ``--config.objective.hparams.attack_steps``),
then trained towards low confidence. Otherwise CEDA's recipe
(``experiments.methods.ceda``). Flags as ``experiments.cifar10_logitnorm``::

    python -m experiments.cifar10_acet --workdir runs/acet --preset cpu --data local
"""

import ml_collections

from experiments.methods import ceda
from experiments.methods.base import Method, StudyRuns

# Attack steps per preset (the paper's: 40).
ATTACK_STEPS = {"paper": 40, "cpu": 5, "smoke": 2}
# Attack steps in the study's training runs (the paper's 40 and the cpu preset's 5 do
# not fit its budget).
STUDY_ATTACK_STEPS = 2


def recipe(c: ml_collections.ConfigDict, preset: str, finetune: bool) -> None:
    ceda.recipe(c, preset, finetune)
    c.objective.hparams = ml_collections.ConfigDict({"attack_steps": ATTACK_STEPS[preset]})


METHOD = Method(
    name="acet",
    label="ACET",
    objective="acet",
    headline_score="msp",
    doc=__doc__,
    recipe=recipe,
    study=StudyRuns(
        seeds=2, args=(f"--config.objective.hparams.attack_steps={STUDY_ATTACK_STEPS}",)
    ),
)
