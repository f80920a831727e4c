"""The CPU reproduction study: every method on one model and one dataset, one protocol.

    python -m experiments.study --workdir runs/study            # run or resume, then report
    python -m experiments.study --workdir runs/study --plan     # list the runs and their state
    python -m experiments.study --workdir runs/study --report_only --report_dir results/cpu_study

Every run is the ``cpu`` preset's model (ResNet-9, width 16) on CIFAR-10 (JPEG)
from the offline files, trained by the same runner a user calls
(``python -m experiments.cifar10_<method>``) in its own process, in its own
workdir ``<workdir>/<run name>``. A run that has its report is skipped; one that
was stopped resumes from its newest checkpoint (bit-exactly), so the study can
be stopped at any moment (Ctrl-C, a closed session) and continued later by the
same command. Runs go in waves: seed 0 of every method first (then CE at the
noise methods' lr, their baseline), so a partial study already compares all
methods.

The runs (:func:`plan`):

- from scratch, ``EPOCHS`` epochs each (the same schedule for every method):
  CE, LogitNorm and L2 feature normalization with 3 seeds, CEDA and ACET with 2
  (these two at the authors' peak lr 0.1, the ``cpu`` preset's choice for them:
  at the other methods' 0.4 CEDA diverged);
- fine-tuned from the CE runs of the same seed: outlier exposure and energy
  fine-tuning, 2 seeds (the ``cpu`` preset's fine-tuning epochs);
- the sweep that checks whether LogitNorm needs a longer schedule or another
  temperature: CE and LogitNorm at twice the epochs, LogitNorm at tau 0.01 and
  0.2; and the learning rate of the noise methods: CE at their lr 0.1 (the
  baseline their claims are compared with) and CEDA at the others' lr 0.4, the
  diverged run kept as evidence (seed 0).

The evaluation is the ``cpu`` preset's: every registered score on the full
offline OOD sets, the synthetic sets and the adversarial-noise set, both
protocols. The report (``--report_dir``) is written from the runs' workdirs by
:mod:`experiments.study.report`.

Modules: :mod:`~experiments.study.plan` (the runs, their commands and states),
:mod:`~experiments.study.execute` (running them), :mod:`~experiments.study.publish`
(their checkpoints), :mod:`~experiments.study.report` (``results.md``, ``results.json``,
plots); ``python -m experiments.study`` is :mod:`experiments.study.__main__`.
"""

from experiments.study.execute import LOG_FILE, run_study
from experiments.study.plan import (
    CHECKPOINT_EVERY,
    EPOCHS,
    SCRATCH_CPU_LR,
    Run,
    command,
    plan,
    print_plan,
    state_of,
)
from experiments.study.publish import data_name, publish, published_name

__all__ = [
    "CHECKPOINT_EVERY",
    "EPOCHS",
    "LOG_FILE",
    "SCRATCH_CPU_LR",
    "Run",
    "command",
    "data_name",
    "plan",
    "print_plan",
    "publish",
    "published_name",
    "run_study",
    "state_of",
]
