"""32x32 sets derived from the 64x64 Tiny ImageNet images (ODIN protocol).

* TinyImageNet-crop: one 32x32 crop of each 64x64 test image. ODIN cropped at
  random; here the crop corner of image ``i`` is drawn from
  ``np.random.default_rng(crop_seed)`` (uniform over the 33 x 33 valid
  corners, all images at once), so the set is random like ODIN's but
  reproducible. The pixels differ from ODIN's release; the protocol is the same.
* TinyImageNet-resize: each 64x64 image downsampled by 2 with a 2x2 box
  (area) filter, ``out = floor(mean of the 4 pixels + 0.5)``: the exact
  anti-aliased downsample (what PIL ``Image.BOX`` computes up to rounding).
* The auxiliary train subset (outlier exposure) uses the same 2x2 box filter.

Grayscale Tiny ImageNet JPEGs are converted to RGB by channel replication when
decoding (:mod:`ood_jax.data.decode`).
"""

from __future__ import annotations

import numpy as np

TINY_SIZE = 64
OUT_SIZE = 32


def _check_64(images: np.ndarray, what: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (64, 64, 3):
        raise ValueError(
            f"{what}: expected uint8 images [N, 64, 64, 3], got {images.dtype} {images.shape}."
        )


def box_downsample_2x(images: np.ndarray) -> np.ndarray:
    """2x2 box-filter downsample: uint8 ``[N, 64, 64, 3]`` -> uint8 ``[N, 32, 32, 3]``.

    ``out[n, i, j, c] = floor((sum_{a,b in {0,1}} x[n, 2i+a, 2j+b, c] + 2) / 4)``
    (the 2x2 mean rounded half up), computed for all images at once.
    """
    _check_64(images, "box_downsample_2x")
    n = images.shape[0]
    blocks = images.reshape(n, OUT_SIZE, 2, OUT_SIZE, 2, 3).astype(np.uint16)
    return ((blocks.sum(axis=(2, 4)) + 2) // 4).astype(np.uint8)


def crop_corners(num: int, *, crop_seed: int) -> np.ndarray:
    """int64 ``[num, 2]`` (top, left) corners in ``[0, 32]`` from ``default_rng(crop_seed)``."""
    rng = np.random.default_rng(crop_seed)
    return rng.integers(0, TINY_SIZE - OUT_SIZE + 1, size=(num, 2))


def random_crop_32(images: np.ndarray, *, crop_seed: int) -> np.ndarray:
    """One seeded 32x32 crop per image: uint8 ``[N, 64, 64, 3]`` -> ``[N, 32, 32, 3]``.

    Image ``n`` is ``images[n, top:top + 32, left:left + 32]`` with
    ``(top, left) = crop_corners(N, crop_seed=crop_seed)[n]``; gathered in one
    indexing operation.
    """
    _check_64(images, "random_crop_32")
    corners = crop_corners(images.shape[0], crop_seed=crop_seed)
    offsets = np.arange(OUT_SIZE)
    rows = corners[:, 0, None] + offsets  # [N, 32]
    cols = corners[:, 1, None] + offsets
    batch = np.arange(images.shape[0])[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]]
