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
import contextlib
import json
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from experiments import cli
from experiments.checkpoints import (
    build_model,
    check_resume,
    eval_batch_size,
    initial_weights,
    model_identity,
    restore_workdir,
    set_auto_hparams,
    workdir_lock,
)
from experiments.configs import methods
from experiments.data import display_name, load_outliers, load_splits, near_auxiliary_notes
from experiments.evaluation import Provenance, ood_report
from experiments.run_config import (
    SCHEMA_FIELDS,
    complete_config,
    import_user_modules,
    validate_config,
)
from ood_jax import data as D
from ood_jax import sharding
from ood_jax.checkpoint import Checkpointer
from ood_jax.train import (
    bind_objective,
    compile_eval_step,
    compile_train_step,
    create_train_state,
    get_objective,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
)
from ood_jax.train.loop import evaluate, fit


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train (or resume) per ``config`` in ``workdir``, then run the final evaluation.

    Returns the final evaluation summary (also written to ``workdir/final.json``).
    A second run on the same workdir refuses to start (``workdir/.lock``).
    """
    workdir = os.fspath(workdir)
    with contextlib.ExitStack() as stack:
        return _train_and_evaluate(config, workdir, stack)


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, stack: contextlib.ExitStack
) -> dict:
    config = ml_collections.ConfigDict(config.to_dict())
    complete_config(config)
    validate_config(config)
    spec = D.get_dataset_spec(config.data.dataset)
    objective = get_objective(config.objective.name)
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
    num_steps = config.train.num_steps or int(round(config.train.epochs * steps_per_epoch))
    outliers = load_outliers(config) if objective.uses_outliers else None
    norm = {"mean": spec.mean, "std": spec.std}

    identity = model_identity(config, spec.num_classes or train_ds.num_classes)
    model = build_model(identity, config.seed)
    o = config.optim
    schedule = make_schedule(
        o.schedule,
        base_lr=o.lr,
        total_steps=num_steps,
        steps_per_epoch=steps_per_epoch,
        boundaries_epochs=tuple(o.boundaries_epochs),
        decay_factor=o.decay_factor,
        final_lr=o.final_lr,
        warmup_steps=int(o.warmup_epochs * steps_per_epoch),
        peak_fraction=o.peak_fraction,
    )
    tx = make_optimizer(
        schedule, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
    )
    model_def, state = create_train_state(model, tx, seed=config.seed)
    if config.train.init_from:
        params, batch_stats, init_step = initial_weights(config.train.init_from, identity)
        state = state.replace(params=params, batch_stats=batch_stats)
        print(f"initialized from {config.train.init_from} (checkpoint step {init_step})")
    if config.objective.auto:
        set_auto_hparams(
            config, model_def, state, train_ds, outliers, workdir=workdir, mesh=mesh, **norm
        )
    loss_fn = bind_objective(config.objective.name, **config.objective.hparams.to_dict())
    train_step = compile_train_step(
        make_train_step(model_def, tx, loss_fn, learning_rate=schedule), mesh
    )
    eval_step = compile_eval_step(make_eval_step(model_def), mesh)
    eval_batch = eval_batch_size(config, mesh)

    # Everything so far only read: a rejected run leaves no trace. From here on, one run
    # at a time per workdir, and the checkpoint must be this run's before anything is
    # written.
    stack.enter_context(workdir_lock(workdir))
    check_resume(config, workdir, identity)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)
        print(
            f"training {config.objective.name} on {display_name(train_ds)} "
            f"({train_ds.source or 'arrays'}) "
            f"with {config.model.name}, preset {config.preset}: {num_steps} steps; checkpoints "
            f"and logs in {os.path.abspath(workdir)}"
        )

    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.train.max_to_keep
    )
    aux_data = None
    if outliers is not None:

        def aux_data(start):
            return D.outlier_iterator(
                outliers,
                in_batch_size=batch_size,
                ratio=config.data.outliers.ratio,
                seed=config.seed,
                start_step=start,
                augment=config.data.augment,
                **norm,
            )

    state, _ = fit(
        state,
        train_step=train_step,
        mesh=mesh,
        train_data=lambda start: D.train_iterator(
            train_ds,
            batch_size=batch_size,
            seed=config.seed,
            start_step=start,
            augment=config.data.augment,
            **norm,
        ),
        aux_data=aux_data,
        num_steps=num_steps,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        workdir=workdir,
        checkpointer=checkpointer,
        checkpoint_every=config.train.checkpoint_every or steps_per_epoch,
        model_identity=identity,
        metadata={"config": json.loads(json.dumps(config.to_dict(), default=str))},
        eval_step=eval_step,
        eval_data=lambda: D.eval_batches(test_ds, batch_size=eval_batch, **norm),
        log_every=config.train.log_every,
        progress=config.train.progress,
    )
    checkpointer.close()
    test = evaluate(eval_step, state, D.eval_batches(test_ds, batch_size=eval_batch, **norm), mesh)
    step = int(sharding.fetch(state.step))
    summary: dict[str, Any] = {
        "step": step,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_logit_norm": test["logit_norm"],
        "test_examples": test["count"],
        "test_source": test_ds.source,
    }
    if config.eval.ood:
        params, batch_stats = sharding.fetch((state.params, state.batch_stats))
        model = model_def.merge(params, batch_stats, train=False, key=None)
        report = ood_report(
            config,
            model,
            train_ds=train_ds,
            test_ds=test_ds,
            provenance=Provenance(
                command=shlex.join([sys.executable, *sys.argv]), step=step, workdir=workdir
            ),
            out_dir=os.path.join(workdir, "eval"),
            batch_size=eval_batch,
        )
        summary["ood_report"] = report["report_dir"]
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "final.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"final test accuracy {summary['test_accuracy']:.4f} (step {summary['step']})")
        if "ood_report" in summary:
            print(f"OOD report: {os.path.join(summary['ood_report'], 'results.md')}")
    return summary


def parse_args(
    argv: Sequence[str] | None, *, method: str, description: str
) -> tuple[ml_collections.ConfigDict, str]:
    """``(config, workdir)`` from the command line (preset, ``--data``, overrides)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and reports go here")
    parser.add_argument(
        "--preset",
        choices=methods.presets_of(method),
        default=None,
        help="paper (default on accelerators), cpu (default on CPU), smoke",
    )
    parser.add_argument(
        "--data", default=None, help="tfds (paper default), local (offline files) or a folder"
    )
    parser.add_argument(
        "--init_from",
        default=None,
        required=method == "energy_ft",
        help="a workdir whose newest checkpoint initializes the model (fine-tuning)",
    )
    if method == "energy_ft":
        for margin in ("m_in", "m_out"):
            parser.add_argument(
                f"--{margin}",
                default=None,
                help="a number, or auto: the initial model's mean energy on "
                + ("in-distribution" if margin == "m_in" else "auxiliary outlier")
                + " training data",
            )
    args, overrides = parser.parse_known_args(argv)
    chosen = args.preset is None
    preset = args.preset or ("cpu" if jax.default_backend() == "cpu" else "paper")
    config = methods.get_config(method, preset, finetune=args.init_from is not None)
    if args.data is not None:
        config.data.source = args.data
    if args.init_from is not None:
        config.train.init_from = args.init_from
    auto = []
    for margin in ("m_in", "m_out") if method == "energy_ft" else ():
        value = getattr(args, margin)
        if value == "auto":
            auto.append(margin)
        elif value is not None:
            overrides.append(f"--config.objective.hparams.{margin}={value}")
    config.objective.auto = tuple(auto)
    config = cli.apply_overrides(config, overrides, first=SCHEMA_FIELDS, prepare=complete_config)
    if chosen:
        print(
            f"no --preset given: using '{preset}' for the {jax.default_backend()} backend "
            f"(model {config.model.name}, data source {config.data.source})"
        )
    return config, args.workdir


def main(argv: Sequence[str] | None = None, *, method: str = "logitnorm") -> dict:
    """Command-line entry point shared by the training experiments."""

    def run(argv):
        config, workdir = parse_args(argv, method=method, description=__doc__.split("\n")[0])
        return train_and_evaluate(config, workdir)

    return cli.run_main(run, argv)


__all__ = [
    "SCHEMA_FIELDS",
    "build_model",
    "complete_config",
    "eval_batch_size",
    "import_user_modules",
    "load_splits",
    "main",
    "model_identity",
    "near_auxiliary_notes",
    "ood_report",
    "restore_workdir",
    "train_and_evaluate",
]


if __name__ == "__main__":
    main(sys.argv[1:])
