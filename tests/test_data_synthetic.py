"""Synthetic OOD sets: determinism, value ranges, and filters against scipy.ndimage."""

import numpy as np
import pytest
from scipy import ndimage

from ood_jax import data
from ood_jax.data.synthetic import gaussian_blur

MAKERS = {
    "gaussian": data.make_gaussian_noise,
    "uniform": data.make_uniform_noise,
    "rademacher": data.make_rademacher_noise,
    "blobs": data.make_blobs,
    "lowpass_uniform": data.make_lowpass_uniform_noise,
}


@pytest.fixture(scope="module")
def train_like():
    rng = np.random.default_rng(7)
    return data.from_arrays(rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), name="src")


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_deterministic_given_seed(kind):
    make = MAKERS[kind]
    a, b, c = make(40, seed=1), make(40, seed=1), make(40, seed=2)
    assert a.images.shape == (40, 32, 32, 3) and a.images.dtype == np.uint8
    assert (a.labels == -1).all() and a.num_classes == 0
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)


def test_gaussian_statistics():
    x = data.make_gaussian_noise(400, seed=0).images.astype(np.float64) / 255
    # clip(N(0.5, 0.25^2), 0, 1): symmetric about 0.5, 4.55% of values clipped (|z| > 2)
    assert abs(x.mean() - 0.5) < 0.005
    clipped = np.mean((x == 0) | (x == 1))
    assert abs(clipped - 0.0455) < 0.004
    inner = x[(x > 0) & (x < 1)]
    assert abs(inner.std() - 0.25 * 0.8796) < 0.005  # std of N(0, 1) truncated to |z| < 2


def test_uniform_and_rademacher_values():
    u = data.make_uniform_noise(200, seed=0).images
    counts = np.bincount(u.ravel(), minlength=256)
    assert counts.min() > 0.8 * u.size / 256 and counts.max() < 1.2 * u.size / 256
    r = data.make_rademacher_noise(200, seed=0).images
    assert set(np.unique(r).tolist()) == {0, 255}
    assert abs((r == 255).mean() - 0.5) < 0.01


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.5, 0.7])
def test_gaussian_blur_matches_scipy(sigma):
    x = np.random.default_rng(3).random((2, 32, 32, 3))
    got = gaussian_blur(x, sigma, axes=(1, 2))
    for n in range(2):
        ref = ndimage.gaussian_filter(x[n], sigma=(sigma, sigma, 0), mode="nearest")
        np.testing.assert_allclose(got[n], ref, atol=1e-12)
    got3 = gaussian_blur(x, sigma, axes=(1, 2, 3))
    ref3 = ndimage.gaussian_filter(x[0], sigma=sigma, mode="nearest")
    np.testing.assert_allclose(got3[0], ref3, atol=1e-12)


def test_gaussian_blur_per_image_sigma():
    x = np.random.default_rng(4).random((3, 32, 32, 3))
    sigmas = np.array([1.0, 1.7, 2.5])
    got = gaussian_blur(x, sigmas, axes=(1, 2))
    for n, s in enumerate(sigmas):
        ref = ndimage.gaussian_filter(x[n], sigma=(s, s, 0), mode="nearest")
        np.testing.assert_allclose(got[n], ref, atol=1e-12)


def test_blobs_follow_recipe():
    ds = data.make_blobs(5, seed=9)
    rng = np.random.default_rng(9)
    bits = (rng.random((5, 32, 32, 3)) < 0.7).astype(np.float64)
    for n in range(5):
        ref = ndimage.gaussian_filter(bits[n], sigma=1.5, mode="nearest")
        ref[ref < 0.75] = 0
        np.testing.assert_array_equal(ds.images[n], np.rint(ref * 255).astype(np.uint8))
    values = ds.images[ds.images > 0]
    assert values.min() >= round(0.75 * 255) and (ds.images == 0).mean() > 0.1


def test_lowpass_uniform_full_range_and_smooth():
    ds = data.make_lowpass_uniform_noise(30, seed=0)
    x = ds.images.astype(np.float64)
    assert (x.min(axis=(1, 2)) == 0).all() and (x.max(axis=(1, 2)) == 255).all()
    raw = data.make_uniform_noise(30, seed=0).images.astype(np.float64)

    # low-pass: neighbouring pixels are strongly correlated, unlike raw noise
    def neighbour_corr(v):
        return np.corrcoef(v[:, :, :-1].ravel(), v[:, :, 1:].ravel())[0, 1]

    assert neighbour_corr(x) > 0.8 and abs(neighbour_corr(raw)) < 0.05


def test_permuted_pixels_keep_pixel_multiset(train_like):
    ds = data.make_permuted_pixels(10, seed=5, source=train_like, low_pass=False)
    picks = np.random.default_rng(5).integers(0, len(train_like), 10)
    for n in range(10):
        src = train_like.images[picks[n]].reshape(-1, 3)
        got = ds.images[n].reshape(-1, 3)
        assert not np.array_equal(got, src)
        # same RGB triples, only moved: compare sorted rows
        np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(src, axis=0))
        np.testing.assert_array_equal(
            np.sort(got.view("V3").ravel()), np.sort(np.ascontiguousarray(src).view("V3").ravel())
        )
    low = data.make_permuted_pixels(10, seed=5, source=train_like)
    assert low.name == "permuted_pixels_lowpass"
    assert (low.images.reshape(10, -1, 3).max(axis=1) == 255).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="num"):
        data.make_gaussian_noise(0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        data.make_blobs(3, seed=-1)


def test_make_synthetic_by_name(train_like):
    assert data.SYNTHETIC_OOD_SETS == (
        "gaussian",
        "uniform",
        "rademacher",
        "blobs",
        "lowpass_uniform",
        "permuted_pixels",
    )
    np.testing.assert_array_equal(
        data.make_synthetic("blobs", 4, seed=2).images, data.make_blobs(4, seed=2).images
    )
    np.testing.assert_array_equal(
        data.make_synthetic("permuted_pixels", 4, seed=2, source=train_like).images,
        data.make_permuted_pixels(4, seed=2, source=train_like).images,
    )
    with pytest.raises(ValueError, match="source="):
        data.make_synthetic("permuted_pixels", 4, seed=2)
    with pytest.raises(ValueError, match="unknown synthetic set 'stripes'"):
        data.make_synthetic("stripes", 4, seed=2)
