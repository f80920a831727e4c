"""A run's home: the files of a training workdir, its lock, and its one checkpointer.

``Workdir`` is the only code that knows a run's files::

    DIR/config.json      the resolved settings of the run        Workdir.CONFIG
    DIR/checkpoints/     orbax checkpoints (ood_jax.checkpoint)   Workdir.CHECKPOINTS
    DIR/metrics.jsonl    the training log (ood_jax.train.logging) Workdir.METRICS
    DIR/changes.jsonl    settings changed on resume               Workdir.CHANGES
    DIR/final.json       the final evaluation summary             Workdir.FINAL
    DIR/eval/            the OOD report                           Workdir.EVAL
    DIR/.lock            held while a run trains                  Workdir.LOCK

Everything a run does with its checkpoints (the resume check, the automatic margins'
recorded values, restoring, the training loop) goes through one
:class:`~ood_jax.checkpoint.Checkpointer`, created on first use and closed once, and
the checkpoint metadata is read once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections

from experiments import cli
from experiments.run_config import import_user_modules
from ood_jax import sharding
from ood_jax.checkpoint import (
    Checkpointer,
    CheckpointError,
    CorruptCheckpointError,
    ModelMismatchError,
    abstract_like,
)
from ood_jax.models import build_model
from ood_jax.train import create_train_state, make_optimizer
from ood_jax.train.logging import METRICS_FILE

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


# Reads of a still-training run's newest checkpoint before giving up (each lost to pruning).
_NEWEST_ATTEMPTS = 3


def _readable_json(path: str) -> bool:
    try:
        with open(path) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


class RestoredRun(NamedTuple):
    """A workdir's checkpoint: the model's definition, its weights and the metadata."""

    model_def: Any
    params: Any
    batch_stats: Any
    metadata: dict[str, Any]
    step: int


class Workdir:
    """The folder of one training run (see the module docstring for its files).

    Use it as a context manager: leaving it closes the checkpointer and releases the
    lock. Nothing is read or written before a method needs it.

    Args:
      path: the workdir.
      max_to_keep: checkpoints kept by the run's checkpointer.
    """

    CONFIG = "config.json"
    CHECKPOINTS = "checkpoints"
    METRICS = METRICS_FILE
    CHANGES = "changes.jsonl"
    FINAL = "final.json"
    EVAL = "eval"
    LOCK = ".lock"

    def __init__(self, path: str | os.PathLike, *, max_to_keep: int = 3):
        self.path = os.fspath(path)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise cli.UsageError(
                f"--workdir {self.path!r} is a file, not a folder; give a new folder or the "
                "workdir of a training run."
            )
        self._max_to_keep = max_to_keep
        self._checkpointer: Checkpointer | None = None
        self._held = contextlib.ExitStack()

    def __enter__(self) -> Workdir:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the checkpointer (if one was opened), then releases the lock."""
        with self._held:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None

    def file(self, name: str) -> str:
        """The path of ``name`` (one of the class constants) in this workdir."""
        return os.path.join(self.path, name)

    @property
    def checkpointer(self) -> Checkpointer:
        """The run's one checkpointer (created on first use, with ``checkpoints/``)."""
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(
                self.file(self.CHECKPOINTS), max_to_keep=self._max_to_keep
            )
        return self._checkpointer

    def has_checkpoints(self) -> bool:
        return os.path.isdir(self.file(self.CHECKPOINTS))

    def newest_metadata(self) -> tuple[int | None, dict[str, Any] | None]:
        """``(step, metadata)`` of the newest checkpoint whose metadata reads;
        ``(None, None)`` for a fresh workdir. A folder of files but no checkpoint is a
        ``CheckpointError``."""
        if not self.has_checkpoints():
            return None, None
        self.checkpointer.latest_step()
        return self.checkpointer.newest_readable_metadata()

    def lock(self) -> None:
        """Holds ``.lock`` until :meth:`close`: a second run on the workdir refuses.

        An advisory ``flock`` on an open file: the operating system releases it when the
        process ends in any way (crash, kill -9), so a crashed run never leaves a stale
        lock. Process 0 takes it (one lock per run, also on several hosts).
        """
        if jax.process_index() == 0:
            self._held.enter_context(_flock(self.path, self.file(self.LOCK)))

    def check_resume(self, config: ml_collections.ConfigDict, identity: Mapping) -> None:
        """Before anything is written: is the newest checkpoint this run's?

        A checkpoint of another model is a ``CheckpointError``; a change of any
        :data:`RUN_FIELDS` (learning rate, epochs, loss temperature, ...) is a
        ``UsageError`` listing the changed fields, unless ``config.train.allow_changes``:
        then each change is recorded with the step it takes effect in ``changes.jsonl``.
        Nothing happens for a fresh workdir.
        """
        step, metadata = self.newest_metadata()
        if metadata is None:
            return
        if metadata.get("model") is not None:
            self.checkpointer.check_model(step, metadata, identity)
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
                f"resuming {self.path!r} (checkpoint step {step}) with changed settings: "
                f"{listing}. Use the saved settings (config.json), another --workdir, or "
                "--config.train.allow_changes=true to apply the change from this step on."
            )
        with open(self.file(self.CHANGES), "a") as f:
            f.write(json.dumps({"step": step, "changes": changed}) + "\n")
        print(
            f"resuming at step {step} with changed settings (recorded in {self.CHANGES}): {listing}"
        )

    def save_config(self, config: ml_collections.ConfigDict) -> None:
        """Writes ``config.json`` (process 0)."""
        os.makedirs(self.path, exist_ok=True)
        if jax.process_index() == 0:
            path = self.file(self.CONFIG)
            if os.path.exists(path) and not _readable_json(path):
                warnings.warn(
                    f"{path} was damaged (not readable JSON); rewritten from this run's "
                    "settings, which the checkpoints record.",
                    stacklevel=2,
                )
            with open(path, "w") as f:
                json.dump(config.to_dict(), f, indent=2, default=str)

    def save_final(self, summary: Mapping[str, Any]) -> None:
        """Writes ``final.json`` (process 0)."""
        if jax.process_index() == 0:
            with open(self.file(self.FINAL), "w") as f:
                json.dump(summary, f, indent=2)

    def restore(
        self, step: int | None = None, *, expected_model: Mapping[str, Any] | None = None
    ) -> RestoredRun:
        """Checkpoint ``step`` (the newest if None) with the model it was trained with.

        The model is ``expected_model`` if given (a caller's own identity, checked
        against the checkpoint's), else the one its metadata records; the optimizer
        state's layout comes from ``metadata["config"]["optim"]`` (its values are not
        needed). The checkpoint package checks that every saved array fits the model.

        The newest checkpoint of a run that is still training may be pruned while it
        is read (the run keeps ``max_to_keep``): then the new newest one is read, a
        few times, before a clear error says to wait or pass ``--step``.

        Raises:
          UsageError: no checkpoint directory.
          CheckpointError: no checkpoint, a missing step, a corrupt checkpoint, or one
            that does not match the model (``ModelMismatchError`` for another identity).
        """
        if not self.has_checkpoints():
            raise cli.UsageError(
                f"{self.path!r}: no checkpoints/ folder; pass the workdir of a training run "
                "(python -m experiments.cifar10_logitnorm --workdir DIR)."
            )
        if step is not None:
            return self._restore(step, expected_model)
        checkpointer = self.checkpointer
        for _ in range(_NEWEST_ATTEMPTS):
            newest = checkpointer.latest_step()
            if newest is None:
                raise CheckpointError(
                    f"{self.path!r}: {checkpointer.directory} holds no checkpoint."
                )
            try:
                return self._restore(newest, expected_model)
            except (CheckpointError, OSError):
                if newest in checkpointer.all_steps():
                    raise  # still there: the checkpoint itself is the problem
        raise CheckpointError(
            f"{self.path!r}: its newest checkpoint was replaced {_NEWEST_ATTEMPTS} times while "
            "being read (a run is still training there); wait for it to finish, or pass "
            f"--step with one of {checkpointer.all_steps()}."
        )

    def _restore(self, step: int, expected_model: Mapping[str, Any] | None) -> RestoredRun:
        checkpointer = self.checkpointer
        metadata = checkpointer.read_metadata(step)
        identity, config = metadata.get("model"), metadata.get("config")
        if not identity or not config:
            raise CheckpointError(
                f"checkpoint {step} in {checkpointer.directory} has no model/config metadata; "
                "it was not written by the ood_jax training experiments."
            )
        import_user_modules(cli.config_from_json(config))
        model = build_model(expected_model or identity, int(config.get("seed", 0)))
        model_def, state = create_train_state(model, _optimizer_like(config["optim"]), seed=0)
        target = abstract_like(state, sharding.replicated(sharding.make_mesh()))
        try:
            state, metadata = checkpointer.restore(target, step=step, expected_model=expected_model)
        except CorruptCheckpointError as err:
            older = [s for s in checkpointer.all_steps() if s < step]
            hint = f" Choose an older one with --step ({older})." if older else ""
            raise CorruptCheckpointError(f"{err}{hint}", step) from err
        params, batch_stats = sharding.fetch((state.params, state.batch_stats))
        return RestoredRun(model_def, params, batch_stats, metadata, int(step))

    def initial_weights(self, identity: Mapping[str, Any]) -> tuple[Any, Any, int]:
        """``(params, batch_stats, step)`` of this workdir's newest checkpoint, to
        fine-tune a run (``--init_from``) that builds the model ``identity``.

        The model must be the one that run builds (architecture, class count, options);
        anything else is a clear ``UsageError``.
        """
        try:
            restored = self.restore(expected_model=identity)
        except ModelMismatchError as err:
            theirs = err.saved
            raise cli.UsageError(
                f"--init_from {self.path!r}: its checkpoint (step {err.step}) holds "
                f"{theirs['name']} with {theirs['num_classes']} classes and options "
                f"{theirs['options']}, but this run builds {identity['name']} with "
                f"{identity['num_classes']} classes and options {identity['options']}; "
                "initialize from a run of the same model and dataset."
            ) from None
        return restored.params, restored.batch_stats, restored.step


def _optimizer_like(optim: Mapping[str, Any]):
    """An optimizer with the training run's state layout (a constant schedule: any
    schedule gives the same layout)."""
    import optax

    return make_optimizer(
        optax.constant_schedule(0.0),
        momentum=optim["momentum"],
        nesterov=optim["nesterov"],
        weight_decay=optim["weight_decay"],
    )


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for key, value in values.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(values) if isinstance(values, tuple) else values}


@contextlib.contextmanager
def _flock(workdir: str, path: str) -> Iterator[None]:
    os.makedirs(workdir, exist_ok=True)
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
