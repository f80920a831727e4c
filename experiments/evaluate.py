"""Evaluate a training workdir's checkpoint: ``python -m experiments.evaluate --workdir DIR``.

(``--pretrained NAME`` evaluates a published checkpoint instead, see ``ood_jax.pretrained``;
``--torch_checkpoint FILE --arch NAME`` a PyTorch file, see :func:`evaluate_torch`.)

Restores the newest checkpoint of ``DIR/checkpoints`` (or ``--step N``) with
the model and configuration recorded in its metadata, and writes the OOD report
(``results.json``, ``results.md``, ``plots/``) to ``DIR/eval``
(``DIR/eval_step<N>`` for an explicit ``--step``; ``--out_dir`` to choose). It
runs the very function the training run calls at its end
(``experiments.evaluation.ood_report``) with the run's config, so the same
checkpoint gives the same numbers; ``--eval_preset NAME`` replaces the run's
``eval`` settings with an evaluation preset's (``experiments.configs.eval_presets``:
``paper``, ``cpu``, ``smoke``), and flags change the ``eval`` fields::

    python -m experiments.evaluate --workdir /tmp/ln [--data_dir ../shared/data] \\
        [--step 1560] [--ood_sets tinyimagenet_crop,textures_partial,gaussian] \\
        [--scores msp,energy,odin] [--protocols papers,full] [--convention openood] \\
        [--temperatures 1,1000] [--max_train 10000] [--tune react,knn] [--eval_preset cpu] \\
        [--config.eval.score_hparams.odin.max_examples=500 --config.eval.num_draws=5]
    python -m experiments.evaluate --torch_checkpoint cifar10_wrn_pretrained_epoch_99.pt \\
        --arch wrn40_2 [--normalization cifar10] [--dataset cifar10] [--eval_preset paper] [...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from experiments import cli, methods
from experiments.configs import eval_presets
from experiments.evaluate_torch import TORCH_FLAGS, evaluate_torch_args
from experiments.evaluation import Provenance, report_config, report_from_settings
from experiments.run_config import resolve
from experiments.workdir import Workdir
from ood_jax import pretrained
from ood_jax.data.decode import RESIZE_RULES
from ood_jax.evaluate.datasets import is_own_files, with_resize
from ood_jax.scores import available_scores, get_score


def restore_model(workdir: str, *, step: int | None = None) -> tuple[Any, dict, int]:
    """``(model in eval mode, checkpoint metadata, step)`` from ``workdir/checkpoints``.

    See :meth:`experiments.workdir.Workdir.restore`.
    """
    with Workdir(workdir) as run:
        model_def, params, batch_stats, metadata, step = run.restore(step=step)
    return model_def.merge(params, batch_stats, train=False, key=None), metadata, step


def saved_config(saved: dict) -> ml_collections.ConfigDict:
    """A run's saved config on top of today's defaults for its method and preset.

    A workdir written by an older version lacks newer fields (e.g. the
    adversarial-noise set); they take today's defaults, the saved values win.
    """
    method = saved.get("method") or "logitnorm"
    preset = saved.get("preset", "paper")
    try:
        base = methods.get_config(method, preset).to_dict()
    except ValueError:
        base = {}

    def merge(into: dict, values: dict) -> dict:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value
        return into

    return cli.config_from_json(merge(base, json.loads(json.dumps(saved))))


def evaluate_workdir(
    workdir: str | None,
    *,
    published: str | None = None,
    step: int | None = None,
    eval_preset: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    overrides: Sequence[str] = (),
    batch_size: int | None = None,
    out_dir: str | None = None,
    command: str = "",
) -> dict:
    """Restores the checkpoint and evaluates it; returns the ``results.json`` dict.

    The run's own config (from the checkpoint) decides the sets, scores, budgets and
    seeds, exactly as at the end of training; ``eval_preset`` (a name of
    ``experiments.configs.eval_presets.EVAL_PRESETS``) replaces them with that
    evaluation preset's (the run's data and model stay), ``overrides``
    (``--config.eval.x=y``) change them, ``data`` replaces the run's data source and
    ``data_dir`` the offline data folder. ``published`` (a name of
    ``ood_jax.pretrained.available()``) evaluates a published checkpoint instead of a
    workdir (report in ``runs/pretrained/<name>/eval`` unless ``out_dir``).
    """
    if data_dir is not None and not os.path.isdir(data_dir):
        raise cli.UsageError(f"--data_dir {data_dir!r} is not a folder.")
    if published is not None:
        entry = pretrained.info(published, require=("step", "config"))
        model, metadata, step = pretrained.load(published), entry, entry["step"]
        default_dir = os.path.join("runs", "pretrained", *published.split("/"), "eval")
        provenance = Provenance(
            command=command,
            step=step,
            published={"published": published, "sha256": entry["sha256"], "step": step},
        )
    else:
        default_dir = os.path.join(workdir, Workdir.EVAL if step is None else f"eval_step{step}")
        model, metadata, step = restore_model(workdir, step=step)
        provenance = Provenance(command=command, step=step, workdir=workdir)
    config = saved_config(metadata["config"])
    if eval_preset is not None:
        config.eval = eval_presets.section(eval_preset)
    config = report_config(config, data=data, overrides=overrides)
    settings = resolve(config)
    return report_from_settings(
        settings,
        model,
        provenance,
        out_dir=default_dir if out_dir is None else out_dir,
        batch_size=batch_size,
        data_dir=data_dir,
    )


def _names(text: str) -> str:
    return ",".join(t for t in (s.strip() for s in text.split(",")) if t)


# Shorthand flags -> the config.eval field they set.
_SHORTHANDS = {
    "ood_sets": "eval.ood_sets",
    "scores": "eval.scores",
    "protocols": "eval.protocols",
    "convention": "eval.convention",
    "num_draws": "eval.num_draws",
    "num_synthetic": "eval.num_synthetic",
    "max_train": "eval.max_train",
    "max_ood": "eval.max_ood",
    "tune": "eval.tune",
    "tune_ood": "eval.tune_ood",
    "imports": "imports",
}


# Count flags and their least value (0 = all, for the budgets).
_COUNTS = {
    "batch_size": 1,
    "num_draws": 1,
    "num_synthetic": 1,
    "max_train": 0,
    "max_ood": 0,
    "step": 0,
}


def _temperatures(text: str) -> list[float]:
    """``--temperatures 1,10``: positive, finite numbers (the logits are divided by each)."""
    try:
        values = [float(t) for t in _names(text).split(",") if t]
    except ValueError:
        raise cli.UsageError(
            f"--temperatures {text!r}: give numbers, e.g. --temperatures 1,10,1000."
        ) from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise cli.UsageError(
            f"--temperatures {text!r}: each must be a positive number (MSP and energy divide "
            "the logits by it), e.g. --temperatures 1,10,1000."
        )
    return values


def _apply_ood_resize(args: argparse.Namespace) -> None:
    """``--ood_resize RULE``: written into the names of your own sets in ``--ood_sets``
    and ``--tune_ood`` as ``NAME@RULE`` (a rule already in a name wins), so the run's
    config and report record it (``ood_jax.evaluate.datasets``)."""
    rule = args.ood_resize
    if rule is None:
        return
    if rule not in RESIZE_RULES:
        raise cli.UsageError(
            f"--ood_resize {rule!r}: unknown rule; the rules: {', '.join(RESIZE_RULES)} "
            "(docs/data.md)."
        )
    named = [n for n in (args.ood_sets, args.tune_ood) if n is not None and _names(n)]
    own = [n for text in named for n in _names(text).split(",") if is_own_files(n)]
    if not own:
        raise cli.UsageError(
            f"--ood_resize {rule}: it applies to your own sets (npz:FILE, folder:DIR or a "
            "path) named by --ood_sets or --tune_ood, and they name none; registered and "
            "synthetic sets have their own conversion."
        )
    if args.ood_sets is not None:
        args.ood_sets = ",".join(with_resize(n, rule) for n in _names(args.ood_sets).split(","))
    if args.tune_ood is not None and _names(args.tune_ood):
        args.tune_ood = with_resize(_names(args.tune_ood), rule)


def _check_flags(args: argparse.Namespace) -> None:
    """Values known to be wrong at once, before the checkpoint and the data are read;
    a value that means something other than it may look is said in one line."""
    for flag in ("ood_sets", "scores", "protocols", "tune"):
        value = getattr(args, flag)
        if value is not None and not _names(value):
            raise cli.UsageError(
                f"--{flag} {value!r} names nothing; leave the flag out to use the run's own "
                f"{flag.replace('_', ' ')}."
            )
    for flag, least in _COUNTS.items():
        value = getattr(args, flag)
        if value is not None and value < least:
            raise cli.UsageError(f"--{flag} must be >= {least}, got {value}.")
    for flag, meaning in (
        ("max_train", "fitting the scores on every training image"),
        ("max_ood", "every image of each OOD set"),
    ):
        if getattr(args, flag) == 0:
            print(f"--{flag} 0: no budget, {meaning}.")
    if args.out_dir is not None and os.path.isfile(args.out_dir):
        raise cli.UsageError(f"--out_dir {args.out_dir!r} is a file; give a folder.")


def _check_eval_preset(args: argparse.Namespace) -> None:
    """``--eval_preset`` names an evaluation preset, before anything is read."""
    known = "|".join(eval_presets.EVAL_PRESETS)
    if args.preset is not None:
        raise cli.UsageError(
            f"--preset {args.preset!r}: an evaluation's settings are chosen with "
            f"--eval_preset {known} (--preset is the training commands' flag)."
        )
    if args.eval_preset is not None and args.eval_preset not in eval_presets.EVAL_PRESETS:
        raise cli.UsageError(
            f"--eval_preset {args.eval_preset!r}: unknown evaluation preset; known: {known}."
        )


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point (see the module docstring)."""
    return cli.run_main(_main, argv)


def _parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = p.add_argument_group("what to evaluate (exactly one)")
    source.add_argument("--workdir", help="a training run's workdir")
    source.add_argument(
        "--pretrained",
        help="a published checkpoint (ood_jax.pretrained.available()), e.g. "
        "cifar10_jpeg/resnet9/logitnorm/seed0",
    )
    source.add_argument(
        "--torch_checkpoint",
        help="a PyTorch file (.pt, .pth, .ckpt, .safetensors; read without running code)",
    )
    torch_flags = p.add_argument_group("PyTorch checkpoints (with --torch_checkpoint)")
    torch_flags.add_argument("--arch", help="its architecture (ood_jax.interop.ARCH_NAMES)")
    torch_flags.add_argument(
        "--normalization",
        help="cifar10|openood_cifar10|kuangliu_cifar10|imagenet|MEAN,STD "
        "(default: the architecture's authors')",
    )
    torch_flags.add_argument(
        "--num_classes", type=int, help="classes of its head (default: from the file)"
    )
    torch_flags.add_argument("--dataset", help="in-distribution dataset (default: cifar10)")
    p.add_argument(
        "--eval_preset",
        help=f"the evaluation settings' preset, {'|'.join(eval_presets.EVAL_PRESETS)} "
        "(default: the run's own; for --torch_checkpoint: cpu on CPU, paper otherwise)",
    )
    p.add_argument("--preset", help=argparse.SUPPRESS)  # a training flag: said in one line
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--data", default=None, help="replace the run's data source (tfds|local|DIR)")
    p.add_argument("--data_dir", default=None, help="folder of the offline npz files")
    p.add_argument(
        "--ood_sets",
        default=None,
        help="comma-separated names, npz:FILE, folder:DIR, tfds:NAME or paths (default: the run's)",
    )
    p.add_argument(
        "--ood_resize",
        default=None,
        help="how your own sets' images that are not 32x32 are made 32x32: "
        f"{'|'.join(RESIZE_RULES[1:])} (default shorter_side_crop) or none (refuse them)",
    )
    p.add_argument("--scores", default=None, help="comma-separated (default: every registered)")
    p.add_argument("--protocols", default=None, help="papers,full")
    p.add_argument("--convention", default=None, choices=("hendrycks", "openood"))
    p.add_argument("--temperatures", default=None, help="MSP/energy sweep, e.g. 1,10,1000")
    p.add_argument("--num_draws", type=int, default=None)
    p.add_argument("--num_synthetic", type=int, default=None, help="images per synthetic set")
    p.add_argument("--max_train", type=int, default=None, help="fit scores on N train images")
    p.add_argument("--max_ood", type=int, default=None, help="subsample each OOD set to N")
    p.add_argument(
        "--tune",
        default=None,
        help="scores whose hyperparameters are chosen on the validation pair, or all",
    )
    p.add_argument("--tune_ood", default=None, help="the OOD validation set (never a test set)")
    p.add_argument("--imports", default=None, help="modules registering scores/datasets")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--out_dir", default=None)
    return p


def _main(argv: Sequence[str] | None) -> dict:
    p = _parser()
    args, extra = p.parse_known_args(argv)
    sources = [f"--{f}" for f in _SOURCES if getattr(args, f) is not None]
    if len(sources) != 1:  # checked here, not by argparse, for a one-line error
        raise cli.UsageError(
            f"give exactly one of --workdir, --pretrained, --torch_checkpoint; got "
            f"{' and '.join(sources) or 'none'}."
        )
    _check_eval_preset(args)
    command = shlex.join(["python", "-m", "experiments.evaluate", *(argv or sys.argv[1:])])
    _apply_ood_resize(args)
    overrides = []
    for flag, field in _SHORTHANDS.items():
        value = getattr(args, flag)
        if value is not None:
            text = _names(value) if isinstance(value, str) else value
            overrides.append(f"--config.{field}={text}")
    _check_flags(args)
    if args.temperatures is not None:
        # One value sets the field; several make the vmapped sweep.
        temps = ",".join(repr(t) for t in _temperatures(args.temperatures))
        for name in available_scores():
            if get_score(name).sweep == "temperature":
                overrides.append(f"--config.eval.score_hparams.{name}.temperature={temps}")
    if args.pretrained is not None and args.step is not None:
        raise cli.UsageError("--step applies to a --workdir; a published checkpoint has one step.")
    if args.torch_checkpoint is not None:
        results = evaluate_torch_args(args, [*overrides, *extra], command)
        print(f"wrote {os.path.join(results['report_dir'], 'results.md')}")
        return results
    given = [f"--{f}" for f in TORCH_FLAGS if getattr(args, f) is not None]
    if given:
        raise cli.UsageError(f"{', '.join(given)}: only with --torch_checkpoint FILE.")
    results = evaluate_workdir(
        args.workdir,
        published=args.pretrained,
        step=args.step,
        eval_preset=args.eval_preset,
        data=args.data,
        data_dir=args.data_dir,
        overrides=[*overrides, *extra],
        batch_size=args.batch_size,
        out_dir=args.out_dir,
        command=command,
    )
    print(f"wrote {os.path.join(results['report_dir'], 'results.md')}")
    return results


_SOURCES = ("workdir", "pretrained", "torch_checkpoint")
if __name__ == "__main__":
    main()
