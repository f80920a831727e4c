"""The record of a training method (:class:`Method`) and the recipe pieces methods share.

A method is one module ``experiments/methods/<name>.py`` defining ``METHOD =
Method(...)``, listed in ``experiments/methods/__init__.py``, plus its command
``experiments/cifar10_<name>.py``. The record holds all the repository knows of
it: the objective it trains, its presets and the edits each makes to the base
config (``experiments.configs.default``), its fine-tuning rule and extra flags,
how the study's report names and scores it, and its runs in the study.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import ml_collections

from experiments.configs import default

# A method's edits to the base config of a preset: ``recipe(config, preset, finetune)``
# (``finetune``: the fine-tuning recipe is wanted, see ``Method.fine_tuning``).
Recipe = Callable[[ml_collections.ConfigDict, str, bool], None]
# ``Method.fine_tuning``: ``--init_from`` only sets the initial weights (the recipe is
# the same); it selects the method's fine-tuning recipe; the method only fine-tunes.
FINE_TUNING = ("none", "optional", "required")


@dataclasses.dataclass(frozen=True)
class HparamFlag:
    """``--<name>``: the objective hyperparameter ``name`` on the command line, a value
    (``--config.objective.hparams.<name>=<value>``) or ``auto``: set from the initial
    model before training (``config.objective.auto``; :mod:`experiments.finetune`)."""

    name: str
    help: str


@dataclasses.dataclass(frozen=True)
class StudyRuns:
    """A method's runs in the CPU study (:mod:`experiments.study.plan`).

    Attributes:
      seeds: seeds 0 .. ``seeds - 1``.
      args: command-line arguments added to each of its runs (from-scratch runs also
        get the study's ``--config.train.epochs``).
      init_from: the method whose run of the same seed each run fine-tunes
        (``--init_from <study>/<init_from>/seed<N>``); None: trained from scratch.
    """

    seeds: int
    args: tuple[str, ...] = ()
    init_from: str | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method: everything the commands, the planners and the study know of it.

    Attributes:
      name: its name (``--method``, ``config.method``, ``experiments.cifar10_<name>``).
      label: its name in the study's report.
      objective: the registered objective it trains (``ood_jax.train``).
      headline_score: the OOD score its paper reports (the study's report ranks it by it).
      doc: what it trains, its paper, recipe and command (its module's docstring;
        ``--help`` prints it).
      recipe: its edits to the preset's base config, ``(config, preset, finetune)``;
        None: the base config as it is.
      extra_presets: presets beyond ``paper``, ``cpu`` and ``smoke``: ``{name: the
        base preset its recipe edits}``.
      fine_tuning: ``"none"``, ``"optional"`` or ``"required"`` (:data:`FINE_TUNING`):
        what ``--init_from`` means for it.
      flags: its own command-line flags (:class:`HparamFlag`).
      near_auxiliary: trained with auxiliary outliers whose classes overlap Tiny
        ImageNet test: its results there are near-auxiliary (marked in the report).
      study: its runs in the CPU study; None: not in the study.
    """

    name: str
    label: str
    objective: str
    headline_score: str
    doc: str
    recipe: Recipe | None = None
    extra_presets: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)
    fine_tuning: str = "none"
    flags: tuple[HparamFlag, ...] = ()
    near_auxiliary: bool = False
    study: StudyRuns | None = None

    def __post_init__(self):
        if self.fine_tuning not in FINE_TUNING:
            raise ValueError(f"fine_tuning must be one of {FINE_TUNING}, got {self.fine_tuning!r}.")

    @property
    def presets(self) -> tuple[str, ...]:
        """The presets it accepts."""
        return (*default.PRESETS, *self.extra_presets)

    def config(self, preset: str, *, finetune: bool = False) -> ml_collections.ConfigDict:
        """Its config at ``preset``; ``finetune`` selects the fine-tuning recipe (always
        for a method that only fine-tunes)."""
        if preset not in self.presets:
            raise ValueError(f"preset must be one of {self.presets}, got {preset!r}.")
        c = default.get_config(self.extra_presets.get(preset, preset), self.objective)
        c.method = self.name
        c.preset = preset
        if self.recipe is not None:
            self.recipe(c, preset, finetune or self.fine_tuning == "required")
        return c


# Epochs of fine-tuning per preset (the papers': 10).
FINETUNE_EPOCHS = {"paper": 10, "cpu": 2, "smoke": 1}


def fine_tuning_recipe(c: ml_collections.ConfigDict, preset: str) -> None:
    """Liu et al.'s fine-tuning (also their outlier-exposure baseline's): a fresh
    Nesterov SGD, lr 1e-3 cosine down to 1e-6 per step, weight decay 5e-4, 10 epochs."""
    c.train.epochs = FINETUNE_EPOCHS[preset]
    c.optim.lr = 1e-3
    c.optim.schedule = "cosine"
    c.optim.final_lr = 1e-6
    c.optim.nesterov = True
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.warmup_epochs = 0.0
