"""The in-memory dataset type every source produces, and CIFAR normalization.

Every source (tfds, npz, image folders, NumPy arrays, synthetic noise) ends as
one :class:`ImageDataset`: uint8 images ``[N, 32, 32, 3]`` (NHWC) plus int32
labels ``[N]`` (-1 = no label), so the pipeline has a single code path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

IMAGE_SIZE = 32

#: Per-channel CIFAR-10 mean in [0, 1] units, (125.3, 123.0, 113.9) / 255, the
#: constants of the LogitNorm, energy and Outlier Exposure repositories.
CIFAR10_MEAN: tuple[float, float, float] = (125.3 / 255, 123.0 / 255, 113.9 / 255)
#: Per-channel CIFAR-10 standard deviation in [0, 1] units, (63.0, 62.1, 66.7) / 255.
CIFAR10_STD: tuple[float, float, float] = (63.0 / 255, 62.1 / 255, 66.7 / 255)


def normalize(
    images: np.ndarray,
    *,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> np.ndarray:
    """Maps uint8 images to the network's input space.

    ``out[..., c] = (images[..., c] / 255 - mean[c]) / std[c]``, computed as one
    multiply-add ``images * scale + offset`` (no division in the hot path).

    Args:
      images: uint8 ``[..., 3]`` (channels last), e.g. ``[B, 32, 32, 3]``.
      mean, std: per-channel constants in [0, 1] units (default: CIFAR-10's).

    Returns:
      float32 array of the same shape.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"normalize: `images` must be uint8 in [0, 255], got dtype {images.dtype}; "
            "convert with (x * 255).round().astype(np.uint8) if it holds [0, 1] floats."
        )
    if images.shape[-1:] != (3,):
        raise ValueError(
            f"normalize: `images` must have 3 channels last, got shape {images.shape}."
        )
    mean64, std64 = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    scale = (1.0 / (255.0 * std64)).astype(np.float32)
    offset = (-mean64 / std64).astype(np.float32)
    # Broadcasting a 3-vector makes NumPy's inner loop 3 long (10x slower): tile the
    # constants over a whole image row instead and work in place.
    width = images.shape[-2] if images.ndim >= 2 else 1
    out = images.reshape(-1, width * 3).astype(np.float32)
    out *= np.tile(scale, width)
    out += np.tile(offset, width)
    return out.reshape(images.shape)


def denormalize(
    images: np.ndarray,
    *,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> np.ndarray:
    """Inverse of :func:`normalize`, for plots: float ``[..., 3]`` -> uint8 ``[..., 3]``.

    ``out = clip(round((images * std + mean) * 255), 0, 255)``, so
    ``denormalize(normalize(x)) == x`` for every uint8 ``x``; values outside the
    image range (e.g. after an adversarial perturbation) are clipped.
    """
    images = np.asarray(images, np.float64)
    if images.shape[-1:] != (3,):
        raise ValueError(
            f"denormalize: `images` must have 3 channels last, got shape {images.shape}."
        )
    pixels = (images * np.asarray(std) + np.asarray(mean)) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """A materialized image split.

    Attributes:
      images: uint8 ``[N, 32, 32, 3]`` (read-only view).
      labels: int32 ``[N]``; ``-1`` where there is no label (OOD sets, outliers).
      name: short name, e.g. ``"cifar10"``; used in reports.
      num_classes: number of classes (labels lie in ``[0, num_classes)``), 0 if unlabeled.
      source: where the pixels came from (tfds name and version, file path, seed, ...),
        recorded so a report can say e.g. "CIFAR-10 (JPEG)".
    """

    images: np.ndarray
    labels: np.ndarray
    name: str
    num_classes: int
    source: str = ""

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise ValueError(
                f"ImageDataset {self.name!r}: `images` must be a uint8 NumPy array, got "
                f"{type(images).__name__} of dtype {getattr(images, 'dtype', None)}."
            )
        if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(
                f"ImageDataset {self.name!r}: `images` must have shape [N, 32, 32, 3], got "
                f"{images.shape}; resize or crop to 32x32 RGB first."
            )
        if images.shape[0] == 0:
            raise ValueError(
                f"ImageDataset {self.name!r}: the split is empty (0 images); check the "
                "split name, path or slice."
            )
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int32:
            raise ValueError(
                f"ImageDataset {self.name!r}: `labels` must be an int32 NumPy array, got "
                f"{getattr(labels, 'dtype', type(labels).__name__)}."
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"ImageDataset {self.name!r}: `labels` must have shape ({images.shape[0]},) "
                f"to match the images, got {labels.shape}."
            )
        if self.num_classes < 0:
            raise ValueError(
                f"ImageDataset {self.name!r}: `num_classes` must be >= 0, got {self.num_classes}."
            )
        bad = np.flatnonzero((labels < -1) | (labels >= self.num_classes))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"ImageDataset {self.name!r}: label {int(labels[i])} at index {i} is out of "
                f"range [0, {self.num_classes}) ({bad.size} bad labels in all); use -1 for "
                "'no label' or pass the right num_classes."
            )
        # Read-only views: batches are gathered from these arrays by many
        # iterators at once, so an accidental in-place write must fail loudly.
        for field, array in (("images", images), ("labels", labels)):
            view = array.view()
            view.flags.writeable = False
            object.__setattr__(self, field, view)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, num_classes={self.num_classes}, "
            f"source={self.source!r})"
        )


def from_arrays(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    name: str,
    num_classes: int | None = None,
    source: str = "arrays",
) -> ImageDataset:
    """Wraps in-memory NumPy arrays as an :class:`ImageDataset`.

    Args:
      images: uint8 ``[N, 32, 32, 3]``; grayscale ``[N, 32, 32]`` or ``[N, 32, 32, 1]``
        is converted to RGB by repeating the channel.
      labels: integer ``[N]`` (cast to int32), or None for unlabeled data (all -1).
      name: dataset name.
      num_classes: defaults to ``max(labels) + 1`` (0 if unlabeled).
      source: provenance text.

    Raises:
      ValueError: non-uint8 images, a shape other than 32x32, an empty array, or
        labels out of range.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"from_arrays({name!r}): `images` must be uint8 in [0, 255], got dtype "
            f"{images.dtype}; convert floats in [0, 1] with (x * 255).round().astype(np.uint8)."
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if labels is None:
        labels = np.full((images.shape[0],), -1, np.int32)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"from_arrays({name!r}): `labels` must be integers, got dtype {labels.dtype}."
        )
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    return ImageDataset(
        images=np.ascontiguousarray(images),
        labels=labels.astype(np.int32),
        name=name,
        num_classes=num_classes,
        source=source,
    )


def subset_indices(total: int, count: int, *, seed: int | Sequence[int]) -> np.ndarray:
    """A seeded random ``count`` of ``range(total)``, sorted (file/dataset order): the one
    subsetting rule of :func:`random_subset` and of ``limit=`` loads."""
    rng = np.random.default_rng(seed if isinstance(seed, int | np.integer) else list(seed))
    return np.sort(rng.choice(total, count, replace=False))


def random_subset(
    ds: ImageDataset, max_examples: int | None, *, seed: int | Sequence[int]
) -> ImageDataset:
    """A seeded random subset of at most ``max_examples`` rows, kept in dataset order.

    Returns ``ds`` itself when ``max_examples`` is None/0 or not smaller than the
    dataset. ``seed`` is an int or a NumPy seed sequence (``[seed, tag]``). The offline
    files are sorted by class, so quick runs and CPU
    evaluation budgets must sample at random rather than take the first rows.
    """
    if not max_examples or len(ds) <= max_examples:
        return ds
    keep = subset_indices(len(ds), max_examples, seed=seed)
    return ImageDataset(
        ds.images[keep],
        ds.labels[keep],
        name=ds.name,
        num_classes=ds.num_classes,
        source=f"{ds.source} (random {max_examples} of {len(ds)}, seed {seed})",
    )
