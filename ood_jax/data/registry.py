"""Datasets by name: one :class:`DatasetSpec` per dataset, and :func:`load_dataset`.

A spec says where a dataset comes from (tfds, offline files in the data folder,
or only files the user brings), its class count and normalization, and, for an
in-distribution dataset, its default OOD suites (from tfds and without it) and the
objective hyperparameters the papers set differently for it. :func:`spec_for_source`
says which spec's data a run reads (offline, ``cifar10`` is read as ``cifar10_jpeg``).
Adding a dataset is one :func:`register_dataset` call; the experiments, the
evaluation and the CLI find it by name (``--config.data.dataset=NAME``, ``--ood_sets NAME``).

Registered here:

* in-distribution: ``cifar10`` and ``cifar100`` (tfds; ``--data PATH`` reads
  ``<name>_{train,test}.npz`` or ``<split>/<class>/`` image folders), and
  ``cifar10_jpeg``, the offline CIFAR-10 re-encoded as JPEG;
* the papers' OOD sets: ``svhn``, ``textures`` (DTD, split ``all`` = the 5,640
  images of the benchmark), ``places365``, ``lsun_crop``, ``lsun_resize``,
  ``isun`` (the last three exist only as the ODIN/OE file releases: pass
  ``local_path=``), ``tinyimagenet_crop`` / ``tinyimagenet_resize`` (offline,
  from the Tiny ImageNet test images), ``textures_partial`` (offline stand-in);
* auxiliary outliers: ``tinyimagenet_train`` (offline Tiny ImageNet train subset).

Names with a prefix bypass the registry: ``tfds:<tfds name>``,
``lsun_<category>`` (tfds ``lsun/<category>``), ``npz:<file>``, ``folder:<root>``.

Normalization: the LogitNorm, energy and Outlier Exposure repositories use the
CIFAR-10 constants (mean (125.3, 123.0, 113.9)/255, std (63.0, 62.1, 66.7)/255)
for CIFAR-100 as well, so both specs carry them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ood_jax.data import decode, tinyimagenet
from ood_jax.data.dataset import CIFAR10_MEAN, CIFAR10_STD, ImageDataset
from ood_jax.data.sources import (
    default_data_dir,
    from_any_folder,
    from_folder,
    from_npz,
    from_tfds,
    limit_indices,
    open_npz,
)
from ood_jax.registry import Registry

Loader = Callable[..., ImageDataset]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything ood_jax knows about one dataset name.

    Attributes:
      name: registry name.
      display: name for reports, e.g. ``"CIFAR-10 (JPEG)"``.
      num_classes: classes (0 for unlabelled OOD sets); local files are checked against it.
      mean, std: per-channel normalization in [0, 1] units (for in-distribution sets).
      tfds_name: the tfds dataset, or None.
      tfds_splits: our split name -> tfds split expression (e.g. ``"all"``).
      offline: split -> file name in the offline data folder, or None.
      offline_loader: ``(path, split, *, limit, cache_dir) -> ImageDataset`` for the
        offline files (default: :func:`~ood_jax.data.from_npz`).
      offline_alternative: an offline stand-in's name: suggested when tfds fails, and
        what :func:`spec_for_source` gives for ``"local"``.
      local_only: only files the user brings (``local_path=``) can provide it.
      loader: a custom source, ``loader(split, *, limit, data_dir) -> ImageDataset``
        (generated data, another file format); used when given.
      ood_suite: default OOD sets when this is the in-distribution set.
      offline_ood_suite: default OOD sets when the data does not come from tfds (the
        offline files, the user's folder), if they differ: such a run must not start a
        tfds download. () = ``ood_suite``. See :meth:`default_ood_sets`.
      objective_hparams: ``{objective: {hparam: value}}`` where the papers set a
        value for this dataset (e.g. CIFAR-100's energy margins).
    """

    name: str
    display: str
    num_classes: int
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    tfds_name: str | None = None
    tfds_splits: Mapping[str, str] = field(default_factory=dict)
    offline: Mapping[str, str] | None = None
    offline_loader: Loader | None = None
    offline_alternative: str | None = None
    local_only: bool = False
    loader: Loader | None = None
    ood_suite: tuple[str, ...] = ()
    offline_ood_suite: tuple[str, ...] = ()
    objective_hparams: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def default_ood_sets(self, source: str) -> tuple[str, ...]:
        """The default OOD suite of a run reading this dataset from ``source``.

        ``source`` as ``config.data.source``: ``"tfds"`` gives ``ood_suite``; ``"local"``
        or a folder gives ``offline_ood_suite`` when set, else ``ood_suite``.
        """
        if source != "tfds" and self.offline_ood_suite:
            return self.offline_ood_suite
        return self.ood_suite


_REGISTRY: Registry[DatasetSpec] = Registry(
    "dataset",
    "ood_jax.data.register_dataset (or a prefixed name tfds:<name>, lsun_<category>, "
    "npz:<file>, folder:<root>)",
)


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Add ``spec`` under ``spec.name`` (unique unless ``replace=True``)."""
    return _REGISTRY.add(spec, replace=replace)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The registered spec of ``name``."""
    return _REGISTRY.get(name)


def available_datasets() -> tuple[str, ...]:
    """Registered dataset names, in registration order."""
    return _REGISTRY.names()


def spec_for_source(name: str, source: str) -> DatasetSpec:
    """The spec of the data a run reads for dataset ``name`` from ``source``.

    ``source`` as ``config.data.source``: ``"local"`` (the offline files) gives
    ``name``'s own spec when it has offline files, else its offline stand-in's
    (``offline_alternative``: ``cifar10`` -> ``cifar10_jpeg``, the same images
    re-encoded as JPEG, so results name what was really read); ``"tfds"`` or a folder
    of the user's files gives ``name``'s own spec.

    Raises:
      ValueError: unknown ``name``, or ``"local"`` for a dataset with neither offline
        files nor an offline stand-in.
    """
    spec = get_dataset_spec(name)
    if source != "local" or spec.offline is not None:
        return spec
    if spec.offline_alternative is None:
        raise ValueError(
            f"{name!r} has no offline files here; read it from tfds (needs internet) or "
            f"from a folder with {name}_{{train,test}}.npz or {{train,test}}/<class>/ images."
        )
    return get_dataset_spec(spec.offline_alternative)


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    local_path: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    resize: str | None = None,
    require_labels: bool = True,
) -> ImageDataset:
    """Loads a named split as an in-memory :class:`ImageDataset` (see the module docstring).

    Args:
      name: a registered name, or ``tfds:<name>``, ``lsun_<category>``, ``npz:<file>``,
        ``folder:<root>``.
      split: split name (``"train"``, ``"test"``, a tfds slice such as ``"test[:2000]"``).
      data_dir: folder of the offline npz files (default ``$OOD_JAX_DATA_DIR`` or
        the offline data folder).
      local_path: the user's files for ``name`` (an .npz file, or a folder holding
        ``<split>/<class>/`` images); takes precedence over every other source. Labels
        are checked against the spec's class count.
      tfds_data_dir: tfds ``data_dir``.
      limit: read only ``limit`` images: from npz files (the offline ones, ``npz:``,
        ``local_path``) and folders a seeded random subset in file order
        (:func:`~ood_jax.data.sources.limit_indices`; the offline files are sorted by
        class, so the first images would be one class), from tfds the split's first
        ``limit`` (``split[:limit]``, in tfds's own order).
      cache_dir: decoded-array cache folder (``""`` disables).
      resize: the rule for the user's images that are not 32x32 (``npz:``, ``folder:``,
        ``local_path=``; :data:`~ood_jax.data.decode.RESIZE_RULES`). Default: folders
        and ``npz:`` files ``"shorter_side_crop"`` (shorter side to 32, bilinear, centre
        crop), a ``local_path=`` .npz file ``"none"`` (other sizes are an error). Other
        sources have their own rule; giving one for them is an error.
      require_labels: False for an OOD set of the user's (labels mean nothing there):
        an npz file without ``labels`` is read with labels -1, and a folder
        without the ``<split>/<class>/`` layout is read whole: ``root/<split>`` if it
        exists, else ``root``, every image file at any depth, labels -1
        (:func:`~ood_jax.data.sources.from_any_folder`). True (in-distribution data)
        refuses both, saying why.

    Raises:
      ValueError: unknown name (the message lists the known ones), bad split, bad file.
      DatasetUnavailableError: a tfds dataset cannot be loaded or downloaded.
    """
    if resize is not None and resize not in decode.RESIZE_RULES:
        raise ValueError(
            f"load_dataset({name!r}): `resize` must be one of {decode.RESIZE_RULES}, got "
            f"{resize!r}."
        )
    spec = _REGISTRY.get(name) if name in _REGISTRY else None

    def folder(root, default_name):
        rule = resize or "shorter_side_crop"
        if require_labels:
            return from_folder(root, split, name=default_name, resize=rule, limit=limit)
        return from_any_folder(root, split, name=default_name, resize=rule, limit=limit)

    if local_path is not None:
        num_classes = spec.num_classes if spec is not None and spec.num_classes else None
        local = Path(local_path)
        if local.is_dir():
            ds = folder(local, name)
            if require_labels and num_classes is not None and ds.num_classes != num_classes:
                raise ValueError(
                    f"load_dataset({name!r}): {str(local)!r} has {ds.num_classes} class "
                    f"folders under {split}/, but {name} has {num_classes} classes."
                )
            return ds
        return from_npz(
            local,
            name=name,
            num_classes=num_classes,
            resize=resize or "none",
            limit=limit,
            cache_dir=cache_dir,
            require_labels=require_labels,
        )
    if name.startswith("npz:"):
        return from_npz(
            name[4:],
            resize=resize or "shorter_side_crop",
            limit=limit,
            cache_dir=cache_dir,
            require_labels=require_labels,
        )
    if name.startswith("folder:"):
        return folder(name[7:], None)
    if resize is not None:
        raise ValueError(
            f"load_dataset({name!r}): `resize` applies to your own files (npz:<file>, "
            "folder:<root>, local_path=); this source has its own rule (docs/data.md)."
        )
    if name.startswith("tfds:"):
        return _from_tfds(name, name[5:], split, limit=limit, tfds_data_dir=tfds_data_dir)
    if spec is None and name.startswith("lsun_"):
        return _from_tfds(name, f"lsun/{name[5:]}", split, limit=limit, tfds_data_dir=tfds_data_dir)
    spec = get_dataset_spec(name)
    if spec.loader is not None:
        return spec.loader(split, limit=limit, data_dir=data_dir)
    if spec.local_only:
        raise ValueError(
            f"load_dataset({name!r}): this set (the ODIN / Outlier Exposure release) is not in "
            "tfds; download it and pass local_path= (a folder <root>/<split>/<class>/*.jpg|png, "
            "or an .npz file in a docs/data.md format), or name it folder:<root> / npz:<file>."
        )
    if spec.offline is not None:
        return _offline(spec, split, data_dir, limit, cache_dir)
    return _from_tfds(
        name,
        spec.tfds_name,
        spec.tfds_splits.get(split, split),
        limit=limit,
        tfds_data_dir=tfds_data_dir,
        num_classes=spec.num_classes or None,
        offline=spec.offline_alternative,
    )


def _from_tfds(name, tfds_name, split, *, limit, tfds_data_dir, num_classes=None, offline=None):
    if limit is not None:
        if "+" in split or "[" in split:
            raise ValueError(
                f"load_dataset({name!r}): `limit` cannot be combined with the sliced or "
                f"combined split {split!r}; slice the split itself instead."
            )
        split = f"{split}[:{limit}]"
    return from_tfds(
        tfds_name,
        split,
        name=name,
        data_dir=tfds_data_dir,
        num_classes=num_classes,
        offline=offline,
    )


def _offline(spec: DatasetSpec, split: str, data_dir, limit, cache_dir) -> ImageDataset:
    if split not in spec.offline:
        raise ValueError(
            f"load_dataset({spec.name!r}): `split` must be one of {tuple(spec.offline)}, "
            f"got {split!r}."
        )
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if data_dir is None:
        raise ValueError(
            f"load_dataset({spec.name!r}): no offline data folder; set OOD_JAX_DATA_DIR or pass "
            "data_dir= (the folder holding the offline npz files)."
        )
    path = data_dir / spec.offline[split]
    if not path.is_file():
        raise ValueError(
            f"load_dataset({spec.name!r}): missing file {str(path)!r}; set OOD_JAX_DATA_DIR or "
            "data_dir= to the folder holding it."
        )
    if spec.offline_loader is not None:
        return spec.offline_loader(path, split, name=spec.name, limit=limit, cache_dir=cache_dir)
    return from_npz(
        path, name=spec.name, num_classes=spec.num_classes, limit=limit, cache_dir=cache_dir
    )


def _tiny_imagenet(view: str) -> Loader:
    """Loader of the Tiny ImageNet files: 64x64 JPEGs -> ``crop`` / ``resize`` / ``train``."""

    def load(path: Path, split: str, *, name: str, limit, cache_dir) -> ImageDataset:
        with open_npz(path) as data:
            offsets, encoded = data["offsets"], data["encoded"]
            chosen = limit_indices(offsets.size - 1, limit)
            labels = data["labels"][chosen].astype(np.int32)
            num_classes = len(data["label_names"])
        build = lambda: {
            "images": decode.decode_encoded(
                encoded,
                offsets,
                size=(64, 64),
                resize="none",
                where=str(path),
                indices=chosen,
            )
        }
        if limit is None:
            images = decode.cached(path, build, key="rgb64", cache_dir=cache_dir)["images"]
        else:
            images = build()["images"]
        if view == "crop":
            images = tinyimagenet.random_crop_32(images, crop_seed=0)
        else:
            images = tinyimagenet.box_downsample_2x(images)
        return ImageDataset(images, labels, name=name, num_classes=num_classes, source=str(path))

    return load


# Offline (docs/data.md): the CIFAR OOD sets whose files are in the offline data folder.
_CIFAR_OOD = ("tinyimagenet_crop", "tinyimagenet_resize", "textures_partial")
# From tfds: the papers' sets that tfds serves without manual downloads (Places365 is
# 24 GB; LSUN-crop/resize and iSUN need local files: add them with eval.ood_sets).
_CIFAR_OOD_TFDS = ("svhn", "textures")

for _spec in (
    DatasetSpec(
        "cifar10",
        "CIFAR-10",
        10,
        tfds_name="cifar10",
        offline_alternative="cifar10_jpeg",
        ood_suite=_CIFAR_OOD_TFDS,
        offline_ood_suite=_CIFAR_OOD,
    ),
    DatasetSpec(
        "cifar10_jpeg",
        "CIFAR-10 (JPEG)",
        10,
        offline={"train": "cifar10_train.npz", "test": "cifar10_test.npz"},
        ood_suite=_CIFAR_OOD,
    ),
    DatasetSpec(
        "cifar100",
        "CIFAR-100",
        100,
        tfds_name="cifar100",
        ood_suite=_CIFAR_OOD_TFDS,
        # Liu et al.'s run script uses -27/-5 on CIFAR-100; LogitNorm's authors report that
        # tau = 0.04 fails there and recommend about 0.0085.
        objective_hparams={
            "energy": {"m_in": -27.0, "m_out": -5.0},
            "logitnorm": {"temperature": 0.0085},
        },
    ),
    DatasetSpec("svhn", "SVHN", 10, tfds_name="svhn_cropped"),
    DatasetSpec(
        "textures",
        "Textures",
        47,
        tfds_name="dtd",
        tfds_splits={"all": "train+validation+test"},
        offline_alternative="textures_partial",
    ),
    DatasetSpec("places365", "Places365", 365, tfds_name="places365_small"),
    DatasetSpec("lsun_crop", "LSUN-crop", 0, local_only=True),
    DatasetSpec("lsun_resize", "LSUN-resize", 0, local_only=True),
    DatasetSpec("isun", "iSUN", 0, local_only=True),
    DatasetSpec(
        "tinyimagenet_crop",
        "TinyImageNet-crop",
        0,
        offline={"test": "tinyimagenet_test.npz"},
        offline_loader=_tiny_imagenet("crop"),
    ),
    DatasetSpec(
        "tinyimagenet_resize",
        "TinyImageNet-resize",
        0,
        offline={"test": "tinyimagenet_test.npz"},
        offline_loader=_tiny_imagenet("resize"),
    ),
    DatasetSpec(
        "tinyimagenet_train",
        "Tiny ImageNet train (100 per class)",
        202,
        offline={"train": "tinyimagenet_train_100perclass.npz"},
        offline_loader=_tiny_imagenet("resize"),
    ),
    DatasetSpec(
        "textures_partial",
        "Textures (10 classes, offline)",
        10,
        offline={"test": "textures_partial.npz"},
    ),
):
    register_dataset(_spec)
