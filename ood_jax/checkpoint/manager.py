"""The checkpoint manager: orbax save/restore of ``(state, metadata)`` pairs, steps, metadata.

Integrity checks live in :mod:`ood_jax.checkpoint.integrity`, orbax's I/O quirks
in :mod:`ood_jax.checkpoint.orbax_io`; this module sequences them around orbax's
``CheckpointManager``.
"""

from __future__ import annotations

import copy
import errno
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from ood_jax.checkpoint import integrity
from ood_jax.checkpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    DiskFullError,
    ModelMismatchError,
)
from ood_jax.checkpoint.orbax_io import (
    first_line,
    is_no_space,
    quiet_stderr,
    settle,
    space_shortfall,
)

_TMP_MARKER = ".orbax-checkpoint-tmp"


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
        self._verified: set[int] = set()
        # A step's metadata never changes once written: read from disk once.
        self._metadata: dict[int, dict[str, Any]] = {}
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
        shortfall = space_shortfall(self.directory, state)
        if shortfall is not None:
            raise self._disk_full(step, shortfall)
        metadata = {**metadata, integrity.HASHES_KEY: integrity.array_hashes(state)}
        failure = None
        with quiet_stderr() as captured:
            try:
                self._manager.save(
                    int(step),
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state),
                        metadata=ocp.args.JsonSave(dict(metadata)),
                    ),
                    force=True,
                )
                self._manager.wait_until_finished()
            except Exception as err:
                failure = err
                if is_no_space(err):
                    settle()
        if failure is not None and is_no_space(failure):
            raise self._disk_full(step, "it ran out of space while saving") from None
        captured.replay()
        if failure is not None:
            raise failure
        self._write_file_hashes(step)

    def _write_file_hashes(self, step: int) -> None:
        """Records the SHA-256 of every file of the finished checkpoint ``step``: a
        restore checks them before orbax reads anything (a truncated or flipped file is
        then one clear error, not orbax's failure deep in its reader threads)."""
        if jax.process_index() != 0:
            return
        try:
            integrity.write_file_hashes(os.path.join(self.directory, str(step)))
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise self._disk_full(step, "no room for its file hashes") from None
            raise
        self._verified.add(step)

    def _verify_files(self, step: int) -> None:
        if step not in self._verified and integrity.verify_files(self.directory, step):
            self._verified.add(step)

    def _disk_full(self, step: int, why: str) -> DiskFullError:
        latest = self._manager.latest_step()
        kept = (
            f"checkpoint step {latest} is intact"
            if latest is not None
            else "no checkpoint was saved yet, so a rerun starts over"
        )
        return DiskFullError(
            f"no space left on device for checkpoint step {step} in {self.directory} ({why}); "
            f"{kept}. Free some space and run the same command again.",
            self.directory,
        )

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of checkpoint ``step`` (the newest if None)."""
        step = self._resolve_step(step)
        if step not in self._metadata:
            self._verify_files(step)
            try:
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
                )
            except Exception as err:  # orbax raises many types for unreadable files
                raise CorruptCheckpointError(
                    f"metadata of checkpoint {step} in {self.directory} is unreadable "
                    f"(corrupt or incomplete checkpoint): {err}",
                    step,
                ) from err
            self._metadata[step] = dict(restored.metadata)
        return copy.deepcopy(self._metadata[step])

    def newest_readable_metadata(self) -> tuple[int | None, dict[str, Any] | None]:
        """``(step, metadata)`` of the newest checkpoint whose metadata reads, or
        ``(None, None)``. Unreadable ones are skipped here; restoring reports them."""
        for step in reversed(self.all_steps()):
            try:
                return step, self.read_metadata(step)
            except CorruptCheckpointError:
                continue
        return None, None

    def check_model(
        self, step: int, metadata: Mapping[str, Any], expected_model: Mapping[str, Any]
    ) -> None:
        """Raises :class:`ModelMismatchError` unless checkpoint ``step`` (its ``metadata``)
        holds the model ``expected_model`` (name, number of classes, options)."""
        saved_model = metadata.get("model")
        expected = _jsonable(dict(expected_model))
        if saved_model != expected:
            raise ModelMismatchError(
                f"checkpoint {step} in {self.directory} is of another model: saved "
                f"{saved_model}, expected {expected}. Use a fresh workdir or the matching "
                "model configuration.",
                step,
                saved_model,
                expected,
            )

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
            (model name, number of classes, options); see :meth:`check_model`.

        Returns:
          ``(state, metadata)``.
        """
        step = self._resolve_step(step)
        metadata = self.read_metadata(step)
        if expected_model is not None:
            self.check_model(step, metadata, expected_model)
        self._check_structure(step, target)
        failure = None
        with quiet_stderr() as captured:
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(target))),
                )
            except Exception as err:
                failure = err
                settle()
        if failure is not None:  # orbax's own report of it is dropped: the error says it
            raise CorruptCheckpointError(
                f"checkpoint {step} in {self.directory} could not be restored (corrupt or "
                f"incomplete): {type(failure).__name__}: {first_line(failure)}",
                step,
            ) from failure
        captured.replay()
        integrity.verify_arrays(self.directory, step, restored.state, metadata)
        return restored.state, metadata

    def restore_newest_intact(
        self, target: Any, *, expected_model: Mapping[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Like :meth:`restore` of the newest checkpoint, skipping corrupt ones.

        A corrupt checkpoint (unreadable files, or arrays that differ from the hashes
        saved with them) is moved to ``<directory>.corrupt/<step>`` with a warning
        naming the step, and the next newest is tried: resuming repeats the steps
        since that one, bit-exactly. Another model, another layout, or no intact
        checkpoint at all remain errors (never a silent start from scratch).
        """
        skipped = []
        for step in reversed(self.all_steps()):
            try:
                result = self.restore(target, step=step, expected_model=expected_model)
            except CorruptCheckpointError as err:
                skipped.append(step)
                self._set_aside(step)
                warnings.warn(
                    f"skipping corrupt checkpoint step {step}: {err} Moved it to "
                    f"{self.directory}.corrupt/{step}; resuming from the next newest.",
                    stacklevel=2,
                )
                continue
            return result
        raise CorruptCheckpointError(
            f"no intact checkpoint in {self.directory}: steps {skipped} are corrupt (moved to "
            f"{self.directory}.corrupt/). Start over in a fresh workdir.",
            skipped[-1] if skipped else -1,
        )

    def _set_aside(self, step: int) -> None:
        integrity.set_aside(self.directory, step)
        self._verified.discard(step)
        self._metadata.pop(step, None)
        self._manager.reload()

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
        try:
            saved = self._manager.item_metadata(step).state
        except Exception as err:
            raise CorruptCheckpointError(
                f"checkpoint {step} in {self.directory} is unreadable (corrupt or "
                f"incomplete): {type(err).__name__}: {err}",
                step,
            ) from err
        integrity.check_structure(self.directory, step, saved, target)


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with shardings) describing ``tree``.

    Leaves keep their own sharding unless ``sharding`` is given (e.g. replicated on a
    new mesh: restoring an 8-device run onto 1 device).
    """

    def leaf(x):
        target_sharding = sharding if sharding is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target_sharding)

    return jax.tree.map(leaf, tree)


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
