"""The study's runs: what each one trains, in which order, and how far it got."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from experiments import methods
from experiments.configs.default import get_config
from experiments.methods import NOISE_CPU_LR

# From-scratch epochs of every method: what fits the study's budget of about six
# hours of a 2-core CPU (benchmarks/results/acet_cost.md gives each objective's cost).
EPOCHS = 5
# Checkpoint every this many steps (about a quarter of an epoch at batch 256): a
# stopped study loses at most that much work.
CHECKPOINT_EVERY = 50
# The cpu preset's peak lr of every other from-scratch method.
SCRATCH_CPU_LR = get_config("cpu").optim.lr


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the study.

    Attributes:
      name: its workdir below the study's (``ce/seed0``, ``sweep/logitnorm_tau0.2/seed0``).
      method: the entry point (``experiments.cifar10_<method>``).
      seed: the run's seed.
      args: further command-line arguments (config overrides).
      init_from: the name of the run it fine-tunes, if any.
      group: ``"main"`` or ``"sweep"``.
    """

    name: str
    method: str
    seed: int
    args: tuple[str, ...] = ()
    init_from: str | None = None
    group: str = "main"


# The scores the study's report reads (each method's own, the logit-shift table's and
# the density split's): a study run with --scores always scores these too.
REPORT_SCORES = (
    "msp",
    "max_logit",
    "energy",
    "feature_norm",
    "mahalanobis",
    "mahalanobis_l2",
    "gmm",
    "gmm_l2",
)


def plan(epochs: int = EPOCHS) -> list[Run]:
    """The study's runs in the order they are run (seed 0 of every method first).

    Each method's seeds, further arguments and the run it fine-tunes: its record's
    ``study`` (``experiments/methods/<method>.py``); their order: ``methods.STUDY_ORDER``.
    """
    entries = [(m, methods.get(m).study) for m in methods.STUDY_ORDER]
    scratch = [(m, s) for m, s in entries if s.init_from is None]
    finetuned = [(m, s) for m, s in entries if s.init_from is not None]
    waves: list[list[Run]] = []
    for seed in range(max(s.seeds for _, s in entries)):
        wave = [
            Run(f"{m}/seed{seed}", m, seed, (f"--config.train.epochs={epochs}", *s.args))
            for m, s in scratch
            if seed < s.seeds
        ]
        wave += [
            Run(f"{m}/seed{seed}", m, seed, s.args, init_from=f"{s.init_from}/seed{seed}")
            for m, s in finetuned
            if seed < s.seeds
        ]
        waves.append(wave)
    sweep = [dataclasses.replace(r, group="sweep") for r in _sweep(epochs)]
    # CE at the noise methods' lr is their claims' baseline: it runs right after the
    # seed-0 wave, so that a partial study already compares CEDA/ACET fairly.
    baseline = [r for r in sweep if r.name == "sweep/ce_lr0.1/seed0"]
    rest = [r for r in sweep if r not in baseline]
    return waves[0] + baseline + [r for wave in waves[1:] for r in wave] + rest


def _sweep(epochs: int) -> list[Run]:
    """LogitNorm's schedule and temperature, and the noise methods' learning rate."""
    return [
        Run("sweep/ce_epochs2x/seed0", "ce", 0, (f"--config.train.epochs={2 * epochs}",)),
        Run(
            "sweep/logitnorm_epochs2x/seed0",
            "logitnorm",
            0,
            (f"--config.train.epochs={2 * epochs}",),
        ),
        Run(
            "sweep/logitnorm_tau0.01/seed0",
            "logitnorm",
            0,
            (f"--config.train.epochs={epochs}", "--config.objective.hparams.temperature=0.01"),
        ),
        Run(
            "sweep/logitnorm_tau0.2/seed0",
            "logitnorm",
            0,
            (f"--config.train.epochs={epochs}", "--config.objective.hparams.temperature=0.2"),
        ),
        Run(
            "sweep/ce_lr0.1/seed0",
            "ce",
            0,
            (f"--config.train.epochs={epochs}", f"--config.optim.lr={NOISE_CPU_LR}"),
        ),
        Run(
            "sweep/ceda_lr0.4/seed0",
            "ceda",
            0,
            (f"--config.train.epochs={epochs}", f"--config.optim.lr={SCRATCH_CPU_LR}"),
        ),
    ]


def command(
    run: Run, root: str, data: str, preset: str = "cpu", scores: Sequence[str] = ()
) -> list[str]:
    """The command line that trains and evaluates ``run`` (what a user would type);
    ``scores``: the detectors it scores (default: every registered one)."""
    argv = [
        *methods.train_argv(run.method, os.path.join(root, run.name), preset=preset, data=data),
        f"--config.seed={run.seed}",
        f"--config.train.checkpoint_every={CHECKPOINT_EVERY}",
        "--config.eval.ood=true",
    ]
    if scores:
        argv.append(f"--config.eval.scores={','.join(scores)}")
    if run.init_from is not None:
        argv.append(f"--init_from={os.path.join(root, run.init_from)}")
    return argv + list(run.args)


def state_of(run: Run, root: str) -> str:
    """``done`` (report written), ``started`` (checkpoints, no report) or ``todo``."""
    workdir = os.path.join(root, run.name)
    if os.path.exists(os.path.join(workdir, "eval", "results.json")):
        return "done"
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        return "started"
    return "todo"


def print_plan(root: str, epochs: int = EPOCHS) -> None:
    """Prints each planned run: its state, group, name and arguments."""
    for run in plan(epochs):
        source = [f"--init_from {run.init_from}"] if run.init_from else []
        print(
            f"{state_of(run, root):8s} {run.group:6s} {run.name:34s} "
            + " ".join([*source, *run.args])
        )
