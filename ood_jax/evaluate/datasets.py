"""OOD sets by name: real datasets via ``ood_jax.data.load_dataset`` and the synthetic sets.

Synthetic names (``ood_jax.data.synthetic``, seeded, ``num`` images each):
``gaussian``, ``uniform``, ``rademacher``, ``blobs`` (Outlier Exposure's
test-time noise), ``lowpass_uniform`` and ``permuted_pixels`` (Hein et al.'s
low-pass noise; the latter permutes the in-distribution test images). Any other
name goes to :func:`ood_jax.data.load_dataset`, optionally with a split as
``name:split`` (default split ``test``), e.g. ``tinyimagenet_crop``,
``textures_partial``, ``svhn``, ``textures:all``.

The user's own sets: ``npz:<file>`` (one file, one split), ``folder:<root>``,
``tfds:<name>`` (split ``test``), or a plain path to an ``.npz`` file or a folder.
``folder:`` and ``tfds:`` names take a split as a last ``:split``
(``tfds:svhn_cropped:train``, ``folder:/data/own:val``). Labels mean nothing for an
OOD set, so the user's files need none:

* an npz file may leave ``labels`` out (they are -1); its ``images`` may be any size,
  grayscale ``[N, H, W]`` / ``[N, H, W, 1]``, RGB or RGBA ``[N, H, W, 4]`` (uint8,
  channels last);
* a folder is read as ``root/<split>/<class>/<image>`` with class labels when it has
  that layout, else whole: ``root/<split>`` if that folder exists (a split given in the
  name must exist), else ``root``, every image file at any depth, sorted by path,
  hidden files skipped, labels -1 (:func:`ood_jax.data.sources.image_files`).

Images of the user's files that are not 32x32 are converted by a size rule
(:data:`ood_jax.data.decode.RESIZE_RULES`): ``shorter_side_crop`` by default (shorter
side to 32, bilinear, centre crop, as Hendrycks' OOD loaders), ``center_crop``,
``squash``, ``box`` or ``none`` (refuse them). A name chooses its own as a last
``@<rule>`` (``npz:/data/own64.npz@center_crop``, ``folder:/data/own:val@squash``,
``/data/mnist.npz@squash``; :func:`with_resize` writes it), which wins over
``load_ood_sets(..., resize=)``. The set's ``source`` (the report's ``data`` entry)
says how many images the rule changed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ood_jax import data as D
from ood_jax.data.decode import RESIZE_RULES

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


def split_resize_rule(name: str) -> tuple[str, str | None]:
    """``(name, rule)`` of an OOD set name ending in ``@<rule>`` (``rule`` one of
    :data:`RESIZE_RULES`), else ``(name, None)``: ``npz:/d/own.npz@squash`` ->
    ``("npz:/d/own.npz", "squash")``; an ``@`` followed by anything else is the name's."""
    base, mark, rule = name.rpartition("@")
    if mark and base and rule in RESIZE_RULES:
        return base, rule
    return name, None


def is_own_files(name: str) -> bool:
    """Whether an OOD set name (a ``@<rule>`` aside) names the user's own files:
    ``npz:<file>``, ``folder:<root>`` or a plain path."""
    name, _ = split_resize_rule(name)
    return name.startswith(_FILE_PREFIXES) or (_is_path(name) and not name.startswith(_PREFIXES))


def with_resize(name: str, rule: str) -> str:
    """``name@rule`` for the user's own files without a rule of their own, else ``name``
    unchanged (other sets have their own conversion; a rule in the name wins)."""
    if rule not in RESIZE_RULES:
        raise ValueError(f"unknown resize rule {rule!r}; the rules: {', '.join(RESIZE_RULES)}.")
    if is_own_files(name) and split_resize_rule(name)[1] is None:
        return f"{name}@{rule}"
    return name


def _parse_name(name: str) -> tuple[str, str, bool]:
    """``(load_dataset name, split, split given in the name)`` of an OOD set name
    (synthetic names and ``@<rule>`` excluded)."""
    if _is_path(name) and not name.startswith(_PREFIXES):
        return ("npz:" if name.endswith(".npz") else "folder:") + name, "test", False
    if name.startswith("npz:"):
        return name, "test", False  # the file is the split; a path may hold ':'
    if name.startswith(("tfds:", "folder:")):
        prefix, rest = name.split(":", 1)
        base, colon, split = rest.rpartition(":")
        if colon and base and os.sep not in split:
            return f"{prefix}:{base}", split, True
        return name, "test", False
    base, _, split = name.partition(":")
    return base, split or "test", bool(split)


def _dataset_and_split(name: str) -> tuple[str, str]:
    """``(load_dataset name, split)`` of an OOD set name (synthetic names excluded)."""
    dataset, split, _ = _parse_name(name)
    return dataset, split


def _check_user_path(name: str) -> None:
    base, _ = split_resize_rule(name)
    dataset, split, explicit = _parse_name(base)
    path = dataset.split(":", 1)[1]
    hint = ""
    if "@" in os.path.basename(path):
        rule = path.rpartition("@")[2]
        hint = f" ('@{rule}' is not a resize rule; the rules: {', '.join(RESIZE_RULES)}.)"
    if dataset.startswith("npz:") and not os.path.isfile(path):
        raise ValueError(f"OOD set {name!r}: no file {path!r}; give an existing .npz file.{hint}")
    if dataset.startswith("folder:"):
        if not os.path.isdir(path):
            raise ValueError(
                f"OOD set {name!r}: no folder {path!r}; give a folder holding images.{hint}"
            )
        _check_split_folder(name, path, split, explicit)


def _check_split_folder(name: str, root: str, split: str, explicit: bool) -> None:
    """A split named in a folder set's name must exist (without one the folder is read
    whole when it has no ``test/``)."""
    if explicit and os.path.isdir(root) and not os.path.isdir(os.path.join(root, split)):
        raise ValueError(
            f"OOD set {name!r}: no split folder {os.path.join(root, split)!r}; leave the "
            f"':{split}' out to read every image under {root!r}, or name an existing split."
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
        if is_own_files(name):
            _check_user_path(name)
            continue
        if split_resize_rule(name)[1] is not None:
            raise ValueError(
                f"OOD set {name!r}: a resize rule (@{split_resize_rule(name)[1]}) applies only "
                "to your own files (npz:<file>, folder:<root>, a path); other sets have "
                "their own conversion to 32x32."
            )
        base = name.partition(":")[0] if not name.startswith(_PREFIXES) else name
        if base in SYNTHETIC_NAMES or name.startswith(_PREFIXES):
            continue
        if base not in D.available_datasets():
            raise ValueError(
                f"unknown OOD set {name!r}; synthetic sets: {', '.join(SYNTHETIC_NAMES)}; "
                f"datasets: {', '.join(D.available_datasets())} (or tfds:<name>, npz:<file>, "
                "folder:<root>, or a path to an .npz file or an image folder, each with an "
                "optional @<resize rule>)."
            )


def load_ood_set(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    num_synthetic: int = 2000,
    seed: int = 0,
    id_test: D.ImageDataset | None = None,
    resize: str | None = None,
) -> D.ImageDataset:
    """One OOD set by name (see the module docstring).

    Args:
      name: a synthetic name, or a ``load_dataset`` name with an optional ``:split``;
        the user's own files may end in ``@<rule>``.
      data_dir: folder of the offline npz files (default: ``load_dataset``'s).
      num_synthetic: images per synthetic set.
      seed: seed of the synthetic sets.
      id_test: source images of ``permuted_pixels``.
      resize: the size rule of the user's own files whose name has none (default
        ``"shorter_side_crop"``); other sets keep their own.

    Raises:
      ValueError: unknown name, missing file, or an empty set.
    """
    if name == "permuted_pixels" and id_test is None:
        raise ValueError("load_ood_set('permuted_pixels'): pass id_test= (source images).")
    if name in SYNTHETIC_NAMES:
        return D.make_synthetic(name, num_synthetic, seed=seed, source=id_test)
    if resize is not None and resize not in RESIZE_RULES:
        raise ValueError(
            f"load_ood_set({name!r}): `resize` must be one of {RESIZE_RULES}, got {resize!r}."
        )
    plain, rule = split_resize_rule(name)
    own = is_own_files(plain)
    if rule is not None and not own:
        raise ValueError(
            f"OOD set {name!r}: a resize rule (@{rule}) applies only to your own files "
            "(npz:<file>, folder:<root>, a path); other sets have their own conversion."
        )
    base, split, explicit = _parse_name(plain)
    options = {}
    if own:
        options = {"resize": rule or resize, "require_labels": False}
        if base.startswith("folder:"):
            _check_split_folder(name, base[7:], split, explicit)
    try:
        ds = D.load_dataset(base, split, data_dir=data_dir, **options)
    except ValueError as err:
        others = "" if own else f" Synthetic sets: {', '.join(SYNTHETIC_NAMES)}."
        raise ValueError(f"OOD set {name!r}: {err}{others}") from err
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
    resize: str | None = None,
) -> dict[str, D.ImageDataset]:
    """``{name: ImageDataset}`` for every name (duplicates rejected); ``resize``: the
    size rule of the user's own files whose name has none (:func:`load_ood_set`)."""
    if not names:
        raise ValueError(f"ood_sets: no OOD set names given; e.g. {', '.join(OFFLINE_OOD_SETS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"ood_sets: duplicate names in {list(names)}.")
    return {
        n: load_ood_set(
            n,
            data_dir=data_dir,
            num_synthetic=num_synthetic,
            seed=seed,
            id_test=id_test,
            resize=resize,
        )
        for n in names
    }
