"""The regime study: do LogitNorm and L2 feature normalization hold once CE is overconfident?

The 5-epoch study's cross-entropy models end well calibrated (ECE 1.7%), a regime
the LogitNorm and L2 papers never describe. This study first finds, with a pilot
of cross-entropy alone, a schedule at which CE has become overconfident, by the
rule in :data:`RULE` (declared before any main run); then it trains every method
of the comparison with that one schedule.

    python -m experiments.study.regime pilot --workdir runs/regime   # train/resume the pilot
    python -m experiments.study.regime measure --workdir runs/regime/pilot/ce_e30
    python -m experiments.study.regime run --workdir runs/regime --epochs E   # main runs
    python -m experiments.study.regime plan --workdir runs/regime --epochs E
    python -m experiments.study.regime report --workdir runs/regime --report_dir REPORT_DIR
    python -m experiments.study.regime collect --workdir runs/regime --report_dir REPORT_DIR
    python -m experiments.study.regime publish --workdir runs/regime --report_dir REPORT_DIR

``measure`` reads every kept checkpoint of a run at the end of an epoch (the pilot
keeps one per epoch; a mid-epoch save of a stopped run is passed over) and writes
``regime.jsonl`` beside it: per epoch, accuracy, loss and mean logit
norm on a fixed seeded subset of the *un-augmented* training images (what the
model has fitted, not the augmented stream the training log averages), and on the
test set accuracy, ECE (15 bins) and mean MSP. Steps already measured are kept,
so it resumes.

The main runs (:func:`plan`), from scratch with the chosen recipe (``--recipe``: the
``cpu`` preset or one departure from it, :data:`RECIPES`) and one schedule:
cross-entropy; LogitNorm at the paper's tau 0.04 and at 0.01 (the authors' README
command's); L2 feature normalization (spectral norm, leaky ReLU, average pooling);
cross-entropy with the same three architecture options (the L2 paper's "No L2"
baseline); then energy-bounded and outlier-exposure fine-tuning of each seed's CE run.
Seeds go in waves (seed 0 of every run first). Every run keeps its checkpoints
(``--measure_every`` epochs apart), measured afterwards like the pilot; the pilot of
the chosen recipe and schedule is CE seed 0.

``report`` writes the study's report (:mod:`experiments.study.report.regime`) from the
runs that have finished, by default of the chosen schedule (:data:`CHOSEN_EPOCHS`
epochs of :data:`CHOSEN_RECIPE`). ``publish`` exports the finished runs' final weights
into ``REPORT_DIR/checkpoints`` as ``ood_jax.pretrained`` checkpoints named
``cifar10_jpeg/resnet9/regime/<run>/seed<k>`` (:func:`published_name`); runs already
published at their final step are left alone, so it can be run after every slice.
``collect`` copies the finished, measured runs' logs, measurements and reports (no
checkpoints) into ``REPORT_DIR/runs``, which ``report --workdir REPORT_DIR/runs`` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence

import numpy as np

from experiments import cli, methods
from experiments.configs.default import get_config
from experiments.study.execute import execute
from experiments.study.plan import Run, state_of
from experiments.study.publish import data_name, publish
from experiments.workdir import Workdir
from ood_jax.train.logging import read_records

# The regime rule, fixed before the main runs (it is copied into the report). The
# 5-epoch study's CE models: test ECE 1.7 ± 0.3%, train accuracy (augmented stream) 79%.
RULE = {
    "train_clean_accuracy_min": 0.97,
    "test_ece_min": 2 * 0.017,
    "text": (
        "CE is overconfident when, at the end of training, its accuracy on un-augmented "
        "training images is at least 97%, its test ECE at least 3.4% (twice the 5-epoch "
        "study's 1.7%), and its mean test MSP above its test accuracy (the calibration gap "
        "is over-, not under-confidence)."
    ),
}
# name -> (entry point, config overrides) of the main runs. LogitNorm's second tau is
# 0.01, the authors' README command's (their released checkpoint's, most likely), fixed
# before any main run; not 0.2, which the 5-epoch sweep favoured on test-set FPR95.
RUNS = {
    "ce": ("ce", ()),
    "logitnorm": ("logitnorm", ()),
    "logitnorm_tau0.01": ("logitnorm", ("--config.objective.hparams.temperature=0.01",)),
    "l2norm": ("l2norm", ()),
    "ce_l2arch": (
        "ce",
        (
            "--config.model.options.spectral_norm=true",
            "--config.model.options.activation=leaky_relu",
            "--config.model.options.pooling=avg",
        ),
    ),
}
SEEDS = 3
# Fine-tuned from each CE seed's final checkpoint (both papers fine-tune a trained CE
# model), with the cpu preset's fine-tuning recipe (2 epochs of the papers' 10: lr 1e-3
# cosine, 128 + 256 outliers per 128 images scaled to the batch) and the paper margins.
FINETUNED = ("energy_ft", "oe")
# The schedule the pilots chose for the main runs (results/regime_study/README.md): the
# report's default.
CHOSEN_EPOCHS = 80
CHOSEN_RECIPE = "subset10k"
# Un-augmented training images measured per checkpoint (a seeded subset).
TRAIN_SUBSET = 10000
REGIME_FILE = "regime.jsonl"
PILOT_EPOCHS = 30
# CIFAR-10's training split; a recipe with a train_limit trains on that many instead.
TRAIN_IMAGES = 50000
# The candidate recipes of the pilots: name -> overrides of the ``cpu`` preset. Each is
# one departure from it (the papers train on all 50,000 images with crop + flip).
RECIPES = {
    # The cpu preset as it is: ResNet-9 width 16, crop + flip, all 50,000 images.
    "cpu": (),
    # No augmentation: the classic route to an overfitted, overconfident CE.
    "noaug": ("--config.data.augment=false",),
    # Crop + flip kept, on a seeded random 10,000-image subset (about 1,000 a class).
    "subset10k": ("--config.data.train_limit=10000",),
    # Crop + flip kept, all images, a 4x wider model (width 32: about 1.6M parameters).
    "wide32": ("--config.model.options.width=32",),
}


def _recipe_args(recipe: str) -> tuple[str, ...]:
    if recipe not in RECIPES:
        raise cli.UsageError(f"--recipe must be one of {sorted(RECIPES)}, got {recipe!r}.")
    return RECIPES[recipe]


def pilot_run(epochs: int = PILOT_EPOCHS, recipe: str = "cpu") -> Run:
    """The pilot: CE alone, seed 0, ``epochs`` epochs of ``recipe``."""
    name = f"pilot/ce_e{epochs}" if recipe == "cpu" else f"pilot/ce_{recipe}_e{epochs}"
    args = (f"--config.train.epochs={epochs}", *_recipe_args(recipe))
    return Run(name, "ce", 0, args, group="pilot")


def plan(epochs: int, seeds: int = SEEDS, recipe: str = "cpu") -> list[Run]:
    """The main runs, seed 0 of every run first; CE seed 0 is the pilot of ``epochs``
    epochs of ``recipe`` (the same run: CE, seed 0, that schedule), trained once. Each
    seed's energy and OE fine-tuning start from that seed's CE run (the recipe's data
    changes kept, the preset's fine-tuning epochs)."""
    runs = []
    for seed in range(seeds):
        ce = pilot_run(epochs, recipe) if seed == 0 else None
        for name, (method, args) in RUNS.items():
            if name == "ce" and seed == 0:
                runs.append(ce)
                continue
            run_args = (f"--config.train.epochs={epochs}", *_recipe_args(recipe), *args)
            runs.append(Run(f"{name}/seed{seed}", method, seed, run_args))
        ce_name = ce.name if ce is not None else f"ce/seed{seed}"
        tuned = tuple(a for a in _recipe_args(recipe) if not a.startswith("--config.model."))
        for method in FINETUNED:
            runs.append(Run(f"{method}/seed{seed}", method, seed, tuned, init_from=ce_name))
    return runs


def _train_images(run: Run) -> int:
    limits = [a for a in run.args if a.startswith("--config.data.train_limit=")]
    return int(limits[-1].split("=")[1]) if limits else TRAIN_IMAGES


def command(run: Run, root: str, measure_every: int = 1) -> list[str]:
    """The training command of ``run``: the ``cpu`` preset on the offline files, a
    checkpoint every ``measure_every`` epochs, every one kept (each is measured), then
    the OOD report."""
    if run.init_from is not None:  # a fine-tuning run: the preset's epochs, each measured
        return [
            *_base_command(run, root),
            f"--init_from={os.path.join(root, run.init_from)}",
            "--config.train.checkpoint_every=0",
            "--config.train.max_to_keep=20",
            *run.args,
        ]
    epochs = int(next(a for a in run.args if a.startswith("--config.train.epochs=")).split("=")[1])
    batch = get_config("cpu").train.batch_size
    every = 0 if measure_every == 1 else measure_every * (_train_images(run) // batch)
    return [
        *_base_command(run, root),
        f"--config.train.checkpoint_every={every}",
        f"--config.train.max_to_keep={epochs // measure_every + 2}",
        *run.args,
    ]


def _base_command(run: Run, root: str) -> list[str]:
    return [
        *methods.train_argv(run.method, os.path.join(root, run.name), preset="cpu"),
        f"--config.seed={run.seed}",
        "--config.eval.ood=true",
    ]


def softmax_stats(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, mean cross-entropy, mean MSP and mean logit L2 norm, in float64."""
    z = logits.astype(np.float64)
    top = z.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    log_p = z - log_norm[:, None]
    return {
        "accuracy": float((z.argmax(axis=1) == labels).mean()),
        "loss": float(-log_p[np.arange(len(labels)), labels].mean()),
        "msp": float(np.exp(log_p.max(axis=1)).mean()),
        "logit_norm": float(np.linalg.norm(z, axis=1).mean()),
    }


def _load_inputs(cache: dict, metadata: dict) -> None:
    """Fills ``cache`` once, from a checkpoint's metadata: the un-augmented training
    subset and the test set, their normalization and batch size, steps per epoch."""
    from experiments.data import load_splits
    from ood_jax import data as D

    if "data" in cache:
        return
    config = cli.config_from_json(metadata["config"])
    train, test = load_splits(config)
    spec = D.get_dataset_spec(config.data.dataset)
    cache["data"] = (D.random_subset(train, TRAIN_SUBSET, seed=config.seed), test)
    cache["norm"] = {"mean": spec.mean, "std": spec.std}
    cache["batch"] = config.data.eval_batch_size
    cache["steps_per_epoch"] = len(train) // config.train.batch_size


def measure_step(run: Workdir, step: int, cache: dict) -> dict:
    """The regime record of the run's checkpoint ``step``."""
    from ood_jax import data as D
    from ood_jax.evaluate import ForwardPass
    from ood_jax.metrics import expected_calibration_error

    model_def, params, batch_stats, metadata, step = run.restore(step=step)
    model = model_def.merge(params, batch_stats, train=False, key=None)
    _load_inputs(cache, metadata)
    forward = ForwardPass(model)
    record: dict = {"step": step, "epoch": step / cache["steps_per_epoch"]}
    for name, ds in zip(("train_clean", "test"), cache["data"], strict=True):
        out = forward(D.eval_batches(ds, batch_size=cache["batch"], **cache["norm"]))
        record.update({f"{name}_{k}": v for k, v in softmax_stats(out.logits, out.labels).items()})
        if name == "test":
            record["test_ece"] = expected_calibration_error(out.logits, out.labels)
    return record


def read_regime(workdir: str) -> list[dict]:
    """The run's regime records (``regime.jsonl``) in step order, one per step; [] if
    it has none (a torn last line, a measurement being written, is skipped)."""
    path = os.path.join(workdir, REGIME_FILE)
    if not os.path.exists(path):
        return []
    done = {r["step"]: r for r in read_records(path)[0]}
    return [done[s] for s in sorted(done)]


def measure(workdir: str) -> list[dict]:
    """Measures every kept checkpoint of ``workdir`` not yet in its ``regime.jsonl``
    (through the run's one ``Workdir``: its checkpointer lists and restores the steps)."""
    done = {r["step"]: r for r in read_regime(workdir)}
    with Workdir(workdir) as run:
        _measure_new(run, os.path.join(workdir, REGIME_FILE), done)
    return [done[s] for s in sorted(done)]


def _measure_new(run: Workdir, path: str, done: dict) -> None:
    cache: dict = {}
    for step in run.checkpointer.all_steps():
        if step in done:
            continue
        _load_inputs(cache, run.checkpointer.read_metadata(step))
        if step % cache["steps_per_epoch"]:
            # Saved when Ctrl-C or SIGTERM stopped the run mid-epoch: not a point of
            # the per-epoch curves (the run resumes from it and saves the epochs after).
            print(f"step {step}: mid-epoch (a stopped run's save), not measured", flush=True)
            continue
        record = measure_step(run, step, cache)
        done[step] = record
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(
            f"step {step} (epoch {record['epoch']:.0f}): train (clean) acc "
            f"{record['train_clean_accuracy']:.4f}, test acc {record['test_accuracy']:.4f}, "
            f"ECE {record['test_ece']:.4f}, test MSP {record['test_msp']:.4f}",
            flush=True,
        )


def meets_rule(record: dict) -> bool:
    """Whether a run's final regime record shows the overconfident regime (:data:`RULE`)."""
    return (
        record["train_clean_accuracy"] >= RULE["train_clean_accuracy_min"]
        and record["test_ece"] >= RULE["test_ece_min"]
        and record["test_msp"] > record["test_accuracy"]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.study.regime", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "action", choices=("pilot", "measure", "plan", "run", "collect", "report", "publish")
    )
    parser.add_argument("--workdir", required=True, help="the study's root (a run: measure)")
    parser.add_argument(
        "--epochs",
        type=int,
        help=f"epochs of every run (default {PILOT_EPOCHS}; report: {CHOSEN_EPOCHS})",
    )
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seeds of each main run")
    parser.add_argument(
        "--recipe",
        help=f"the cpu preset's variant, one of {sorted(RECIPES)} (default cpu; report: "
        f"{CHOSEN_RECIPE})",
    )
    parser.add_argument(
        "--measure_every", type=int, default=1, help="epochs between measured checkpoints"
    )
    parser.add_argument(
        "--report_dir",
        help="report: where report.md, report.json go; publish: checkpoints/ below it; "
        "collect: runs/ below it",
    )
    args = parser.parse_args(argv)
    chosen = args.action in ("report", "publish", "collect")
    if args.epochs is None:
        args.epochs = CHOSEN_EPOCHS if chosen else PILOT_EPOCHS
    if args.recipe is None:
        args.recipe = CHOSEN_RECIPE if chosen else "cpu"
    if min(args.epochs, args.seeds, args.measure_every) < 1:
        raise cli.UsageError(
            "--epochs, --seeds and --measure_every must be >= 1, got "
            f"{args.epochs}, {args.seeds}, {args.measure_every}."
        )
    root = os.path.abspath(args.workdir)
    if args.action == "measure":
        _measure_and_judge(root)
        return
    if args.action == "report":
        _report(root, args)
        return
    if args.action == "publish":
        _publish(root, args)
        return
    if args.action == "collect":
        _check_dirs(root, args, "its runs/ gets the copies")
        runs = plan(args.epochs, args.seeds, args.recipe)
        done = collect(root, os.path.join(args.report_dir, "runs"), runs)
        print(f"collected {len(done)} runs" + "".join(f"\n  {n}" for n in done))
        return
    if args.action == "pilot":
        runs = [pilot_run(args.epochs, args.recipe)]
    else:
        runs = plan(args.epochs, args.seeds, args.recipe)
    if args.action == "plan":
        for run in runs:
            print(f"{state_of(run, root):8s} {run.name:28s} " + " ".join(run.args))
        return
    execute(root, runs, lambda run: command(run, root, args.measure_every))
    for run in runs:
        _measure_and_judge(os.path.join(root, run.name))


def _check_dirs(root: str, args: argparse.Namespace, what: str) -> None:
    """The usage errors of the actions that read the study and write to --report_dir."""
    if not args.report_dir:
        raise cli.UsageError(f"{args.action} needs --report_dir ({what}).")
    if not os.path.isdir(root):
        raise cli.UsageError(f"--workdir {args.workdir!r} is not a folder.")


def _report(root: str, args: argparse.Namespace) -> None:
    from experiments.study.report.regime import write

    _check_dirs(root, args, "where report.md goes")
    command = (
        f"python -m experiments.study.regime report --workdir {args.workdir} --report_dir "
        f"{args.report_dir} --epochs {args.epochs} --seeds {args.seeds} --recipe {args.recipe}"
    )
    runs = plan(args.epochs, args.seeds, args.recipe)
    summary = write(root, args.report_dir, runs, command=command)
    print(
        f"{len(summary['runs'])} of {len(runs)} runs reported; "
        f"{os.path.join(args.report_dir, 'report.md')}"
    )


# What a finished run keeps in the repository: no checkpoints, per-example scores or plots.
KEPT_FILES = ("config.json", "metrics.jsonl", "final.json", REGIME_FILE, "eval/results.md")


def collect(root: str, dest: str, runs: Sequence[Run]) -> list[str]:
    """Copies each finished and measured run of ``runs`` (``eval/results.json`` and
    ``regime.jsonl`` written) from ``root`` to ``dest/<run>``: :data:`KEPT_FILES`, and
    ``eval/results.json`` as compact JSON (about 40% smaller). A run whose copy is
    already as new as its report is left alone. Returns the runs copied now."""
    done = []
    for run in runs:
        src, out = os.path.join(root, run.name), os.path.join(dest, run.name)
        report = os.path.join(src, "eval", "results.json")
        if not (os.path.exists(report) and os.path.exists(os.path.join(src, REGIME_FILE))):
            continue
        copied = os.path.join(out, "eval", "results.json")
        if os.path.exists(copied) and os.path.getmtime(copied) >= os.path.getmtime(report):
            continue
        os.makedirs(os.path.join(out, "eval"), exist_ok=True)
        for name in KEPT_FILES:
            shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
        with open(report) as f:
            results = json.load(f)
        with open(copied + ".tmp", "w") as f:
            json.dump(results, f, separators=(",", ":"))
        os.replace(copied + ".tmp", copied)
        done.append(run.name)
    return done


def published_name(run: Run, results: dict) -> str:
    """``<dataset>/<model>/regime/<run>``: ``cifar10_jpeg/resnet9/regime/logitnorm/seed0``;
    CE seed 0 (trained as the pilot of the chosen recipe) is ``.../regime/ce/seed0``."""
    name = f"ce/seed{run.seed}" if run.group == "pilot" else run.name
    return f"{data_name(results['config'])}/{results['model']['name']}/regime/{name}"


def _publish(root: str, args: argparse.Namespace) -> None:
    _check_dirs(root, args, "its checkpoints/ gets the weights")
    if (args.epochs, args.recipe) != (CHOSEN_EPOCHS, CHOSEN_RECIPE):
        # The published names carry no schedule: only the chosen one is published.
        raise cli.UsageError(
            f"publish: only the chosen schedule is published ({CHOSEN_EPOCHS} epochs of "
            f"{CHOSEN_RECIPE}), got --epochs {args.epochs} --recipe {args.recipe}."
        )
    folder = os.path.join(args.report_dir, "checkpoints")
    runs = plan(args.epochs, args.seeds, args.recipe)
    done = publish(root, folder, runs, name_of=published_name)
    print(f"published {len(done)} checkpoints in {folder}" + "".join(f"\n  {n}" for n in done))


def _measure_and_judge(run: str) -> None:
    if not os.path.isdir(os.path.join(run, "checkpoints")):
        raise cli.UsageError(f"{run!r}: no checkpoints/ folder; train the run first.")
    records = measure(run)
    if records:
        verdict = "meets" if meets_rule(records[-1]) else "does not meet"
        print(f"{run}: the final checkpoint {verdict} the regime rule: {RULE['text']}")


if __name__ == "__main__":
    cli.run_main(main, sys.argv[1:])
