"""Checkpoints: the only module that talks to orbax.

A checkpoint directory holds one sub-directory per saved step, each with two
items: ``state`` (the :class:`~ood_jax.train.TrainState` pytree, saved with
orbax's StandardSave, one file set per array) and ``metadata`` (JSON: the model
identity ``{"name", "num_classes", "options"}``, the config, the data iterator
state, anything else the caller records).

Guarantees:

- Atomic saves: orbax writes into a temporary directory and renames it when the
  write is complete, so killing the process at any moment leaves the newest
  *complete* checkpoint readable; leftover temporary directories are ignored and
  cleaned up. Saves are synchronous (the next train step donates the state's
  buffers, and a blocking save of a CIFAR model takes well under a second).
- Keep the last ``max_to_keep`` checkpoints.
- Restore onto any mesh: the target gives each array's sharding.
- Never silently start from scratch: a directory that holds files but no
  readable checkpoint, a checkpoint of another model (metadata differs) or of
  another state layout (tree structure or shapes differ) raise
  :class:`CheckpointError` (a ``ValueError``) that says what differs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

_TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be used (corrupt, or of another model)."""


class Checkpointer:
    """Save and restore ``(state, metadata)`` pairs under ``directory``.

    Args:
      directory: where the step directories go (created if missing).
      max_to_keep: number of most recent checkpoints kept (older ones are deleted).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=False,
        )
        # Handlers given up front: a fresh manager (a resumed run) must be able to
        # read item metadata before it has saved or restored anything.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "metadata": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None if there is none.

        Raises CheckpointError if the directory holds files but no complete checkpoint
        (e.g. a corrupt or foreign directory): starting over there would silently
        discard a run.
        """
        self._manager.reload()
        step = self._manager.latest_step()
        if step is None:
            stray = [
                name
                for name in os.listdir(self.directory)
                if _TMP_MARKER not in name and not name.startswith(".")
            ]
            if stray:
                raise CheckpointError(
                    f"checkpoint directory {self.directory} holds {sorted(stray)[:5]} but no "
                    "complete checkpoint; it is corrupt or not an ood_jax checkpoint "
                    "directory. Delete it or choose another workdir."
                )
        return step

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: Mapping[str, Any]) -> None:
        """Save ``state`` (a pytree of arrays) and JSON ``metadata`` as checkpoint ``step``.

        Returns once the checkpoint is complete on disk. Saving a step that already
        exists is a no-op (e.g. the final save right after a periodic one).
        """
        if step in self._manager.all_steps():
            return
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                metadata=ocp.args.JsonSave(dict(metadata)),
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of checkpoint ``step`` (the newest if None)."""
        step = self._resolve_step(step)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
            )
        except Exception as err:  # orbax raises many types for unreadable files
            raise CheckpointError(
                f"metadata of checkpoint {step} in {self.directory} is unreadable "
                f"(corrupt or incomplete checkpoint): {err}"
            ) from err
        return dict(restored.metadata)

    def restore(
        self,
        target: Any,
        *,
        step: int | None = None,
        expected_model: Mapping[str, Any] | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Restore checkpoint ``step`` (the newest if None) onto ``target``'s layout.

        Args:
          target: a pytree like the saved state whose leaves are arrays or
            ``jax.ShapeDtypeStruct`` with a ``sharding``: it fixes the tree structure,
            shapes, dtypes and the devices the arrays land on (any mesh, any number of
            devices). Build it with :func:`abstract_like`.
          step: which checkpoint; the newest if None.
          expected_model: if given, must equal ``metadata["model"]`` of the checkpoint
            (model name, number of classes, options).

        Returns:
          ``(state, metadata)``.
        """
        step = self._resolve_step(step)
        metadata = self.read_metadata(step)
        if expected_model is not None:
            saved_model = metadata.get("model")
            expected = _jsonable(dict(expected_model))
            if saved_model != expected:
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory} is of another model: saved "
                    f"{saved_model}, expected {expected}. Use a fresh workdir or the matching "
                    "model configuration."
                )
        self._check_structure(step, target)
        abstract = abstract_like(target)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )
        except Exception as err:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} could not be restored (corrupt, "
                f"incomplete or of another model): {type(err).__name__}: {err}"
            ) from err
        return restored.state, metadata

    def close(self) -> None:
        """Wait for pending work and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}.")
        elif step not in self.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}."
            )
        return step

    def _check_structure(self, step: int, target: Any) -> None:
        """Compare the saved tree's paths and shapes with ``target``'s before restoring."""
        try:
            saved = self._manager.item_metadata(step).state
        except Exception as err:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} is unreadable (corrupt or "
                f"incomplete): {type(err).__name__}: {err}"
            ) from err
        if saved is None:
            raise CheckpointError(f"checkpoint {step} in {self.directory} has no saved state.")
        saved_shapes = _shapes_by_path(saved)
        target_shapes = _shapes_by_path(target)
        if saved_shapes != target_shapes:
            missing = sorted(set(target_shapes) - set(saved_shapes))
            extra = sorted(set(saved_shapes) - set(target_shapes))
            changed = sorted(
                p
                for p in set(saved_shapes) & set(target_shapes)
                if saved_shapes[p] != target_shapes[p]
            )
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} does not match this model's state: "
                f"missing {missing[:5]}, unexpected {extra[:5]}, different shapes "
                f"{[(p, saved_shapes[p], target_shapes[p]) for p in changed[:5]]}. It is a "
                "checkpoint of another model or configuration; use a fresh workdir."
            )


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with shardings) describing ``tree``.

    Leaves keep their own sharding unless ``sharding`` is given (e.g. replicated on a
    new mesh: restoring an 8-device run onto 1 device).
    """

    def leaf(x):
        target_sharding = sharding if sharding is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target_sharding)

    return jax.tree.map(leaf, tree)


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(path): tuple(getattr(x, "shape", ())) for path, x in leaves}


def _path_str(path: tuple) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
