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
import importlib
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import cli
from experiments.configs import methods
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

# Auxiliary outlier set -> OOD test sets that share its classes.
NEAR_AUXILIARY = {"tinyimagenet_train": ("tinyimagenet_crop", "tinyimagenet_resize")}
# Overrides applied before the rest: they decide which other fields exist.
SCHEMA_FIELDS = ("imports", "objective.name", "data.dataset")


def import_user_modules(config: ml_collections.ConfigDict) -> None:
    """Imports ``config.imports`` (user modules that register objectives/scores/datasets)."""
    for name in config.get("imports", ()) or ():
        if not name:
            continue
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise cli.UsageError(
                f"config.imports: cannot import {name!r} ({err}); put its folder on PYTHONPATH."
            ) from None


def complete_config(config: ml_collections.ConfigDict) -> None:
    """Fills the fields implied by the registries, in place.

    - ``objective.hparams``: the objective's registered defaults, updated by the
      in-distribution dataset spec's values for that objective, updated by what the
      config already holds (the user's overrides);
    - ``eval.score_hparams``: every registered score's defaults, updated likewise.
    """
    import_user_modules(config)
    objective = get_objective(config.objective.name)
    spec = D.get_dataset_spec(config.data.dataset)
    given = config.objective.hparams.to_dict()
    unknown = sorted(set(given) - set(objective.defaults))
    if unknown:
        raise cli.UsageError(
            f"objective {objective.name!r} takes hyperparameters "
            f"{sorted(objective.defaults) or 'none'}, got unknown {unknown}."
        )
    # Hyperparameters named mean/std are the in-distribution normalization (ACET/CEDA
    # make their noise in pixel space).
    norm = {k: v for k, v in (("mean", spec.mean), ("std", spec.std)) if k in objective.defaults}
    hparams = {
        **objective.defaults,
        **norm,
        **spec.objective_hparams.get(objective.name, {}),
        **given,
    }
    with config.unlocked():
        config.objective.hparams = ml_collections.ConfigDict(hparams)
        config.eval.score_hparams = _score_hparams(config.eval.score_hparams.to_dict())


def _score_hparams(given: dict) -> ml_collections.ConfigDict:
    from ood_jax.scores import available_scores, get_score

    out = ml_collections.ConfigDict()
    for name in available_scores():
        values = {**get_score(name).defaults, **given.pop(name, {})}
        node = ml_collections.ConfigDict()
        for key, value in values.items():
            if value is None:  # an unset budget: typed placeholder so it can be overridden
                value = ml_collections.config_dict.placeholder(int)
            elif isinstance(value, list):
                value = tuple(value)
            node[key] = value
        out[name] = node
    if given:
        raise cli.UsageError(
            f"config.eval.score_hparams: unknown scores {sorted(given)}; registered: "
            f"{', '.join(available_scores())}."
        )
    return out


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks values that would fail late or silently, before any data is loaded."""
    t, d = config.train, config.data
    checks = [
        (t.batch_size >= 1, f"config.train.batch_size must be >= 1, got {t.batch_size}"),
        (t.epochs > 0 or t.num_steps > 0, f"config.train.epochs must be > 0, got {t.epochs}"),
        (t.num_steps >= 0, f"config.train.num_steps must be >= 0, got {t.num_steps}"),
        (d.train_limit >= 0, f"config.data.train_limit must be >= 0, got {d.train_limit}"),
        (d.test_limit >= 0, f"config.data.test_limit must be >= 0, got {d.test_limit}"),
        (
            d.eval_batch_size >= 1,
            f"config.data.eval_batch_size must be >= 1, got {d.eval_batch_size}",
        ),
        (d.outliers.ratio >= 1, f"config.data.outliers.ratio must be >= 1, got {d.outliers.ratio}"),
        (
            t.checkpoint_every >= 0,
            f"config.train.checkpoint_every must be >= 0, got {t.checkpoint_every}",
        ),
        (t.log_every >= 1, f"config.train.log_every must be >= 1, got {t.log_every}"),
        (config.seed >= 0, f"config.seed must be >= 0, got {config.seed}"),
    ]
    for ok, message in checks:
        if not ok:
            raise cli.UsageError(message + ".")
    if config.eval.ood:
        from ood_jax.evaluate import check_ood_set_names
        from ood_jax.scores import check_score_names

        scores = [s for s in config.eval.scores if s]
        if scores:
            check_score_names(scores)
        check_ood_set_names([s for s in config.eval.ood_sets if s] or None)


def load_splits(
    config: ml_collections.ConfigDict, *, data_dir: str | None = None
) -> tuple[D.ImageDataset, D.ImageDataset]:
    """The train and test splits named by ``config.data`` (dataset, source, limits).

    ``source``: ``tfds``; ``local`` (the dataset's offline files, or its offline
    stand-in such as ``cifar10_jpeg``); or a folder holding
    ``<dataset>_{train,test}.npz`` or ``{train,test}/<class>/`` images. A limit keeps a
    seeded random subset (the offline files are sorted by class). ``data_dir``: the
    offline files' folder (default ``$OOD_JAX_DATA_DIR`` or ``../shared/data``).
    """
    name, source = config.data.dataset, config.data.source
    spec = D.get_dataset_spec(name)
    out = []
    for split, limit in (("train", config.data.train_limit), ("test", config.data.test_limit)):
        if source == "tfds":
            ds = D.load_dataset(name, split)
        elif source == "local":
            offline = name if spec.offline else spec.offline_alternative
            if offline is None:
                raise cli.UsageError(
                    f"--data local: {name!r} has no offline files here; use --data tfds (needs "
                    f"internet) or --data PATH (a folder with {name}_{{train,test}}.npz or "
                    "{train,test}/<class>/ images)."
                )
            ds = D.load_dataset(offline, split, data_dir=data_dir)
        else:
            path = Path(source)
            if not path.is_dir():
                raise cli.UsageError(
                    f"--data {source!r}: expected 'tfds', 'local' or a folder holding "
                    f"{name}_train.npz and {name}_test.npz (or train/ and test/ image folders); "
                    + ("that is a file, not a folder." if path.exists() else "no such folder.")
                )
            npz = path / f"{name}_{split}.npz"
            if not npz.is_file() and not (path / split).is_dir():
                raise cli.UsageError(
                    f"--data {source!r}: found neither {npz.name} nor a {split}/<class>/ image "
                    f"folder there; put the {name} files in that folder or choose another."
                )
            ds = D.load_dataset(name, split, local_path=npz if npz.is_file() else path)
        out.append(D.random_subset(ds, limit, seed=config.seed))
    return out[0], out[1]


def load_outliers(config: ml_collections.ConfigDict) -> D.ImageDataset:
    """The auxiliary outlier set of ``config.data.outliers`` (name, or file/folder path)."""
    source = config.data.outliers.source
    if os.path.exists(source):
        return D.load_outliers(Path(source).stem, config.data.outliers.split, local_path=source)
    return D.load_outliers(source, config.data.outliers.split)


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


def restore_workdir(workdir: str, *, step: int | None = None):
    """``(model_def, params, batch_stats, metadata, step)`` of a workdir's checkpoint.

    The newest checkpoint unless ``step`` is given. The model is rebuilt from
    ``metadata["model"]`` and the optimizer state's layout from
    ``metadata["config"]["optim"]`` (its values are not needed); the checkpoint
    module checks that every saved array matches the model.

    Raises:
      UsageError: no checkpoint directory.
      CheckpointError: no checkpoint, a missing step, or a checkpoint that does not
        match the recorded model.
    """
    import optax

    from ood_jax.checkpoint import CheckpointError, abstract_like

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise cli.UsageError(
            f"{workdir!r}: no checkpoints/ folder; pass the workdir of a training run "
            "(python -m experiments.cifar10_logitnorm --workdir DIR)."
        )
    checkpointer = Checkpointer(directory)
    try:
        if step is None:
            step = checkpointer.latest_step()
            if step is None:
                raise CheckpointError(f"{workdir!r}: {directory} holds no checkpoint.")
        metadata = checkpointer.read_metadata(step)
        identity, config = metadata.get("model"), metadata.get("config")
        if not identity or not config:
            raise CheckpointError(
                f"checkpoint {step} in {directory} has no model/config metadata; it was not "
                "written by the ood_jax training experiments."
            )
        import_user_modules(cli.config_from_json(config))
        model = build_model(identity, int(config.get("seed", 0)))
        optim = config["optim"]
        # A schedule (any callable) gives the same optimizer-state layout as training.
        tx = make_optimizer(
            optax.constant_schedule(0.0),
            momentum=optim["momentum"],
            nesterov=optim["nesterov"],
            weight_decay=optim["weight_decay"],
        )
        model_def, state = create_train_state(model, tx, seed=0)
        target = abstract_like(state, sharding.replicated(sharding.make_mesh()))
        state, metadata = checkpointer.restore(target, step=step, expected_model=identity)
    finally:
        checkpointer.close()
    params, batch_stats = sharding.fetch((state.params, state.batch_stats))
    return model_def, params, batch_stats, metadata, int(step)


def initial_weights(source: str, identity: dict[str, Any]) -> tuple[Any, Any, int]:
    """``(params, batch_stats, step)`` of ``source``'s newest checkpoint, for fine-tuning.

    The source model must be the one this run builds (architecture, class count,
    options); anything else is a clear error.
    """
    model_def, params, batch_stats, metadata, step = restore_workdir(source)
    theirs = metadata["model"]
    if json.loads(json.dumps(theirs)) != json.loads(json.dumps(identity)):
        raise cli.UsageError(
            f"--init_from {source!r}: its checkpoint (step {step}) holds {theirs['name']} with "
            f"{theirs['num_classes']} classes and options {theirs['options']}, but this run "
            f"builds {identity['name']} with {identity['num_classes']} classes and options "
            f"{identity['options']}; initialize from a run of the same model and dataset."
        )
    return params, batch_stats, step


def mean_energy(model_def, params, batch_stats, dataset, *, mean, std, batch_size, mesh) -> float:
    """Mean free energy ``-logsumexp(logits)`` of the model (eval mode) over ``dataset``."""
    from ood_jax.evaluate import ForwardPass

    model = model_def.merge(params, batch_stats, train=False, key=None)
    outputs = ForwardPass(model, mesh=mesh)(
        D.eval_batches(dataset, batch_size=batch_size, mean=mean, std=std)
    )
    logits = outputs.logits.astype("float64")
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(-lse.mean())


AUTO_HPARAMS = ("m_in", "m_out")
_AUTO_EXAMPLES = 10000


def set_auto_hparams(config, model_def, state, train_ds, outliers, *, workdir, mesh, mean, std):
    """Sets ``config.objective.auto`` hyperparameters from the initial model, in place.

    ``m_in`` / ``m_out``: the model's mean free energy on (a seeded subset of at most
    10,000 of) the in-distribution training images and the auxiliary outliers: the
    energy authors' advice for choosing the margins. A resumed run reuses the values
    its own checkpoint recorded.
    """
    unknown = sorted(set(config.objective.auto) - set(AUTO_HPARAMS))
    if unknown or not set(config.objective.auto) <= set(config.objective.hparams):
        raise cli.UsageError(
            f"config.objective.auto: can set {AUTO_HPARAMS} of an objective that has them, "
            f"got {tuple(config.objective.auto)} for {config.objective.name!r}."
        )
    if not config.train.init_from:
        raise cli.UsageError(
            "automatic margins are measured on the model being fine-tuned: pass --init_from."
        )
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        own = ckpt.latest_step() if os.path.isdir(ckpt.directory) else None
        recorded = ckpt.read_metadata(own)["config"]["objective"]["hparams"] if own else None
    finally:
        ckpt.close()
    sets = {"m_in": train_ds, "m_out": outliers}
    values = {}
    for name in config.objective.auto:
        if recorded is not None:
            values[name] = float(recorded[name])
            continue
        if sets[name] is None:
            raise cli.UsageError(f"{name}=auto needs the auxiliary outliers of the objective.")
        subset = D.random_subset(sets[name], _AUTO_EXAMPLES, seed=config.seed)
        values[name] = mean_energy(
            model_def,
            *sharding.fetch((state.params, state.batch_stats)),
            subset,
            mean=mean,
            std=std,
            batch_size=eval_batch_size(config, mesh),
            mesh=mesh,
        )
    for name, value in values.items():
        config.objective.hparams[name] = value
    print(
        "automatic margins from the initial model's mean energies: "
        + ", ".join(f"{k} = {v:.4f}" for k, v in values.items())
    )


def eval_batch_size(config: ml_collections.ConfigDict, mesh) -> int:
    """The one eval batch size (training's test pass and the report): a multiple of the
    device count, last batch padded and masked."""
    size = config.data.eval_batch_size
    devices = mesh.devices.size
    return max(size - size % devices, devices)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train (or resume) per ``config`` in ``workdir``, then run the final evaluation.

    Returns the final evaluation summary (also written to ``workdir/final.json``).
    """
    workdir = os.fspath(workdir)
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

    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)
        print(
            f"training {config.objective.name} on {_display(train_ds)} "
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
            workdir=workdir,
            step=step,
            out_dir=os.path.join(workdir, "eval"),
            command=shlex.join([sys.executable, *sys.argv]),
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


def near_auxiliary_notes(config: ml_collections.ConfigDict, names: Sequence[str]) -> dict:
    """``{set: "near-auxiliary"}`` for OOD sets whose classes the training outliers share.

    Training with the Tiny ImageNet train subset as auxiliary outliers puts
    TinyImageNet-crop/resize's classes into training; the report must say so.
    """
    if not get_objective(config.objective.name).uses_outliers:
        return {}
    overlap = NEAR_AUXILIARY.get(Path(config.data.outliers.source).stem, ())
    return {n: "near-auxiliary" for n in names if n.partition(":")[0] in overlap}


def ood_report(
    config: ml_collections.ConfigDict,
    model: nnx.Module,
    *,
    train_ds: D.ImageDataset,
    test_ds: D.ImageDataset,
    workdir: str,
    step: int,
    out_dir: str,
    command: str,
    batch_size: int,
    data_dir: str | None = None,
) -> dict:
    """The OOD report of a trained model, as ``config.eval`` describes it.

    The one path behind both the end-of-training report and ``python -m
    experiments.evaluate``: same sets, scores, hyperparameters, budgets and seeds for
    the same config, so both give identical numbers for the same checkpoint.
    """
    from ood_jax.evaluate import check_ood_set_names, load_ood_sets, run_evaluation

    spec = D.get_dataset_spec(config.data.dataset)
    e = config.eval
    names = [n for n in (e.ood_sets or spec.ood_suite) if n]
    if not names:
        raise cli.UsageError(
            f"config.eval.ood_sets is empty and {config.data.dataset!r} has no default OOD "
            "suite; name the sets, e.g. --config.eval.ood_sets=svhn,gaussian."
        )
    check_ood_set_names(names)
    notes = near_auxiliary_notes(config, names)
    print(f"OOD evaluation: loading {len(names)} OOD sets ({', '.join(names)})")
    ood_sets = load_ood_sets(
        names,
        data_dir=data_dir,
        num_synthetic=e.num_synthetic,
        seed=config.seed,
        id_test=test_ds,
    )
    return run_evaluation(
        model,
        id_test=test_ds,
        ood_sets=ood_sets,
        train=train_ds,
        scores=[s for s in e.scores if s] or None,
        score_hparams=e.score_hparams.to_dict(),
        protocols=tuple(e.protocols),
        convention=e.convention,
        num_draws=e.num_draws,
        seed=config.seed,
        max_train=e.max_train or None,
        max_ood=e.max_ood or None,
        batch_size=batch_size,
        mean=spec.mean,
        std=spec.std,
        out_dir=out_dir,
        metrics_log_dir=workdir,
        metadata={
            "command": command,
            "checkpoint": {"workdir": os.path.abspath(workdir), "step": step},
            "model": {"name": config.model.name, "options": config.model.options.to_dict()},
            "config": config.to_dict(),
            "dataset": _display(test_ds),
            "set_notes": notes,
        },
        progress=lambda message: print(f"OOD evaluation: {message}", flush=True),
        adversarial_noise=e.adversarial_noise,
        attack_steps=e.attack_steps,
        attack_eps=e.attack_eps,
    )


def _display(ds: D.ImageDataset) -> str:
    """Report name of a loaded split: its spec's (``CIFAR-10 (JPEG)``), else its name."""
    return D.get_dataset_spec(ds.name).display if ds.name in D.available_datasets() else ds.name


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


if __name__ == "__main__":
    main(sys.argv[1:])
