"""Published checkpoints: trained models loaded by name, checked against SHA-256 hashes.

    from ood_jax import pretrained
    pretrained.available()                     # ['cifar10_jpeg/resnet9/ce/seed0', ...]
    model = pretrained.load("cifar10_jpeg/resnet9/logitnorm/seed0")   # eval mode
    logits, features = model(images)           # images normalized with info(name)["normalization"]
    pretrained.info("cifar10_jpeg/resnet9/logitnorm/seed0")["test_accuracy"]

A published checkpoint is one ``.npz`` file (the model's parameters and BatchNorm
statistics, float32, keyed ``params/<path>`` and ``batch_stats/<path>``) listed
in ``manifest.json`` beside it with its SHA-256, the model (architecture, class
count, options), the dataset and its normalization, the training config and the
test accuracy measured when it was published. :func:`load` refuses a file whose
hash differs from the manifest's, an unknown name, and a file whose arrays do not
fit the model.

The checkpoints are published in the repository, not in the installed package:
``results/cpu_study/checkpoints`` (the 5-epoch reproduction study) and
``results/regime_study/checkpoints`` (the regime study, names
``cifar10_jpeg/resnet9/regime/...``). Pass ``root=`` (one folder with
``manifest.json``) or set ``OOD_JAX_PRETRAINED`` to such a folder, or to several
joined by ``os.pathsep`` (``:`` on Linux and macOS) like ``PATH``; a name must then
be published in only one of them. The project's commands and notebooks, run from a
checkout, set it to the checkout's folders (:mod:`experiments`).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ood_jax.checkpoint import sha256_file
from ood_jax.checkpoint.integrity import path_str
from ood_jax.models import build_model

MANIFEST = "manifest.json"
ENV = "OOD_JAX_PRETRAINED"
# Where a checkout of the repository keeps them (what the commands default to).
CHECKOUT_SUBDIRS = "results/cpu_study/checkpoints and results/regime_study/checkpoints"
# What load() reads of an entry.
_REQUIRED_FIELDS = ("file", "sha256", "model")


class PretrainedError(ValueError):
    """A published checkpoint that cannot be found or used."""


def default_roots() -> list[Path]:
    """The folders of ``$OOD_JAX_PRETRAINED`` (one, or several joined by
    ``os.pathsep``); a :class:`PretrainedError` saying what to set if unset."""
    folders: list[Path] = []
    for part in os.environ.get(ENV, "").split(os.pathsep):
        # A folder listed twice (or relative and absolute) counts once.
        if part and Path(part).resolve() not in {f.resolve() for f in folders}:
            folders.append(Path(part))
    if not folders:
        raise PretrainedError(
            f"no folder of published checkpoints: pass root= or set {ENV} to a folder with "
            f"{MANIFEST}, or several joined by {os.pathsep!r} (a checkout of the ood_jax "
            f"repository has them in {CHECKOUT_SUBDIRS})."
        )
    return folders


def _read_manifest(folder: Path, listed: bool = False) -> dict[str, dict]:
    path = folder / MANIFEST
    if not path.exists():
        where = f"listed in ${ENV} ({os.environ.get(ENV)})" if listed else "given as root="
        raise PretrainedError(
            f"no published checkpoints at {folder} ({MANIFEST} missing), {where}. Use a "
            f"checkout of the ood_jax repository, or point root= / {ENV} at folders with "
            f"{MANIFEST}."
        )
    try:
        with open(path) as f:
            entries = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PretrainedError(
            f"{path} is not valid JSON ({err}); restore it from git (git checkout -- {path})."
        ) from None
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise PretrainedError(
            f"{path}: expected an object of {{name: entry}} objects; restore it from git."
        )
    return entries


def _manifest(root: str | os.PathLike | None) -> dict[str, tuple[Path, dict]]:
    """``{name: (folder, entry)}`` of ``root``, or of every folder of ``$OOD_JAX_PRETRAINED``."""
    folders = [Path(root)] if root is not None else default_roots()
    found: dict[str, tuple[Path, dict]] = {}
    for folder in folders:
        for name, entry in _read_manifest(folder, listed=root is None).items():
            if name in found:
                raise PretrainedError(
                    f"published checkpoint {name!r} is in both {found[name][0]} and {folder}; "
                    f"keep one of them in {ENV}, or pass root=."
                )
            found[name] = (folder, entry)
    return found


def available(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the published checkpoints."""
    return sorted(_manifest(root))


def info(
    name: str, root: str | os.PathLike | None = None, *, require: Sequence[str] = ()
) -> dict[str, Any]:
    """The manifest entry of ``name``: file, sha256, model, dataset, normalization,
    method, seed, step, test_accuracy, config.

    Raises ``PretrainedError`` if it lacks file, sha256, model or a field of ``require``.
    """
    return dict(_entry(name, root, require)[1])


def _entry(
    name: str, root: str | os.PathLike | None, require: Sequence[str] = ()
) -> tuple[Path, dict]:
    """``name``'s folder and manifest entry (checked for the fields ``load`` and
    ``require`` need)."""
    found = _manifest(root)
    entries = {n: entry for n, (_, entry) in found.items()}
    if name not in entries:
        close = difflib.get_close_matches(name, entries, n=3, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else f" Published: {sorted(entries)[:8]} ..."
        raise PretrainedError(f"unknown published checkpoint {name!r}.{hint}")
    missing = [key for key in (*_REQUIRED_FIELDS, *require) if key not in entries[name]]
    if missing:
        raise PretrainedError(
            f"published checkpoint {name!r}: its {MANIFEST} entry lacks {missing}; restore "
            f"{MANIFEST} from git, or re-export the checkpoint (ood_jax.pretrained.export)."
        )
    return found[name]


def _flatten(tree: Mapping, prefix: str) -> dict[str, np.ndarray]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[f"{prefix}/{path_str(path)}"] = np.asarray(leaf)
    return flat


def _unflatten_like(like: Any, flat: Mapping[str, np.ndarray], prefix: str, where: str) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    out = []
    for path, leaf in leaves:
        key = f"{prefix}/{path_str(path)}"
        if key not in flat:
            raise ValueError(f"{where}: no array {key!r}; the file does not fit this model.")
        value = flat[key]
        if value.shape != tuple(leaf.shape):
            raise ValueError(
                f"{where}: {key} has shape {value.shape}, the model expects {tuple(leaf.shape)}."
            )
        out.append(jnp.asarray(value, dtype=leaf.dtype))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), out) if out else like


def load(name: str, *, root: str | os.PathLike | None = None) -> nnx.Module:
    """The published model ``name`` in evaluation mode, its file checked against the
    manifest's SHA-256.

    Raises:
      PretrainedError (a ValueError): no manifest (see the module docstring), an
        unknown name, a missing file, or a file whose hash differs from the manifest.
      ValueError: arrays that do not fit the model.
    """
    from ood_jax.train.state import split_model

    folder, entry = _entry(name, root)
    path = folder / entry["file"]
    if not path.exists():
        raise PretrainedError(f"published checkpoint {name!r}: {path} is missing.")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise PretrainedError(
            f"published checkpoint {name!r}: {path} has SHA-256 {actual}, the manifest says "
            f"{entry['sha256']}; the file is corrupt or was changed (restore it from git)."
        )
    with np.load(path) as saved:
        flat = {k: saved[k] for k in saved.files}
    model_def, params, batch_stats = split_model(build_model(entry["model"]))
    params = _unflatten_like(params, flat, "params", str(path))
    batch_stats = _unflatten_like(batch_stats, flat, "batch_stats", str(path))
    expected = len(jax.tree.leaves(params)) + len(jax.tree.leaves(batch_stats))
    if expected != len(flat):
        extra = sorted(
            set(flat) - set(_flatten(params, "params")) - set(_flatten(batch_stats, "batch_stats"))
        )
        raise ValueError(f"{path}: arrays the model does not have: {extra[:5]}.")
    return model_def.merge(params, batch_stats, train=False, key=None)


def export(
    folder: str | os.PathLike,
    name: str,
    *,
    params: Any,
    batch_stats: Any,
    entry: Mapping[str, Any],
) -> dict[str, Any]:
    """Writes ``name``'s ``.npz`` under ``folder`` and its entry into ``manifest.json``.

    ``entry`` gives the model identity (``model``), dataset, normalization and
    whatever else describes the run; the file, its SHA-256 and size are added.
    Returns the entry as written.
    """
    folder = Path(folder)
    rel = Path(*name.split("/")).with_suffix(".npz")
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {**_flatten(params, "params"), **_flatten(batch_stats, "batch_stats")}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
    os.replace(tmp, path)
    written = {
        **dict(entry),
        "file": rel.as_posix(),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }
    manifest_path = folder / MANIFEST
    manifest = {}
    if manifest_path.exists():
        with open(manifest_path) as f:
            manifest = json.load(f)
    manifest[name] = written
    tmp_manifest = manifest_path.with_suffix(".json.tmp")
    with open(tmp_manifest, "w") as f:
        json.dump(dict(sorted(manifest.items())), f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp_manifest, manifest_path)
    return written
