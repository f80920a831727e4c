"""Checkpoint integrity: file and array hashes, their verification, the structure check,
and setting a corrupt step aside.

Every save records the SHA-256 of each array's bytes in the metadata
(:data:`HASHES_KEY`) and of each file in :data:`FILE_HASHES` beside the step's
items; a restore checks the files before orbax reads anything and the arrays after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ood_jax.checkpoint.errors import CheckpointError, CorruptCheckpointError

HASHES_KEY = "array_sha256"
FILE_HASHES = "ood_jax_sha256.json"


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, as a hex string."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def path_str(path: tuple) -> str:
    """A pytree key path as ``a/b/0`` (dict keys, attribute names, sequence indices)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


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
        hashes[path_str(path)] = digest.hexdigest()
    return hashes


def file_hashes(step_dir: str) -> dict[str, str]:
    """SHA-256 of every file under ``step_dir`` (but the hash list), by relative path."""
    hashes = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if not rel.startswith(FILE_HASHES):
                hashes[rel] = sha256_file(path)
    return hashes


def write_file_hashes(step_dir: str) -> None:
    """Writes :data:`FILE_HASHES` into the finished step directory (atomically)."""
    path = os.path.join(step_dir, FILE_HASHES)
    with open(f"{path}.tmp", "w") as f:
        json.dump(file_hashes(step_dir), f, indent=0, sort_keys=True)
    os.replace(f"{path}.tmp", path)


def verify_files(directory: str, step: int) -> bool:
    """Compares checkpoint ``step``'s files with the hashes written after saving it.

    Returns False when it has no hash list (saved before file hashes existed, or
    killed right after orbax's commit), True when every file matches; raises
    :class:`CorruptCheckpointError` otherwise.
    """
    step_dir = os.path.join(directory, str(step))
    path = os.path.join(step_dir, FILE_HASHES)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(
            f"checkpoint {step} in {directory}: its file hash list {path} is unreadable ({err}).",
            step,
        ) from err
    now = file_hashes(step_dir)
    bad = sorted(name for name in saved if saved[name] != now.get(name))
    if bad:
        raise CorruptCheckpointError(
            f"checkpoint {step} in {directory} is corrupt: {len(bad)} file(s) changed, "
            f"truncated or missing since it was written ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}).",
            step,
        )
    return True


def verify_arrays(directory: str, step: int, state: Any, metadata: Mapping[str, Any]) -> None:
    """Compares the restored arrays with the hashes saved with them (if any)."""
    saved = metadata.get(HASHES_KEY)
    if not saved:
        return  # written before hashes were recorded
    now = array_hashes(state)
    bad = sorted(p for p in set(saved) | set(now) if saved.get(p) != now.get(p))
    if bad:
        raise CorruptCheckpointError(
            f"checkpoint {step} in {directory} is corrupt: {len(bad)} saved array(s) "
            f"differ from the hashes recorded when it was written ({', '.join(bad[:4])}"
            f"{', ...' if len(bad) > 4 else ''}).",
            step,
        )


def check_structure(directory: str, step: int, saved: Any, target: Any) -> None:
    """Compares the saved tree's paths and shapes with ``target``'s before restoring."""
    if saved is None:
        raise CheckpointError(f"checkpoint {step} in {directory} has no saved state.")
    saved_shapes = _shapes_by_path(saved)
    target_shapes = _shapes_by_path(target)
    if saved_shapes == target_shapes:
        return
    missing = sorted(set(target_shapes) - set(saved_shapes))
    extra = sorted(set(saved_shapes) - set(target_shapes))
    changed = sorted(
        p for p in set(saved_shapes) & set(target_shapes) if saved_shapes[p] != target_shapes[p]
    )
    raise CheckpointError(
        f"checkpoint {step} in {directory} does not match this model's state: "
        f"missing {missing[:5]}, unexpected {extra[:5]}, different shapes "
        f"{[(p, saved_shapes[p], target_shapes[p]) for p in changed[:5]]}. It is a "
        "checkpoint of another model or configuration; use a fresh workdir."
    )


def set_aside(directory: str, step: int) -> str:
    """Moves step ``step`` to ``<directory>.corrupt/<step>`` (process 0; all processes
    wait for it); returns where it went."""
    aside = os.path.join(directory + ".corrupt", str(step))
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        if os.path.exists(aside):
            shutil.rmtree(aside)
        os.replace(os.path.join(directory, str(step)), aside)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"ood_jax_checkpoint_aside_{step}")
    return aside


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(path): tuple(getattr(x, "shape", ())) for path, x in leaves}
