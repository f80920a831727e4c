"""Models of a run: identity, building, restoring a workdir, fine-tuning initialization."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import cli
from experiments.run_config import import_user_modules
from ood_jax import data as D
from ood_jax import sharding
from ood_jax.checkpoint import Checkpointer
from ood_jax.models import create_model
from ood_jax.train import create_train_state, get_objective, make_optimizer


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

    from ood_jax.checkpoint import CheckpointError, CorruptCheckpointError, abstract_like

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
        try:
            state, metadata = checkpointer.restore(target, step=step, expected_model=identity)
        except CorruptCheckpointError as err:
            older = [s for s in checkpointer.all_steps() if s < step]
            hint = f" Choose an older one with --step ({older})." if older else ""
            raise CorruptCheckpointError(f"{err}{hint}", step) from err
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
        _, own = ckpt.newest_readable_metadata() if os.path.isdir(ckpt.directory) else (0, None)
        recorded = own["config"]["objective"]["hparams"] if own else None
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


# Config fields that define what a run computes: a resume that changes any of them
# would silently train another run (eval, logging and data-location fields may change).
RUN_FIELDS = (
    "seed",
    "model.",
    "objective.",
    "data.dataset",
    "data.train_limit",
    "data.augment",
    "data.outliers.",
    "optim.",
    "train.epochs",
    "train.num_steps",
    "train.batch_size",
    "train.init_from",
)
CHANGES_FILE = "changes.jsonl"


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for key, value in values.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(values) if isinstance(values, tuple) else values}


def check_resume(config: ml_collections.ConfigDict, workdir: str, identity: dict) -> None:
    """Before anything is written: is ``workdir``'s newest checkpoint this run's?

    A checkpoint of another model is a ``CheckpointError``; a change of any
    :data:`RUN_FIELDS` (learning rate, epochs, loss temperature, ...) is a
    ``UsageError`` listing the changed fields, unless ``config.train.allow_changes``:
    then each change is recorded with the step it takes effect in
    ``workdir/changes.jsonl``. Nothing happens for a fresh workdir.
    """
    from ood_jax.checkpoint import CheckpointError

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return
    ckpt = Checkpointer(directory)
    try:
        ckpt.latest_step()  # a folder of files but no checkpoint is an error
        step, metadata = ckpt.newest_readable_metadata()
    finally:
        ckpt.close()
    if metadata is None:
        return
    saved_model = metadata.get("model")
    if saved_model is not None and json.loads(json.dumps(saved_model)) != json.loads(
        json.dumps(identity)
    ):
        raise CheckpointError(
            f"checkpoint {step} in {directory} is of another model: saved {saved_model}, "
            f"this run builds {identity}; use another --workdir or the saved settings."
        )
    saved = _flatten(json.loads(json.dumps(metadata.get("config", {}), default=str)))
    now = _flatten(json.loads(json.dumps(config.to_dict(), default=str)))
    changed = {
        key: (saved.get(key), now.get(key))
        for key in sorted(set(saved) | set(now))
        if key.startswith(RUN_FIELDS) or key in RUN_FIELDS
        if saved.get(key) != now.get(key)
    }
    if not changed:
        return
    listing = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    if not config.train.get("allow_changes", False):
        raise cli.UsageError(
            f"resuming {workdir!r} (checkpoint step {step}) with changed settings: {listing}. "
            "Use the saved settings (config.json), another --workdir, or "
            "--config.train.allow_changes=true to apply the change from this step on."
        )
    with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
        f.write(json.dumps({"step": step, "changes": changed}) + "\n")
    print(f"resuming at step {step} with changed settings (recorded in {CHANGES_FILE}): {listing}")


LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds ``workdir/.lock`` for the whole run: a second run on the workdir refuses.

    An advisory ``flock`` on an open file: the operating system releases it when the
    process ends in any way (crash, kill -9), so a crashed run never leaves a stale
    lock. Process 0 takes it (one lock per run, also on several hosts).
    """
    if jax.process_index() != 0:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise cli.UsageError(
                f"another run (process {holder}) is using {workdir!r}; wait for it to finish "
                "or choose another --workdir."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
