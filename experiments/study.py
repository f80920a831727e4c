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
:mod:`experiments.study_report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from experiments import cli
from experiments.configs.default import get_config
from experiments.configs.methods import NOISE_CPU_LR

# From-scratch epochs of every method: what fits the study's budget of about six
# hours of a 2-core CPU (benchmarks/results/acet_cost.md gives each objective's cost).
EPOCHS = 5
# ACET's PGD steps during training (the paper's 40 and the cpu preset's 5 do not fit).
ACET_TRAIN_STEPS = 2
SEEDS = {
    "ce": 3,
    "logitnorm": 3,
    "l2norm": 3,
    "ceda": 2,
    "acet": 2,
    "oe": 2,
    "energy_ft": 2,
}
# Checkpoint every this many steps (about a quarter of an epoch at batch 256): a
# stopped study loses at most that much work.
CHECKPOINT_EVERY = 50
LOG_FILE = "study.jsonl"
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


def plan(epochs: int = EPOCHS) -> list[Run]:
    """The study's runs in the order they are run (seed 0 of every method first)."""
    scratch = ("ce", "logitnorm", "l2norm", "ceda", "acet")
    waves: list[list[Run]] = []
    for seed in range(max(SEEDS.values())):
        wave = []
        for method in scratch:
            if seed < SEEDS[method]:
                args = [f"--config.train.epochs={epochs}"]
                if method == "acet":
                    args.append(f"--config.objective.hparams.attack_steps={ACET_TRAIN_STEPS}")
                wave.append(Run(f"{method}/seed{seed}", method, seed, tuple(args)))
        for method in ("oe", "energy_ft"):
            if seed < SEEDS[method]:
                wave.append(Run(f"{method}/seed{seed}", method, seed, init_from=f"ce/seed{seed}"))
        waves.append(wave)
    sweep = [
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
    sweep = [dataclasses.replace(r, group="sweep") for r in sweep]
    # CE at the noise methods' lr is their claims' baseline: it runs right after the
    # seed-0 wave, so that a partial study already compares CEDA/ACET fairly.
    baseline = [r for r in sweep if r.name == "sweep/ce_lr0.1/seed0"]
    rest = [r for r in sweep if r not in baseline]
    return waves[0] + baseline + [r for wave in waves[1:] for r in wave] + rest


def command(run: Run, root: str, data: str, preset: str = "cpu") -> list[str]:
    """The command line that trains and evaluates ``run`` (what a user would type)."""
    argv = [
        sys.executable,
        "-m",
        f"experiments.cifar10_{run.method}",
        f"--workdir={os.path.join(root, run.name)}",
        f"--preset={preset}",
        f"--data={data}",
        f"--config.seed={run.seed}",
        f"--config.train.checkpoint_every={CHECKPOINT_EVERY}",
        "--config.eval.ood=true",
    ]
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


def _log(root: str, record: dict) -> None:
    with open(os.path.join(root, LOG_FILE), "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}) + "\n")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run_study(
    root: str,
    *,
    data: str,
    only: Sequence[str] = (),
    epochs: int = EPOCHS,
    preset: str = "cpu",
) -> bool:
    """Runs every unfinished run of the plan (or those named in ``only``), in order.

    Returns True when every planned run is done. A run that fails stops the study
    with its exit status; its workdir keeps what it saved.
    """
    os.makedirs(root, exist_ok=True)
    runs = [r for r in plan(epochs) if not only or r.name in only or r.method in only]
    todo = [r for r in runs if state_of(r, root) != "done"]
    print(f"study in {root}: {len(runs) - len(todo)} of {len(runs)} runs done, {len(todo)} to go")
    durations = []
    for i, run in enumerate(todo, 1):
        if run.init_from and state_of(Run(run.init_from, "", 0), root) != "done":
            print(f"[{i}/{len(todo)}] {run.name}: waits for {run.init_from}; skipped this time")
            continue
        eta = ""
        if durations:
            eta = f", about {_minutes(sum(durations) / len(durations) * (len(todo) - i + 1))} left"
        print(f"[{i}/{len(todo)}] {run.name} ({state_of(run, root)}{eta})", flush=True)
        argv = command(run, root, data, preset)
        _log(root, {"run": run.name, "event": "start", "command": " ".join(argv[1:])})
        start = time.perf_counter()
        done = subprocess.run(argv, check=False)
        elapsed = time.perf_counter() - start
        _log(root, {"run": run.name, "event": "end", "rc": done.returncode, "seconds": elapsed})
        if done.returncode != 0:
            how = (
                f"was killed by signal {-done.returncode}"
                + (" (SIGKILL: out of memory?)" if done.returncode == -9 else "")
                if done.returncode < 0
                else f"exited with status {done.returncode}"
            )
            print(
                f"[{i}/{len(todo)}] {run.name} {how}; the study stops here. Its workdir keeps "
                "its checkpoints: run the same command again to resume.",
                file=sys.stderr,
            )
            raise SystemExit(1)
        durations.append(elapsed)
        print(f"[{i}/{len(todo)}] {run.name}: done in {_minutes(elapsed)}", flush=True)
    return all(state_of(r, root) == "done" for r in plan(epochs))


def data_name(config: dict) -> str:
    """The dataset a run actually trained on: ``cifar10`` from the offline files is
    ``cifar10_jpeg`` (their images went through JPEG)."""
    from ood_jax import data as D

    spec = D.get_dataset_spec(config["data"]["dataset"])
    if config["data"]["source"] == "local" and spec.offline_alternative:
        return spec.offline_alternative
    return spec.name


def published_name(run: Run, results: dict) -> str:
    """``<dataset>/<model>/<run>``: ``cifar10_jpeg/resnet9/logitnorm/seed0`` (sweep runs:
    ``cifar10_jpeg/resnet9/sweep/<variant>/seed0``)."""
    return f"{data_name(results['config'])}/{results['model']['name']}/{run.name}"


def publish(root: str, folder: str, runs: Sequence[Run]) -> list[str]:
    """Exports each finished run's final weights to ``folder`` (``ood_jax.pretrained``
    format, with ``manifest.json``); runs already published at their final step are
    left as they are. Returns the names published now."""
    from experiments.study_report import load_runs
    from experiments.workdir import Workdir
    from ood_jax import pretrained

    try:
        have = {n: pretrained.info(n, folder) for n in pretrained.available(folder)}
    except pretrained.PretrainedError:
        have = {}
    done = []
    for entry in load_runs(root, runs).values():
        run, results = entry["run"], entry["results"]
        workdir = os.path.join(root, run.name)
        step = results["checkpoint"]["step"]
        name = published_name(run, results)
        if name in have and have[name]["step"] == step:
            continue
        with Workdir(workdir) as finished:
            _, params, batch_stats, metadata, step = finished.restore(step=step)
        pretrained.export(
            folder,
            name,
            params=params,
            batch_stats=batch_stats,
            entry={
                "model": metadata["model"],
                "dataset": data_name(metadata["config"]),
                "normalization": results["data"]["normalization"],
                "method": run.method,
                "seed": run.seed,
                "step": step,
                "test_accuracy": results["classification"]["accuracy"],
                "test_examples": results["data"]["id"]["num_examples"],
                "eval_batch_size": metadata["config"]["data"]["eval_batch_size"],
                "run": run.name,
                "config": metadata["config"],
            },
        )
        done.append(name)
    return done


def print_plan(root: str, epochs: int) -> None:
    for run in plan(epochs):
        source = [f"--init_from {run.init_from}"] if run.init_from else []
        print(
            f"{state_of(run, root):8s} {run.group:6s} {run.name:34s} "
            + " ".join([*source, *run.args])
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="the study's runs go in sub-folders")
    parser.add_argument("--data", default="local", help="local (offline files) or a folder")
    parser.add_argument(
        "--report_dir",
        default=os.path.join("results", "cpu_study"),
        help="the report and the published checkpoints (default: results/cpu_study)",
    )
    parser.add_argument("--only", default="", help="comma-separated run or method names")
    parser.add_argument("--plan", action="store_true", help="list the runs and their state")
    parser.add_argument("--report_only", action="store_true", help="write the report only")
    parser.add_argument(
        "--epochs", type=int, default=EPOCHS, help="from-scratch epochs (the study's: 5)"
    )
    parser.add_argument(
        "--preset", default="cpu", choices=("cpu", "smoke"), help="smoke: a quick trial"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        raise cli.UsageError(f"--epochs must be >= 1, got {args.epochs}.")
    root = os.path.abspath(args.workdir)
    if args.plan:
        print_plan(root, args.epochs)
        return
    complete = True
    if not args.report_only:
        only = [s for s in args.only.split(",") if s]
        complete = run_study(
            root, data=args.data, only=only, epochs=args.epochs, preset=args.preset
        )
    from experiments import study_report

    report_dir = args.report_dir
    published = publish(root, os.path.join(report_dir, "checkpoints"), plan(args.epochs))
    if published:
        print(f"published {len(published)} checkpoints in {report_dir}/checkpoints")
    command = " ".join(["python -m experiments.study", *(argv or [])])
    study_report.write(root, report_dir, plan(args.epochs), complete=complete, command=command)
    print(f"report: {os.path.join(report_dir, 'results.md')}")


if __name__ == "__main__":
    cli.run_main(main, sys.argv[1:])
