"""Auxiliary outlier stream for outlier exposure and energy fine-tuning.

Energy fine-tuning (Liu et al., 2020) and Outlier Exposure (Hendrycks et al.,
2019) pair each in-distribution batch of 128 with 256 auxiliary images
(``ratio = 2``). The papers drew them from 80 Million Tiny Images (withdrawn);
offline we use the Tiny ImageNet train subset of the offline data folder
(``load_dataset("tinyimagenet_train", "train")``: 20,200 images, 64x64 JPEG,
grayscale replicated to RGB, downsampled to 32x32 by a 2x2 box average, see
:mod:`ood_jax.data.tinyimagenet`). Its classes overlap Tiny ImageNet test, so
TinyImageNet-crop/resize results after such training are "near-auxiliary".
Any other :class:`ImageDataset` (tfds, folder, npz) works the same way.

The stream is a :class:`~ood_jax.data.pipeline.TrainIterator` over the outlier
set with global batch ``ratio * in_batch_size``, its own SeedSequence tags (so
it is independent of the in-distribution stream even with the same seed), the
same random crop + flip as the authors' outlier loaders, labels -1, and the
same determinism/resume contract: outlier batch ``s`` goes with in-distribution
batch ``s``; resume both from the same step.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ood_jax.data.dataset import ImageDataset
from ood_jax.data.pipeline import PlanIterator, TrainIterator
from ood_jax.data.registry import load_dataset

_OUTLIER_STREAM = 1


def load_outliers(
    name: str = "tinyimagenet_train",
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    local_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    limit: int | None = None,
) -> ImageDataset:
    """Loads an outlier set through :func:`~ood_jax.data.load_dataset`, labels set to -1."""
    ds = load_dataset(
        name, split, data_dir=data_dir, local_path=local_path, cache_dir=cache_dir, limit=limit
    )
    return _unlabeled(ds, name=f"{ds.name}_outliers")


def _unlabeled(ds: ImageDataset, *, name: str) -> ImageDataset:
    """The same images with labels -1: outlier classes are not in-distribution classes."""
    labels = np.full((len(ds),), -1, np.int32)
    return ImageDataset(ds.images, labels, name=name, num_classes=0, source=ds.source)


def outlier_iterator(
    dataset: ImageDataset, *, in_batch_size: int, ratio: int = 2, plans: bool = False, **kwargs: Any
) -> TrainIterator:
    """Yields ``ratio * in_batch_size // process_count`` outlier images per step for this process.

    Args:
      dataset: the outlier set (e.g. :func:`load_outliers`); its labels are replaced by -1.
      in_batch_size: global in-distribution batch size.
      ratio: outlier images per in-distribution image (2 = 256 per 128, the papers').
      plans: yield the steps' plans instead of pixels (:class:`~ood_jax.data.PlanIterator`),
        for a train step with the outliers on the device (:mod:`ood_jax.data.device`).
      **kwargs: ``seed``, ``start_step``, ``augment``, ``process_index``,
        ``process_count``, ``prefetch``, ``mean``, ``std`` as for
        :class:`~ood_jax.data.TrainIterator` (this is its outlier stream).
    """
    if not isinstance(ratio, int | np.integer) or ratio < 1:
        raise ValueError(
            f"`ratio` must be a positive int (outliers per in-distribution image), got {ratio!r}."
        )
    if not isinstance(in_batch_size, int | np.integer) or in_batch_size < 1:
        raise ValueError(f"`in_batch_size` must be a positive int, got {in_batch_size!r}.")
    if (dataset.labels != -1).any():
        dataset = _unlabeled(dataset, name=dataset.name)
    iterator = PlanIterator if plans else TrainIterator
    return iterator(
        dataset, batch_size=int(ratio * in_batch_size), stream=_OUTLIER_STREAM, **kwargs
    )
