"""The offline npz files ($OOD_JAX_DATA_DIR), read for real (small samples where possible)."""

import io

import numpy as np
from PIL import Image

from ood_jax import data

DATA_DIR = data.default_data_dir()
assert DATA_DIR is not None and (DATA_DIR / "cifar10_test.npz").is_file(), (
    "these tests read the shared offline data: set OOD_JAX_DATA_DIR to its folder"
)


def pil_decode(name, indices, mode="RGB"):
    """Independent reference decode: PIL, image by image (an int: the first ones)."""
    indices = range(indices) if isinstance(indices, int) else indices
    with np.load(DATA_DIR / name) as f:
        enc, off = f["encoded"], f["offsets"]
        return np.stack(
            [
                np.asarray(Image.open(io.BytesIO(enc[off[i] : off[i + 1]].tobytes())).convert(mode))
                for i in indices
            ]
        )


def pil_is_gray(name, index):
    with np.load(DATA_DIR / name) as f:
        enc, off = f["encoded"], f["offsets"]
        return Image.open(io.BytesIO(enc[off[index] : off[index + 1]].tobytes())).mode == "L"


def _chosen(total, limit):
    """The documented ``limit=`` rule, by hand: a seeded (0) sample, in file order."""
    return np.sort(np.random.default_rng(0).choice(total, size=limit, replace=False))


def test_cifar10_test_limit_is_a_seeded_sample_of_every_class_matching_pil():
    ds = data.load_dataset("cifar10_jpeg", "test", limit=500)
    assert len(ds) == 500 and ds.num_classes == 10
    chosen = _chosen(10000, 500)
    np.testing.assert_array_equal(ds.images, pil_decode("cifar10_test.npz", chosen))
    with np.load(DATA_DIR / "cifar10_test.npz") as f:
        np.testing.assert_array_equal(ds.labels, f["labels"][chosen])
    # The file is sorted by class: its first 2,000 images are class 0 alone; a limit
    # gives every class (about 200 each here).
    counts = np.bincount(data.load_dataset("cifar10_jpeg", "train", limit=2000).labels)
    assert len(counts) == 10 and counts.min() > 150


def test_cifar10_full_test_split(tmp_path):
    ds = data.load_dataset("cifar10_jpeg", "test", cache_dir=tmp_path)
    assert ds.images.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(ds.labels), [1000] * 10)
    # Test-split channel means lie within ~1 of the CIFAR-10 train constants (0..255 units).
    means = ds.images.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(means, np.asarray(data.CIFAR10_MEAN) * 255, atol=1.5)
    cached = data.load_dataset("cifar10_jpeg", "test", cache_dir=tmp_path)  # from the cache
    np.testing.assert_array_equal(cached.images, ds.images)


def test_tinyimagenet_resize_is_2x2_box_mean():
    ds = data.load_dataset("tinyimagenet_resize", "test", limit=300)
    big = pil_decode("tinyimagenet_test.npz", _chosen(10000, 300)).astype(np.float64)
    box = big.reshape(300, 32, 2, 32, 2, 3).mean(axis=(2, 4))
    assert np.abs(ds.images - box).max() <= 0.5  # the mean, rounded
    pil_box = np.stack(
        [
            np.asarray(Image.fromarray(im.astype(np.uint8)).resize((32, 32), Image.BOX))
            for im in big[:20]
        ]
    )
    assert np.abs(ds.images[:20].astype(int) - pil_box).max() <= 1
    assert (ds.labels == -1).all()


def test_tinyimagenet_crop_windows_and_grayscale():
    ds = data.load_dataset("tinyimagenet_crop", "test", limit=300)
    chosen = _chosen(10000, 300)
    big = pil_decode("tinyimagenet_test.npz", chosen)
    corners = np.random.default_rng(0).integers(0, 33, size=(300, 2))  # documented crop rule
    for n, (top, left) in enumerate(corners):
        np.testing.assert_array_equal(ds.images[n], big[n, top : top + 32, left : left + 32])
    # single-channel JPEGs are converted to RGB by replication
    gray_at = [n for n, i in enumerate(chosen) if pil_is_gray("tinyimagenet_test.npz", i)]
    assert gray_at, "no single-channel image among the sample"
    gray = ds.images[gray_at[0]].astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_textures_partial():
    ds = data.load_dataset("textures_partial", "test")
    assert ds.images.shape == (1200, 32, 32, 3) and ds.num_classes == 10
    np.testing.assert_array_equal(np.bincount(ds.labels), [120] * 10)


def test_outlier_set_labels_removed():
    ds = data.load_outliers(limit=250)
    assert ds.images.shape == (250, 32, 32, 3)
    assert (ds.labels == -1).all() and ds.num_classes == 0
