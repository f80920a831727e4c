"""The data of a run: in-distribution splits, auxiliary outliers, report labels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from experiments import cli
from experiments.run_config import trains
from ood_jax import data as D
from ood_jax.train import get_objective

# Auxiliary outlier set -> OOD test sets that share its classes.
NEAR_AUXILIARY = {"tinyimagenet_train": ("tinyimagenet_crop", "tinyimagenet_resize")}


def load_splits(
    config: ml_collections.ConfigDict, *, data_dir: str | None = None
) -> tuple[D.ImageDataset, D.ImageDataset]:
    """The train and test splits named by ``config.data`` (dataset, source, limits).

    ``source``: ``tfds``; ``local`` (the dataset's offline files, or its offline
    stand-in such as ``cifar10_jpeg``); or a folder holding
    ``<dataset>_{train,test}.npz`` or ``{train,test}/<class>/`` images. A limit keeps a
    seeded random subset (the offline files are sorted by class). ``data_dir``: the
    offline files' folder (default ``$OOD_JAX_DATA_DIR`` or ``../shared/data``).
    """
    name, source = config.data.dataset, config.data.source
    try:
        spec = D.spec_for_source(name, source)
    except ValueError as err:
        raise cli.UsageError(f"--data {source}: {err}") from None
    out = []
    for split, limit in (("train", config.data.train_limit), ("test", config.data.test_limit)):
        if source in ("tfds", "local"):
            ds = D.load_dataset(spec.name, split, data_dir=data_dir)
        else:
            path = Path(source)
            if not path.is_dir():
                raise cli.UsageError(
                    f"--data {source!r}: expected 'tfds', 'local' or a folder holding "
                    f"{name}_train.npz and {name}_test.npz (or train/ and test/ image folders); "
                    + ("that is a file, not a folder." if path.exists() else "no such folder.")
                )
            npz = path / f"{name}_{split}.npz"
            if not npz.is_file() and not (path / split).is_dir():
                raise cli.UsageError(
                    f"--data {source!r}: found neither {npz.name} nor a {split}/<class>/ image "
                    f"folder there; put the {name} files in that folder or choose another."
                )
            ds = D.load_dataset(name, split, local_path=npz if npz.is_file() else path)
        out.append(D.random_subset(ds, limit, seed=config.seed))
    return out[0], out[1]


def load_outliers(config: ml_collections.ConfigDict) -> D.ImageDataset:
    """The auxiliary outlier set of ``config.data.outliers`` (name, or file/folder path)."""
    source = config.data.outliers.source
    if os.path.exists(source):
        return D.load_outliers(Path(source).stem, config.data.outliers.split, local_path=source)
    return D.load_outliers(source, config.data.outliers.split)


def near_auxiliary_notes(config: ml_collections.ConfigDict, names: Sequence[str]) -> dict:
    """``{set: "near-auxiliary"}`` for OOD sets whose classes the training outliers share.

    Training with the Tiny ImageNet train subset as auxiliary outliers puts
    TinyImageNet-crop/resize's classes into training; the report must say so. A model
    evaluated without its training run (its config has no objective) has none.
    """
    if not trains(config) or not get_objective(config.objective.name).uses_outliers:
        return {}
    overlap = NEAR_AUXILIARY.get(Path(config.data.outliers.source).stem, ())
    return {n: "near-auxiliary" for n in names if n.partition(":")[0] in overlap}


def display_name(ds: D.ImageDataset) -> str:
    """Report name of a loaded split: its spec's (``CIFAR-10 (JPEG)``), else its name."""
    return D.get_dataset_spec(ds.name).display if ds.name in D.available_datasets() else ds.name
