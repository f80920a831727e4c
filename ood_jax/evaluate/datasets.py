"""OOD sets by name: real datasets via ``ood_jax.data.load_dataset`` and the synthetic sets.

Synthetic names (``ood_jax.data.synthetic``, seeded, ``num`` images each):
``gaussian``, ``uniform``, ``rademacher``, ``blobs`` (Outlier Exposure's
test-time noise), ``lowpass_uniform`` and ``permuted_pixels`` (Hein et al.'s
low-pass noise; the latter permutes the in-distribution test images). Any other
name goes to :func:`ood_jax.data.load_dataset`, optionally with a split as
``name:split`` (default split ``test``), e.g. ``tinyimagenet_crop``,
``textures_partial``, ``svhn``, ``textures:all``.

The user's own sets: ``npz:<file>`` (one file, one split), ``folder:<root>``
(``root/test/<class>/*.png|jpg``), ``tfds:<name>`` (split ``test``), or a plain
path to an ``.npz`` file or such a folder. ``folder:`` and ``tfds:`` names take a
split as a last ``:split`` (``tfds:svhn_cropped:train``, ``folder:/data/own:val``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ood_jax import data as D

SYNTHETIC_NAMES: tuple[str, ...] = D.SYNTHETIC_OOD_SETS
#: The CIFAR-10 OOD sets available offline here (docs/data.md): its default suite
#: without tfds, and the synthetic sets.
OFFLINE_OOD_SETS: tuple[str, ...] = (
    *D.get_dataset_spec("cifar10").default_ood_sets("local"),
    *SYNTHETIC_NAMES,
)


_FILE_PREFIXES = ("npz:", "folder:")
_PREFIXES = ("tfds:", *_FILE_PREFIXES, "lsun_")


def _is_path(name: str) -> bool:
    """A plain path (``/data/own.npz``, ``./own_set``) rather than a dataset name."""
    return name.endswith(".npz") or os.sep in name or name.startswith(".")


def _dataset_and_split(name: str) -> tuple[str, str]:
    """``(load_dataset name, split)`` of an OOD set name (synthetic names excluded)."""
    if _is_path(name) and not name.startswith(_PREFIXES):
        return ("npz:" if name.endswith(".npz") else "folder:") + name, "test"
    if name.startswith("npz:"):
        return name, "test"  # the file is the split; a path may hold ':'
    if name.startswith(("tfds:", "folder:")):
        prefix, rest = name.split(":", 1)
        base, colon, split = rest.rpartition(":")
        if colon and base and os.sep not in split:
            return f"{prefix}:{base}", split
        return name, "test"
    base, _, split = name.partition(":")
    return base, split or "test"


def _check_user_path(name: str) -> None:
    dataset, _ = _dataset_and_split(name)
    path = dataset.split(":", 1)[1]
    if dataset.startswith("npz:") and not os.path.isfile(path):
        raise ValueError(f"OOD set {name!r}: no file {path!r}; give an existing .npz file.")
    if dataset.startswith("folder:") and not os.path.isdir(path):
        raise ValueError(
            f"OOD set {name!r}: no folder {path!r}; give a folder holding <split>/<class>/ images."
        )


def check_ood_set_names(names: Sequence[str] | None) -> None:
    """Raises ``ValueError`` for a name that is neither synthetic, registered, prefixed nor
    an existing path, or a ``npz:``/``folder:``/plain path that does not exist.

    Cheap (nothing is loaded), so a run can reject a typo before it trains.
    """
    names = list(names or ())
    if len(set(map(repr, names))) != len(names):
        raise ValueError(f"duplicate OOD set names in {names}; name each set once.")
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"OOD set names are strings; got {name!r} ({type(name).__name__}).")
        if name.startswith(_FILE_PREFIXES) or (_is_path(name) and not name.startswith("tfds:")):
            _check_user_path(name)
            continue
        base = name.partition(":")[0] if not name.startswith(_PREFIXES) else name
        if base in SYNTHETIC_NAMES or name.startswith(_PREFIXES):
            continue
        if base not in D.available_datasets():
            raise ValueError(
                f"unknown OOD set {name!r}; synthetic sets: {', '.join(SYNTHETIC_NAMES)}; "
                f"datasets: {', '.join(D.available_datasets())} (or tfds:<name>, npz:<file>, "
                "folder:<root>, or a path to an .npz file or an image folder)."
            )


def load_ood_set(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    num_synthetic: int = 2000,
    seed: int = 0,
    id_test: D.ImageDataset | None = None,
) -> D.ImageDataset:
    """One OOD set by name (see the module docstring).

    Args:
      name: a synthetic name, or a ``load_dataset`` name with an optional ``:split``.
      data_dir: folder of the offline npz files (default: ``load_dataset``'s).
      num_synthetic: images per synthetic set.
      seed: seed of the synthetic sets.
      id_test: source images of ``permuted_pixels``.

    Raises:
      ValueError: unknown name, missing file, or an empty set.
    """
    if name == "permuted_pixels" and id_test is None:
        raise ValueError("load_ood_set('permuted_pixels'): pass id_test= (source images).")
    if name in SYNTHETIC_NAMES:
        return D.make_synthetic(name, num_synthetic, seed=seed, source=id_test)
    base, split = _dataset_and_split(name)
    try:
        ds = D.load_dataset(base, split, data_dir=data_dir)
    except ValueError as err:
        raise ValueError(
            f"OOD set {name!r}: {err} Synthetic sets: {', '.join(SYNTHETIC_NAMES)}."
        ) from err
    if ds.name != name:
        ds = D.ImageDataset(
            ds.images, ds.labels, name=name, num_classes=ds.num_classes, source=ds.source
        )
    return ds


def load_ood_sets(
    names: Sequence[str],
    *,
    data_dir: str | os.PathLike | None = None,
    num_synthetic: int = 2000,
    seed: int = 0,
    id_test: D.ImageDataset | None = None,
) -> dict[str, D.ImageDataset]:
    """``{name: ImageDataset}`` for every name (duplicates rejected)."""
    if not names:
        raise ValueError(f"ood_sets: no OOD set names given; e.g. {', '.join(OFFLINE_OOD_SETS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"ood_sets: duplicate names in {list(names)}.")
    return {
        n: load_ood_set(
            n, data_dir=data_dir, num_synthetic=num_synthetic, seed=seed, id_test=id_test
        )
        for n in names
    }
