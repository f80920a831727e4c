"""Synthetic OOD sets of the papers, as uint8 ``[num, 32, 32, 3]`` ImageDatasets.

Each ``make_*(num, *, seed, ...)`` draws everything from
``np.random.default_rng(seed)``, so a seed fixes the set. Images are unlabeled
(labels -1). Pixel values ``v`` in [0, 1] are stored as ``round(255 * v)``.

Outlier Exposure (Hendrycks et al., ICLR 2019, their ``test.py``; their noise
lives in [-1, 1] input space, mapped here to [0, 1] pixels by ``(x + 1) / 2``):

* Gaussian: ``v = clip(N(0.5, 0.25^2), 0, 1)`` i.i.d. per pixel and channel
  (theirs: ``clip(N(0, 0.5^2), -1, 1)``).
* Uniform (Rademacher's sibling): ``v ~ U[0, 1]`` i.i.d. (uint8 uniform on 0..255).
* Rademacher: ``v`` in {0, 1} with probability 1/2 each (theirs: {-1, +1}).
* Blobs: ``b ~ Bernoulli(0.7)`` per pixel and channel, Gaussian blur with
  sigma 1.5 over all three axes of the ``[32, 32, 3]`` array (their
  ``skimage.filters.gaussian(..., multichannel=False)`` treats the channel axis
  as spatial; border mode "nearest", kernel radius ``int(4 sigma + 0.5)``), then
  values below 0.75 set to 0.

Hein et al. (CVPR 2019, ACET/CEDA), "low-pass filtered" noise: uniform noise
or a training image with its pixel positions permuted (one random permutation
of the 1,024 RGB pixels per image), blurred spatially per channel with a
Gaussian whose sigma is drawn per image from U[1, 2.5], then each channel
rescaled to the full range [0, 1] (min-max) to undo the blur's loss of contrast.
This follows the paper's description as best we know it; their code is not
reproduced.
"""

from __future__ import annotations

import numpy as np

from ood_jax.data.dataset import IMAGE_SIZE, ImageDataset

_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
_TRUNCATE = 4.0  # kernel radius int(4 sigma + 0.5), as scipy.ndimage / skimage


def _check(num: int, seed: int) -> None:
    if not isinstance(num, int | np.integer) or num < 1:
        raise ValueError(f"`num` must be a positive int (number of images), got {num!r}.")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")


def _to_dataset(values: np.ndarray, *, name: str, seed: int) -> ImageDataset:
    images = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    labels = np.full((images.shape[0],), -1, np.int32)
    return ImageDataset(images, labels, name=name, num_classes=0, source=f"synthetic seed={seed}")


def gaussian_blur(
    values: np.ndarray, sigma: np.ndarray | float, *, axes: tuple[int, ...]
) -> np.ndarray:
    """Separable Gaussian blur of a batch, per-image sigma, border mode "nearest".

    Along each axis in ``axes``: ``out[x] = sum_t w[t] * in[clip(x + t)]`` with
    ``w[t] ∝ exp(-t^2 / (2 sigma^2))`` for ``|t| <= int(4 sigma + 0.5)``, normalized to
    sum 1 (``scipy.ndimage.gaussian_filter1d`` semantics).

    Args:
      values: float ``[N, ...]``.
      sigma: scalar or float ``[N]`` (one sigma per image), > 0.
      axes: axes to blur (not 0).
    """
    n = values.shape[0]
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (n,))
    radii = (_TRUNCATE * sigma + 0.5).astype(int)
    r_max = int(radii.max())
    taps = np.arange(-r_max, r_max + 1)
    weights = np.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    weights[np.abs(taps)[None, :] > radii[:, None]] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    out = values.astype(np.float64)
    for axis in axes:
        length = out.shape[axis]
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r_max, r_max)
        padded = np.pad(out, pad, mode="edge")
        shape = (n,) + (1,) * (out.ndim - 1)
        acc = np.zeros_like(out)
        for j in range(taps.size):
            window = np.take(padded, np.arange(j, j + length), axis=axis)
            acc += weights[:, j].reshape(shape) * window
        out = acc
    return out


def make_gaussian_noise(num: int, *, seed: int) -> ImageDataset:
    """Gaussian noise ``clip(N(0.5, 0.25^2), 0, 1)`` (Outlier Exposure)."""
    _check(num, seed)
    rng = np.random.default_rng(seed)
    return _to_dataset(rng.normal(0.5, 0.25, (num, *_SHAPE)), name="gaussian_noise", seed=seed)


def make_uniform_noise(num: int, *, seed: int) -> ImageDataset:
    """Uniform noise: each pixel and channel i.i.d. uniform on 0..255 (Outlier Exposure)."""
    _check(num, seed)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num, *_SHAPE), dtype=np.uint8)
    return ImageDataset(
        images,
        np.full((num,), -1, np.int32),
        name="uniform_noise",
        num_classes=0,
        source=f"synthetic seed={seed}",
    )


def make_rademacher_noise(num: int, *, seed: int) -> ImageDataset:
    """Rademacher noise: each pixel and channel 0 or 255 with probability 1/2 (Outlier Exposure)."""
    _check(num, seed)
    rng = np.random.default_rng(seed)
    return _to_dataset(
        rng.integers(0, 2, (num, *_SHAPE)).astype(np.float64), name="rademacher_noise", seed=seed
    )


def make_blobs(
    num: int, *, seed: int, p: float = 0.7, sigma: float = 1.5, threshold: float = 0.75
) -> ImageDataset:
    """Blobs: Bernoulli(p) pixels, Gaussian blur (all 3 axes), values < threshold set to 0."""
    _check(num, seed)
    rng = np.random.default_rng(seed)
    bits = (rng.random((num, *_SHAPE)) < p).astype(np.float64)
    blurred = gaussian_blur(bits, sigma, axes=(1, 2, 3))
    blurred[blurred < threshold] = 0.0
    return _to_dataset(blurred, name="blobs", seed=seed)


def _low_pass(
    values: np.ndarray, rng: np.random.Generator, sigma_range: tuple[float, float]
) -> np.ndarray:
    sigma = rng.uniform(*sigma_range, size=values.shape[0])
    blurred = gaussian_blur(values, sigma, axes=(1, 2))
    lo = blurred.min(axis=(1, 2), keepdims=True)
    hi = blurred.max(axis=(1, 2), keepdims=True)
    # A constant channel (possible only for constant input) maps to 0 instead of 0/0.
    return (blurred - lo) / np.where(hi > lo, hi - lo, 1.0)


def make_lowpass_uniform_noise(
    num: int, *, seed: int, sigma_range: tuple[float, float] = (1.0, 2.5)
) -> ImageDataset:
    """Hein et al.'s low-pass uniform noise: U[0, 1] pixels, blurred, min-max rescaled.

    The blur sigma of each image is drawn from ``U(sigma_range)``.
    """
    _check(num, seed)
    rng = np.random.default_rng(seed)
    noise = rng.random((num, *_SHAPE))
    return _to_dataset(_low_pass(noise, rng, sigma_range), name="lowpass_uniform_noise", seed=seed)


def make_permuted_pixels(
    num: int,
    *,
    seed: int,
    source: ImageDataset,
    low_pass: bool = True,
    sigma_range: tuple[float, float] = (1.0, 2.5),
) -> ImageDataset:
    """Hein et al.'s permuted-pixel images.

    Image ``i`` is ``source.images[j_i]`` (``j_i`` drawn uniformly) with its 1,024
    pixel positions shuffled by an independent permutation (RGB triples stay
    together), then, if ``low_pass``, blurred and rescaled as
    :func:`make_lowpass_uniform_noise`.
    """
    _check(num, seed)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(source), num)
    order = np.argsort(rng.random((num, IMAGE_SIZE * IMAGE_SIZE)), axis=1)
    flat = source.images[picks].reshape(num, IMAGE_SIZE * IMAGE_SIZE, 3)
    permuted = np.take_along_axis(flat, order[:, :, None], axis=1).reshape(num, *_SHAPE)
    if not low_pass:
        return ImageDataset(
            permuted,
            np.full((num,), -1, np.int32),
            name="permuted_pixels",
            num_classes=0,
            source=f"synthetic seed={seed} from {source.name}",
        )
    values = _low_pass(permuted / 255.0, rng, sigma_range)
    return _to_dataset(values, name="permuted_pixels_lowpass", seed=seed)


_NOISE = {
    "gaussian": make_gaussian_noise,
    "uniform": make_uniform_noise,
    "rademacher": make_rademacher_noise,
    "blobs": make_blobs,
    "lowpass_uniform": make_lowpass_uniform_noise,
}
#: The synthetic OOD sets by name (``--config.eval.ood_sets``), in report order.
SYNTHETIC_OOD_SETS: tuple[str, ...] = (*_NOISE, "permuted_pixels")


def make_synthetic(
    name: str, num: int, *, seed: int, source: ImageDataset | None = None
) -> ImageDataset:
    """The synthetic OOD set called ``name`` (one of :data:`SYNTHETIC_OOD_SETS`).

    ``source``: the in-distribution images whose pixels ``permuted_pixels`` permutes
    (unused by the others).
    """
    if name == "permuted_pixels":
        if source is None:
            raise ValueError("make_synthetic('permuted_pixels'): pass source= (source images).")
        return make_permuted_pixels(num, seed=seed, source=source)
    if name not in _NOISE:
        raise ValueError(
            f"unknown synthetic set {name!r}; choose from {', '.join(SYNTHETIC_OOD_SETS)}."
        )
    return _NOISE[name](num, seed=seed)
