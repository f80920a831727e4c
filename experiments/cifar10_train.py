"""Train a CIFAR-10 classifier from a config, then evaluate it (shared by the entry points).

``python -m experiments.cifar10_logitnorm`` and ``python -m experiments.cifar10_ce`` are
thin wrappers around :func:`main`; the logic lives in :func:`train_and_evaluate` so
that it can be imported (tests, notebooks) and run on a ConfigDict directly.

Command line::

    python -m experiments.cifar10_logitnorm --workdir DIR [--preset paper|cpu|smoke]
        [--data tfds|local|PATH] [--config.optim.lr=0.05 --config.train.epochs=10 ...]

Re-running with the same ``--workdir`` resumes from the newest checkpoint in
``DIR/checkpoints`` (exactly: same data order and random numbers as an
uninterrupted run). Outputs in ``DIR``: ``config.json``, ``metrics.jsonl``,
``checkpoints/``, ``final.json`` (test accuracy etc.) and, with
``--config.eval.ood=true``, the OOD report under ``DIR/eval``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from experiments.configs import cifar10 as presets
from ood_jax import data as D
from ood_jax import sharding
from ood_jax.checkpoint import Checkpointer
from ood_jax.models import create_model
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


def load_splits(config: ml_collections.ConfigDict) -> tuple[D.ImageDataset, D.ImageDataset]:
    """The train and test splits named by ``config.data`` (source, limits).

    A limit keeps a seeded random subset (the offline files are sorted by class, so
    the first N examples would all be one class).
    """
    source = config.data.source
    out = []
    for split, limit in (("train", config.data.train_limit), ("test", config.data.test_limit)):
        if source == "tfds":
            ds = D.load_dataset(config.data.dataset, split)
        elif source == "local":
            ds = D.load_dataset(f"{config.data.dataset}_jpeg", split)
        else:
            path = Path(source)
            if not path.exists():
                raise ValueError(
                    f"config.data.source must be 'tfds', 'local' or an existing path, got "
                    f"{source!r} (no such file or folder)."
                )
            npz = path / f"{config.data.dataset}_{split}.npz"
            if npz.is_file():
                ds = D.from_npz(npz, name=config.data.dataset)
            else:
                ds = D.load_dataset(config.data.dataset, split, local_path=path)
        out.append(D.random_subset(ds, limit, seed=config.seed))
    return out[0], out[1]


def model_identity(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """What must match between a checkpoint and the model restoring it."""
    options = dict(config.model.options.to_dict())
    options.update(get_objective(config.objective.name).model_options)
    if config.model.mixed_precision:
        options["dtype"] = "bfloat16"
    return {"name": config.model.name, "num_classes": num_classes, "options": options}


def build_model(identity: dict[str, Any], seed: int) -> nnx.Module:
    """The model described by ``identity`` (see :func:`model_identity`)."""
    options = dict(identity["options"])
    if options.get("dtype") == "bfloat16":
        options["dtype"] = jnp.bfloat16
    return create_model(
        identity["name"], num_classes=identity["num_classes"], rngs=nnx.Rngs(seed), **options
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train (or resume) per ``config`` in ``workdir``, then run the final evaluation.

    Returns the final evaluation summary (also written to ``workdir/final.json``).
    """
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)

    mesh = sharding.make_mesh(config.train.num_devices or None)
    train_ds, test_ds = load_splits(config)
    batch_size = config.train.batch_size
    sharding.local_batch_size(batch_size, mesh)  # validates divisibility early
    steps_per_epoch = len(train_ds) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"config.train.batch_size ({batch_size}) exceeds the {len(train_ds)} training "
            "examples; lower it or raise config.data.train_limit."
        )
    num_steps = config.train.num_steps or int(round(config.train.epochs * steps_per_epoch))

    identity = model_identity(config, train_ds.num_classes)
    model = build_model(identity, config.seed)
    loss_fn = bind_objective(config.objective.name, **config.objective.hparams.to_dict())
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
    train_step = compile_train_step(
        make_train_step(model_def, tx, loss_fn, learning_rate=schedule), mesh
    )
    eval_step = compile_eval_step(make_eval_step(model_def), mesh)
    eval_batch = config.data.eval_batch_size
    eval_batch -= eval_batch % mesh.devices.size  # the batch must split over the devices

    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.train.max_to_keep
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
        ),
        num_steps=num_steps,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        workdir=workdir,
        checkpointer=checkpointer,
        checkpoint_every=config.train.checkpoint_every or steps_per_epoch,
        model_identity=identity,
        metadata={"config": json.loads(json.dumps(config.to_dict(), default=str))},
        eval_step=eval_step,
        eval_data=lambda: D.eval_batches(test_ds, batch_size=eval_batch),
        log_every=config.train.log_every,
        progress=config.train.progress,
    )
    checkpointer.close()
    return run_final_evaluation(
        config,
        model_def=model_def,
        state=state,
        eval_step=eval_step,
        mesh=mesh,
        train_ds=train_ds,
        test_ds=test_ds,
        workdir=workdir,
        eval_batch_size=eval_batch,
    )


def run_final_evaluation(
    config: ml_collections.ConfigDict,
    *,
    model_def,
    state,
    eval_step,
    mesh,
    train_ds: D.ImageDataset,
    test_ds: D.ImageDataset,
    workdir: str,
    eval_batch_size: int,
) -> dict:
    """The end-of-training evaluation: test accuracy, and the OOD report if enabled.

    Hook for ``ood_jax.evaluate``: with ``config.eval.ood`` the trained model is
    handed to the evaluation package, which writes its report under
    ``workdir/eval``. Writes ``workdir/final.json`` and returns its contents.
    """
    test = evaluate(eval_step, state, D.eval_batches(test_ds, batch_size=eval_batch_size), mesh)
    summary: dict[str, Any] = {
        "step": int(sharding.fetch(state.step)),
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_logit_norm": test["logit_norm"],
        "test_examples": test["count"],
        "test_source": test_ds.source,
    }
    if config.eval.ood:
        summary["ood_report"] = _ood_evaluation(
            config, model_def, state, train_ds, test_ds, workdir
        )
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "final.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"final test accuracy {summary['test_accuracy']:.4f} (step {summary['step']})")
    return summary


def _ood_evaluation(config, model_def, state, train_ds, test_ds, workdir) -> str:
    from ood_jax.evaluate import ScoreSettings, run_evaluation
    from ood_jax.evaluate.datasets import load_ood_sets

    params, batch_stats = sharding.fetch((state.params, state.batch_stats))
    model = model_def.merge(params, batch_stats, train=False, key=None)
    # Names as `python -m experiments.evaluate --ood_sets`: offline files, tfds or synthetic.
    ood_sets = load_ood_sets(list(config.eval.ood_sets), seed=config.seed, id_test=test_ds)
    out_dir = os.path.join(workdir, "eval")
    step = int(sharding.fetch(state.step))
    run_evaluation(
        model,
        id_test=test_ds,
        ood_sets=ood_sets,
        train=train_ds,
        max_train=config.eval.max_train or None,
        max_ood=config.eval.get("max_ood", 0) or None,
        settings=ScoreSettings(
            odin_max_examples=config.eval.get("odin_max_examples", 0) or None,
            knn_max_train=config.eval.get("knn_max_train", 0) or None,
            seed=config.seed,
        ),
        seed=config.seed,
        out_dir=out_dir,
        metrics_log_dir=workdir,
        metadata={
            "command": " ".join(sys.argv),
            "checkpoint": {"workdir": os.path.abspath(workdir), "step": step},
            "model": {"name": config.model.name, "options": config.model.options.to_dict()},
            "config": config.to_dict(),
        },
    )
    return out_dir


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply ``--config.a.b=value`` overrides; values are parsed as Python literals
    when possible (``0.05``, ``true``, ``(40, 50)``), else kept as strings."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(
                f"unrecognized argument {item!r}; overrides look like --config.optim.lr=0.05."
            )
        key, raw = item[len("--config.") :].split("=", 1)
        parent = config
        *path, leaf = key.split(".")
        for name in path:
            if name not in parent:
                raise ValueError(f"--config.{key}: no field {name!r} in the config.")
            parent = parent[name]
        lowered = raw.lower()
        if lowered in ("true", "false"):
            value: Any = lowered == "true"
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        if leaf in parent and isinstance(parent[leaf], float) and isinstance(value, int):
            value = float(value)
        if leaf not in parent and not isinstance(parent, ml_collections.ConfigDict):
            raise ValueError(f"--config.{key}: no field {leaf!r} in the config.")
        if leaf not in parent and key.split(".")[-2:-1] not in (["options"], ["hparams"]):
            raise ValueError(f"--config.{key}: no field {leaf!r} in the config.")
        with parent.unlocked():
            parent[leaf] = value


def main(argv: Sequence[str] | None, *, objective: str) -> dict:
    """Command-line entry point shared by the CIFAR-10 experiments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and reports go here")
    parser.add_argument(
        "--preset",
        choices=presets.PRESETS,
        default=None,
        help="paper (default on accelerators), cpu (default on CPU), smoke",
    )
    parser.add_argument(
        "--data", default=None, help="tfds (default), local (../shared/data npz) or a path"
    )
    args, overrides = parser.parse_known_args(argv)
    preset = args.preset or ("cpu" if jax.default_backend() == "cpu" else "paper")
    config = presets.get_config(preset, objective)
    if args.data is not None:
        config.data.source = args.data
    apply_overrides(config, overrides)
    return train_and_evaluate(config, args.workdir)


if __name__ == "__main__":
    main(sys.argv[1:], objective="logitnorm")
