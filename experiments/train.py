"""The experiment runner: train any registered objective on any registered dataset, then report.

Every named entry point (``python -m experiments.cifar10_logitnorm``,
``experiments.cifar10_ce``, ...) is a preset over :func:`main`; the logic lives
in :func:`train_and_evaluate` so that it can be imported (tests, notebooks) and
run on a ConfigDict directly. Command line::

    python -m experiments.train --workdir DIR [--preset paper|cpu|smoke]
        [--data tfds|local|PATH] [--config.objective.name=ce] [--config.x.y=value ...]

``--config.imports=my_module`` imports ``my_module`` first, so an objective,
score or dataset it registers can be named in the same command
(``--config.objective.name=NAME --config.objective.hparams.x=y``).

Re-running with the same ``--workdir`` resumes from the newest checkpoint in
``DIR/checkpoints`` (exactly: same data order and random numbers as an
uninterrupted run). Outputs in ``DIR``: ``config.json``, ``metrics.jsonl``,
``checkpoints/``, ``final.json`` (test accuracy etc.) and, with
``--config.eval.ood=true``, the OOD report under ``DIR/eval``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from experiments import cli, compile_cache, methods
from experiments.data import display_name, load_outliers, load_splits, near_auxiliary_notes
from experiments.evaluation import Provenance, finished_report, ood_report
from experiments.finetune import check_auto_hparams, set_auto_hparams
from experiments.run_config import (
    SCHEMA_FIELDS,
    RunSettings,
    complete_config,
    eval_batch_size,
    import_user_modules,
    model_identity,
    parse,
    resolve,
)
from experiments.steps import Optimizer, make_run_optimizer, make_run_steps, num_train_steps
from experiments.workdir import Workdir
from ood_jax import data as D
from ood_jax import sharding
from ood_jax.data.device import DeviceData, place_split
from ood_jax.models import build_model
from ood_jax.train import create_train_state, get_objective
from ood_jax.train.loop import CheckpointPolicy, Evaluation, TrainData, evaluate, fit


def train_and_evaluate(
    config: RunSettings | ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict:
    """Train (or resume) per ``config`` in ``workdir``, then run the final evaluation.

    ``config``: the command's resolved settings (:func:`parse_args`), or a preset's
    ConfigDict (from Python: resolved here, once). Returns the final evaluation
    summary (also written to ``workdir/final.json``). A second run on the same
    workdir refuses to start (``workdir/.lock``).
    """
    settings = config if isinstance(config, RunSettings) else resolve(parse(config))
    compile_cache.use(settings.config.train.compilation_cache)
    with Workdir(workdir, max_to_keep=settings.config.train.max_to_keep) as run:
        return _train_and_evaluate(settings, run)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a run trains and is tested on, resolved from its config."""

    mesh: Any
    train_ds: D.ImageDataset
    test_ds: D.ImageDataset
    outliers: D.ImageDataset | None
    norm: dict[str, Any]
    steps_per_epoch: int
    num_steps: int
    eval_batch: int


def _train_and_evaluate(settings: RunSettings, run: Workdir) -> dict:
    config = settings.config
    inputs = load_inputs(config)
    num_classes = D.get_dataset_spec(config.data.dataset).num_classes
    identity = settings.model_identity(num_classes or inputs.train_ds.num_classes)
    model_def, state, optimizer = initial_state(config, inputs, identity)
    if config.objective.auto:
        check_auto_hparams(config)

    # Everything so far only read: a rejected run leaves no trace. From here on, one run
    # at a time per workdir, and the checkpoint must be this run's before anything is
    # written.
    run.lock()
    if config.objective.auto:
        margins = set_auto_hparams(
            config,
            model_def,
            state,
            inputs.train_ds,
            inputs.outliers,
            recorded=run.newest_metadata()[1],
            mesh=inputs.mesh,
            batch_size=inputs.eval_batch,
            **inputs.norm,
        )
        settings = settings.with_objective_hparams(margins)
        config = settings.config
    run.check_resume(config, identity)
    run.save_config(config)
    if jax.process_index() == 0:
        print(
            f"training {config.objective.name} on {display_name(inputs.train_ds)} "
            f"({inputs.train_ds.source or 'arrays'}) "
            f"with {config.model.name}, preset {config.preset}: {inputs.num_steps} steps"
            + (", data on the device" if config.data.get("on_device", False) else "")
            + "; "
            f"checkpoints and logs in {os.path.abspath(run.path)}"
        )
    device_data = place_on_device(config, inputs)
    train_step, eval_step = make_run_steps(
        config, model_def, optimizer, inputs.mesh, device_data=device_data
    )
    state = _fit(config, run, inputs, state, train_step, eval_step, identity)
    return _final_evaluation(settings, run, inputs, model_def, state, eval_step)


def load_inputs(config: ml_collections.ConfigDict) -> Inputs:
    """The run's mesh, its training and test splits and its batch geometry (public for
    ``benchmarks/input_pipeline.py``, which times the runner's own training)."""
    spec = D.get_dataset_spec(config.data.dataset)
    mesh = sharding.make_mesh(config.train.num_devices or None)
    train_ds, test_ds = load_splits(config)
    batch_size = config.train.batch_size
    sharding.local_batch_size(batch_size, mesh)  # validates divisibility early
    steps_per_epoch = len(train_ds) // batch_size
    if steps_per_epoch < 1:
        raise cli.UsageError(
            f"config.train.batch_size ({batch_size}) exceeds the {len(train_ds)} training "
            "examples; lower it or raise config.data.train_limit."
        )
    uses_outliers = get_objective(config.objective.name).uses_outliers
    return Inputs(
        mesh=mesh,
        train_ds=train_ds,
        test_ds=test_ds,
        outliers=load_outliers(config) if uses_outliers else None,
        norm={"mean": spec.mean, "std": spec.std},
        steps_per_epoch=steps_per_epoch,
        num_steps=num_train_steps(config, steps_per_epoch),
        eval_batch=eval_batch_size(config, mesh),
    )


def initial_state(config: ml_collections.ConfigDict, inputs: Inputs, identity: dict):
    """``(model_def, state, optimizer)`` at step 0 (``--init_from``'s weights if given:
    a workdir's newest checkpoint, or a PyTorch file)."""
    optimizer: Optimizer = make_run_optimizer(config, inputs.steps_per_epoch)
    model = build_model(identity, config.seed)
    model_def, state = create_train_state(model, optimizer.tx, seed=config.seed)
    source = config.train.init_from
    if source:
        from experiments import torch_import

        if torch_import.is_torch_checkpoint(source):
            params, batch_stats, init_step = torch_import.initial_weights(source, identity)
        elif not os.path.isdir(os.path.join(source, Workdir.CHECKPOINTS)):
            raise cli.UsageError(
                f"--init_from {source!r}: no checkpoints/ folder there; give the workdir of a "
                "training run or a PyTorch checkpoint file."
            )
        else:
            with Workdir(source) as run:
                params, batch_stats, init_step = run.initial_weights(identity)
        state = state.replace(params=params, batch_stats=batch_stats)
        print(f"initialized from {source} (checkpoint step {init_step})")
    return model_def, state, optimizer


def place_on_device(config: ml_collections.ConfigDict, inputs: Inputs) -> DeviceData | None:
    """With ``config.data.on_device``: the train split (and the outliers) placed on the
    mesh once (:func:`ood_jax.data.device.place_split`); else None (the host pipeline).
    A split too large for the devices is a one-line error naming the flag."""
    if not config.data.get("on_device", False):
        return None
    try:
        return DeviceData(
            train=place_split(inputs.train_ds, inputs.mesh, **inputs.norm),
            aux=None
            if inputs.outliers is None
            else place_split(inputs.outliers, inputs.mesh, **inputs.norm),
        )
    except ValueError as err:
        raise cli.UsageError(f"config.data.on_device: {err}") from None


def train_data(config: ml_collections.ConfigDict, inputs: Inputs) -> TrainData:
    """The run's :class:`~ood_jax.train.loop.TrainData`: host batches, or with
    ``config.data.on_device`` the same steps' plans (:class:`ood_jax.data.PlanIterator`)
    for a train step that makes its batches on the device."""
    batch_size = config.train.batch_size
    plans = bool(config.data.get("on_device", False))
    aux_batches = None
    if inputs.outliers is not None:

        def aux_batches(start):
            return D.outlier_iterator(
                inputs.outliers,
                in_batch_size=batch_size,
                ratio=config.data.outliers.ratio,
                seed=config.seed,
                start_step=start,
                augment=config.data.augment,
                plans=plans,
                **inputs.norm,
            )

    def train_batches(start):
        return (D.train_plans if plans else D.train_iterator)(
            inputs.train_ds,
            batch_size=batch_size,
            seed=config.seed,
            start_step=start,
            augment=config.data.augment,
            **inputs.norm,
        )

    return TrainData(train_batches, inputs.steps_per_epoch, batch_size, aux_batches)


def _fit(config, run: Workdir, inputs: Inputs, state, train_step, eval_step, identity):
    """The trained state: :func:`ood_jax.train.loop.fit` with the run's data and policy."""
    state, _ = fit(
        state,
        train_step=train_step,
        mesh=inputs.mesh,
        data=train_data(config, inputs),
        num_steps=inputs.num_steps,
        workdir=run.path,
        checkpoints=CheckpointPolicy(
            run.checkpointer,
            every=config.train.checkpoint_every or inputs.steps_per_epoch,
            model_identity=identity,
            metadata={"config": json.loads(json.dumps(config.to_dict(), default=str))},
        ),
        evaluation=Evaluation(eval_step, lambda: _test_batches(inputs)),
        log_every=config.train.log_every,
        progress=config.train.progress,
        tensorboard=config.train.tensorboard,
        profile_steps=config.train.profile_steps,
    )
    return state


def _test_batches(inputs: Inputs):
    return D.eval_batches(inputs.test_ds, batch_size=inputs.eval_batch, **inputs.norm)


def _final_evaluation(
    settings: RunSettings, run: Workdir, inputs: Inputs, model_def, state, eval_step
) -> dict:
    """Test accuracy (and the OOD report if ``config.eval.ood``), saved as ``final.json``."""
    config = settings.config
    test = evaluate(eval_step, state, _test_batches(inputs), inputs.mesh)
    step = int(sharding.fetch(state.step))
    summary: dict[str, Any] = {
        "step": step,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_logit_norm": test["logit_norm"],
        "test_examples": test["count"],
        "test_source": inputs.test_ds.source,
    }
    report_dir = os.path.abspath(run.file(Workdir.EVAL))
    done = None
    if config.eval.ood and not config.eval.force:
        done = finished_report(report_dir, step=step, config=config)
    if done is not None:
        print(
            f"OOD report of step {step} with these settings is already in {report_dir}; "
            "skipped (--config.eval.force=true redoes it)."
        )
        summary["ood_report"] = report_dir
    elif config.eval.ood:
        params, batch_stats = sharding.fetch((state.params, state.batch_stats))
        model = model_def.merge(params, batch_stats, train=False, key=None)
        report = ood_report(
            settings,
            model,
            train_ds=inputs.train_ds,
            test_ds=inputs.test_ds,
            provenance=Provenance(
                command=shlex.join([sys.executable, *sys.argv]), step=step, workdir=run.path
            ),
            out_dir=report_dir,
            batch_size=inputs.eval_batch,
        )
        summary["ood_report"] = report["report_dir"]
    run.save_final(summary)
    if jax.process_index() == 0:
        print(f"final test accuracy {summary['test_accuracy']:.4f} (step {summary['step']})")
        if "ood_report" in summary:
            print(f"OOD report: {os.path.join(summary['ood_report'], 'results.md')}")
    return summary


def parse_args(
    argv: Sequence[str] | None, *, method: str, description: str
) -> tuple[RunSettings, str]:
    """``(settings, workdir)`` from the command line (preset, ``--data``, overrides),
    resolved once (:func:`experiments.run_config.resolve`); ``method``'s record
    (:mod:`experiments.methods`) gives its presets, fine-tuning rule and own flags."""
    record = methods.get(method)
    parser = argparse.ArgumentParser(
        prog=_prog(method),
        description=description,
        epilog=_overrides_help(method),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and reports go here")
    parser.add_argument(
        "--preset",
        choices=record.presets,
        default=None,
        help="paper (default on accelerators), cpu (default on CPU), smoke",
    )
    parser.add_argument(
        "--data", default=None, help="tfds (paper default), local (offline files) or a folder"
    )
    parser.add_argument(
        "--init_from",
        default=None,
        required=record.fine_tuning == "required",
        help="a workdir whose newest checkpoint initializes the model (fine-tuning)",
    )
    for flag in record.flags:
        parser.add_argument(f"--{flag.name}", default=None, help=flag.help)
    args, overrides = parser.parse_known_args(argv)
    chosen = args.preset is None
    preset = args.preset or ("cpu" if jax.default_backend() == "cpu" else "paper")
    config = record.config(preset, finetune=args.init_from is not None)
    if args.data is not None:
        config.data.source = args.data
    if args.init_from is not None:
        config.train.init_from = args.init_from
    auto = []
    for flag in record.flags:
        value = getattr(args, flag.name)
        if value == "auto":
            auto.append(flag.name)
        elif value is not None:
            overrides.append(f"--config.objective.hparams.{flag.name}={value}")
    config.objective.auto = tuple(auto)
    settings = resolve(parse(config, overrides))
    config = settings.config
    if chosen:
        print(
            f"no --preset given: using '{preset}' for the {jax.default_backend()} backend "
            f"(model {config.model.name}, data source {config.data.source})"
        )
    return settings, args.workdir


def _prog(method: str) -> str:
    """``python -m <the module run>``, as the user typed it (not the file name)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name.startswith("experiments."):
        return f"python -m {spec.name}"
    return f"python -m experiments.cifar10_{method}"  # called from Python (tests, notebooks)


def _description(method: str) -> str:
    """The method's docstring: what it trains, from what, with which flags."""
    return (methods.get(method).doc or __doc__).strip()


def _overrides_help(method: str) -> str:
    """The ``--config.*`` overrides, with this method's objective hyperparameters."""
    config = methods.get_config(method, "smoke")
    defaults = get_objective(config.objective.name).defaults
    hparams = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
    return "\n".join(
        [
            f"presets: {', '.join(methods.presets_of(method))} (paper: the published recipe; "
            "cpu: a short CPU run; smoke: a few steps, to try the command).",
            "",
            "config overrides (--config.<field>=<value>, typed as the preset's field; "
            "fields and defaults in experiments/configs/default.py):",
            "  --config.optim.lr=0.05 --config.train.epochs=10 --config.train.batch_size=64",
            "  --config.eval.ood_sets=svhn,gaussian,npz:/data/own.npz,folder:/data/own_set",
            "  --config.eval.ood=false        (test accuracy only, no OOD report)",
            "  --config.eval.force=true       (redo the OOD report of a finished run)",
            "  --config.model.name=resnet9 --config.model.options.spectral_norm=true",
            f"  --config.objective.hparams.<name>=<value>  ({config.objective.name}: {hparams})",
            "  --config.imports=my_module     (register your own objective/score/dataset)",
        ]
    )


def main(argv: Sequence[str] | None = None, *, method: str = "logitnorm") -> dict:
    """Command-line entry point shared by the training experiments."""

    def run(argv):
        settings, workdir = parse_args(argv, method=method, description=_description(method))
        return train_and_evaluate(settings, workdir)

    return cli.run_main(run, argv)


__all__ = [
    "SCHEMA_FIELDS",
    "complete_config",
    "eval_batch_size",
    "import_user_modules",
    "load_splits",
    "main",
    "model_identity",
    "parse",
    "resolve",
    "near_auxiliary_notes",
    "ood_report",
    "train_and_evaluate",
]


if __name__ == "__main__":
    main(sys.argv[1:])
