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
- Corruption is detected: every save records the SHA-256 of each array's bytes
  in the metadata, and a restore recomputes them. A checkpoint with unreadable
  files or changed bytes raises :class:`CorruptCheckpointError` naming the step
  and the arrays; :meth:`Checkpointer.restore_newest_intact` then falls back to
  the newest intact checkpoint (moving the corrupt one aside, with a warning).
- A full disk is one clear error: a save first checks that the state fits in the
  free space, and a save that still fails for lack of space raises
  :class:`DiskFullError` (an ``OSError`` with ``errno.ENOSPC``) instead of orbax's
  hundreds of lines of thread noise. The newest complete checkpoint stays intact;
  the unfinished one is cleaned up on the next start.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_TMP_MARKER = ".orbax-checkpoint-tmp"
HASHES_KEY = "array_sha256"
FILE_HASHES = "ood_jax_sha256.json"
# Room kept free beyond the arrays' bytes: orbax's metadata files and the JSON.
_SPACE_MARGIN = 256 << 10


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be used (corrupt, or of another model)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files are unreadable or whose arrays differ from their saved hashes."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class DiskFullError(OSError):
    """No space left on the device to save a checkpoint (``errno.ENOSPC``)."""

    def __init__(self, message: str, path: str):
        super().__init__(errno.ENOSPC, message, path)

    def __str__(self) -> str:
        return self.strerror


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
        self._check_space(step, state)
        metadata = {**metadata, HASHES_KEY: array_hashes(state)}
        failure = None
        with _quiet_stderr() as captured:
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
                if _is_no_space(err):
                    _settle()
        if failure is not None and _is_no_space(failure):
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
        step_dir = os.path.join(self.directory, str(step))
        path = os.path.join(step_dir, FILE_HASHES)
        try:
            with open(f"{path}.tmp", "w") as f:
                json.dump(_file_hashes(step_dir), f, indent=0, sort_keys=True)
            os.replace(f"{path}.tmp", path)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise self._disk_full(step, "no room for its file hashes") from None
            raise
        self._verified.add(step)

    def _verify_files(self, step: int) -> None:
        """Compare checkpoint ``step``'s files with the hashes written after saving it."""
        if step in self._verified:
            return
        step_dir = os.path.join(self.directory, str(step))
        path = os.path.join(step_dir, FILE_HASHES)
        if not os.path.exists(path):
            return  # saved before file hashes existed, or killed right after orbax's commit
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as err:
            raise CorruptCheckpointError(
                f"checkpoint {step} in {self.directory}: its file hash list {path} is "
                f"unreadable ({err}).",
                step,
            ) from err
        now = _file_hashes(step_dir)
        bad = sorted(name for name in saved if saved[name] != now.get(name))
        if bad:
            raise CorruptCheckpointError(
                f"checkpoint {step} in {self.directory} is corrupt: {len(bad)} file(s) changed, "
                f"truncated or missing since it was written ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}).",
                step,
            )
        self._verified.add(step)

    def _check_space(self, step: int, state: Any) -> None:
        needed = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
        free = shutil.disk_usage(self.directory).free
        if free < needed + _SPACE_MARGIN:
            raise self._disk_full(
                step, f"it needs about {_mb(needed + _SPACE_MARGIN)}, {_mb(free)} are free"
            )

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
        return dict(restored.metadata)

    def newest_readable_metadata(self) -> tuple[int | None, dict[str, Any] | None]:
        """``(step, metadata)`` of the newest checkpoint whose metadata reads, or
        ``(None, None)``. Unreadable ones are skipped here; restoring reports them."""
        for step in reversed(self.all_steps()):
            try:
                return step, self.read_metadata(step)
            except CorruptCheckpointError:
                continue
        return None, None

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
        failure = None
        with _quiet_stderr() as captured:
            try:
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                )
            except Exception as err:
                failure = err
                _settle()
        if failure is not None:  # orbax's own report of it is dropped: the error says it
            raise CorruptCheckpointError(
                f"checkpoint {step} in {self.directory} could not be restored (corrupt or "
                f"incomplete): {type(failure).__name__}: {_first_line(failure)}",
                step,
            ) from failure
        captured.replay()
        self._verify(step, restored.state, metadata)
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

    def _verify(self, step: int, state: Any, metadata: Mapping[str, Any]) -> None:
        """Compare the restored arrays with the hashes saved with them (if any)."""
        saved = metadata.get(HASHES_KEY)
        if not saved:
            return  # written before hashes were recorded
        now = array_hashes(state)
        bad = sorted(p for p in set(saved) | set(now) if saved.get(p) != now.get(p))
        if bad:
            raise CorruptCheckpointError(
                f"checkpoint {step} in {self.directory} is corrupt: {len(bad)} saved array(s) "
                f"differ from the hashes recorded when it was written ({', '.join(bad[:4])}"
                f"{', ...' if len(bad) > 4 else ''}).",
                step,
            )

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            aside = os.path.join(self.directory + ".corrupt", str(step))
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            if os.path.exists(aside):
                shutil.rmtree(aside)
            os.replace(os.path.join(self.directory, str(step)), aside)
        self._verified.discard(step)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"ood_jax_checkpoint_aside_{step}")
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
        """Compare the saved tree's paths and shapes with ``target``'s before restoring."""
        try:
            saved = self._manager.item_metadata(step).state
        except Exception as err:
            raise CorruptCheckpointError(
                f"checkpoint {step} in {self.directory} is unreadable (corrupt or "
                f"incomplete): {type(err).__name__}: {err}",
                step,
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


def array_hashes(tree: Any) -> dict[str, str]:
    """SHA-256 of each array's bytes (dtype and shape included), keyed by tree path.

    Sharded arrays are hashed from this process's copy when they are replicated;
    an array that no process holds whole is left out.
    """
    hashes = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                continue
            x = x.addressable_data(0)
        value = np.ascontiguousarray(np.asarray(x))
        digest = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
        digest.update(value.tobytes())
        hashes[_path_str(path)] = digest.hexdigest()
    return hashes


def _file_hashes(step_dir: str) -> dict[str, str]:
    """SHA-256 of every file under ``step_dir`` (but the hash list), by relative path."""
    hashes = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel.startswith(FILE_HASHES):
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            hashes[rel] = digest.hexdigest()
    return hashes


def _is_no_space(err: BaseException) -> bool:
    """Did ``err`` (or what caused it) fail for lack of space? Orbax wraps tensorstore's
    ``RESOURCE_EXHAUSTED ... [os_error_code='28']`` in various exception types."""
    while err is not None:
        if getattr(err, "errno", None) == errno.ENOSPC:
            return True
        text = str(err)
        if "No space left on device" in text or "os_error_code='28'" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def _settle() -> None:
    """After a failed orbax call its threads go on reporting for a moment, and its
    failed tasks report themselves when collected: let that happen while captured."""
    time.sleep(0.5)
    gc.collect()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


class _Captured:
    def __init__(self):
        self.chunks: list[bytes] = []

    def replay(self) -> None:
        """Write what was captured to the real stderr (a successful save's warnings)."""
        if self.chunks:
            sys.stderr.write(b"".join(self.chunks).decode(errors="replace"))
            sys.stderr.flush()
            self.chunks.clear()


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[_Captured]:
    """Holds back what is written to file descriptor 2 while orbax saves.

    A save that fails for lack of space makes orbax's and tensorstore's threads print
    hundreds of lines (tracebacks, ``Event loop is closed``) straight to the
    descriptor; they are kept in memory and dropped when the failure becomes one
    clear error, and replayed otherwise.
    """
    captured = _Captured()
    try:
        sys.stderr.flush()
        saved_fd = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2 (some embedded runtimes)
        yield captured
        return
    read_fd, write_fd = os.pipe()

    def drain():
        while chunk := os.read(read_fd, 65536):
            captured.chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield captured
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        reader.join(timeout=5)
        os.close(read_fd)


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
