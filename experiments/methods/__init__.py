"""The training methods of the five papers, one module each, as presets over ``default.get_config``.

Each module ``experiments/methods/<name>.py`` defines one :class:`Method` record,
``METHOD``: the objective it trains, its presets (``paper``, ``cpu``, ``smoke``,
plus ``logitnorm_plus`` for ``l2norm``) and the recipe each gives, its
fine-tuning rule and flags, its name and score in the study's report, and its
runs in the study; its docstring gives the paper, the recipe and the command
``python -m experiments.cifar10_<name>`` (a three-line entry point calling
``experiments.train.main(argv, method="<name>")``). Every field of a preset stays
overridable on the command line.

The ``cpu`` presets keep the ``cpu`` model and schedule (comparable runs); the
shortened parts (fine-tuning epochs, ACET's attack steps) are fields of the
config and recorded in ``config.json``. One exception: ``ceda`` and ``acet``
train at the authors' peak lr 0.1 (:data:`NOISE_CPU_LR`), not the ``cpu``
preset's 0.4 (see :mod:`experiments.methods.ceda`).

A new method: its module here, listed in :data:`_MODULES` (and in
:data:`STUDY_ORDER` if the study runs it), and its ``experiments/cifar10_<name>.py``.
"""

from __future__ import annotations

import os
import sys

import ml_collections

from experiments.methods import acet, ce, ceda, energy_ft, l2norm, logitnorm, oe
from experiments.methods.base import FINE_TUNING, HparamFlag, Method, StudyRuns
from experiments.methods.ceda import NOISE_CPU_LR

# The methods in the order the commands and planners list them.
_MODULES = (logitnorm, ce, oe, energy_ft, ceda, acet, l2norm)
_BY_NAME: dict[str, Method] = {module.METHOD.name: module.METHOD for module in _MODULES}
METHODS = tuple(_BY_NAME)
# The methods the CPU study runs (those with ``study`` runs), in the order of its
# report: the baseline, the from-scratch methods, the fine-tuned ones, the noise ones.
# Each seed's wave of its plan runs the from-scratch ones in this order, then the
# fine-tuned ones.
STUDY_ORDER = ("ce", "logitnorm", "l2norm", "oe", "energy_ft", "ceda", "acet")


def get(name: str) -> Method:
    """The record of method ``name``."""
    if name not in _BY_NAME:
        raise ValueError(f"method must be one of {METHODS}, got {name!r}.")
    return _BY_NAME[name]


def presets_of(method: str) -> tuple[str, ...]:
    """The presets a method accepts."""
    return get(method).presets


def get_config(method: str, preset: str, *, finetune: bool = False) -> ml_collections.ConfigDict:
    """The config of ``method`` at ``preset``; ``finetune`` selects the fine-tuning recipe."""
    return get(method).config(preset, finetune=finetune)


def train_argv(
    method: str, workdir: str | os.PathLike, *, preset: str, data: str = "local"
) -> list[str]:
    """The training command of ``method`` as a user types it, in this interpreter:
    ``python -m experiments.cifar10_<method> --workdir=... --preset=... --data=...``
    (callers append their ``--config.*`` overrides)."""
    get(method)
    return [
        sys.executable,
        "-m",
        f"experiments.cifar10_{method}",
        f"--workdir={workdir}",
        f"--preset={preset}",
        f"--data={data}",
    ]


__all__ = [
    "FINE_TUNING",
    "METHODS",
    "NOISE_CPU_LR",
    "STUDY_ORDER",
    "HparamFlag",
    "Method",
    "StudyRuns",
    "get",
    "get_config",
    "presets_of",
    "train_argv",
]
