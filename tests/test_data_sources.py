"""Sources: npz (encoded and decoded), image folders, arrays, errors, decode cache."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from ood_jax import data


def encode(array, fmt="PNG", mode=None):
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format=fmt)
    return np.frombuffer(buf.getvalue(), np.uint8)


def write_encoded_npz(path, files, labels, label_names=()):
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
    np.savez(
        path,
        encoded=np.concatenate(files),
        offsets=offsets,
        labels=np.asarray(labels, np.int32),
        label_names=np.asarray(label_names, str),
    )


@pytest.fixture()
def rgb_images():
    return np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)


def test_encoded_npz_roundtrip_with_grayscale(tmp_path, rgb_images):
    gray = rgb_images[0, :, :, 0]
    files = [encode(im) for im in rgb_images] + [encode(gray)]
    path = tmp_path / "set.npz"
    write_encoded_npz(path, files, [0, 1, 2, 0, 1, 2], ["a", "b", "c"])
    ds = data.from_npz(path, cache_dir="")
    assert len(ds) == 6 and ds.num_classes == 3 and ds.name == "set"
    np.testing.assert_array_equal(ds.images[:5], rgb_images)  # PNG is lossless
    for c in range(3):  # grayscale is replicated to RGB
        np.testing.assert_array_equal(ds.images[5, :, :, c], gray)
    np.testing.assert_array_equal(ds.labels, [0, 1, 2, 0, 1, 2])


def test_decoded_npz(tmp_path, rgb_images):
    path = tmp_path / "dec.npz"
    np.savez(path, images=rgb_images, labels=np.array([3, 1, 0, 2, 1], np.int32))
    ds = data.from_npz(path)
    np.testing.assert_array_equal(ds.images, rgb_images)
    assert ds.num_classes == 4


def test_corrupt_image_names_index_and_file(tmp_path, rgb_images):
    files = [encode(im) for im in rgb_images]
    files[3] = files[3][:40]  # truncated PNG
    path = tmp_path / "bad.npz"
    write_encoded_npz(path, files, [0] * 5)
    with pytest.raises(ValueError, match=r"bad\.npz, image 3: cannot decode"):
        data.from_npz(path, cache_dir="")


def test_wrong_size_image_names_index_unless_resized(tmp_path, rgb_images):
    big = np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    files = [encode(im) for im in rgb_images[:2]] + [encode(big)]
    path = tmp_path / "sizes.npz"
    write_encoded_npz(path, files, [0, 0, 0])
    with pytest.raises(ValueError, match=r"image 2: image is 48x64, expected 32x32"):
        data.from_npz(path, cache_dir="")
    ds = data.from_npz(path, cache_dir="", resize="shorter_side_crop")
    # shorter side 48 -> 32 (factor 2/3): 32x43 after resize, centre rows 5..37
    ref = Image.fromarray(big).resize((32, 43), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(ds.images[2], np.asarray(ref)[5:37])


def test_labels_out_of_range_and_empty(tmp_path, rgb_images):
    path = tmp_path / "lab.npz"
    np.savez(path, images=rgb_images, labels=np.array([0, 1, 7, 1, 0], np.int32))
    with pytest.raises(ValueError, match="label 7 at index 2 is out of range"):
        data.from_npz(path, num_classes=3)
    empty = tmp_path / "empty.npz"
    np.savez(empty, images=np.zeros((0, 32, 32, 3), np.uint8), labels=np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="empty"):
        data.from_npz(empty)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match="expected either"):
        data.from_npz(other)


def test_decode_cache_is_written_once_and_invalidated_by_mtime(tmp_path, rgb_images):
    path = tmp_path / "c.npz"
    write_encoded_npz(path, [encode(im) for im in rgb_images], [0] * 5)
    cache = tmp_path / "cache"
    first = data.from_npz(path, cache_dir=cache)
    entries = list(cache.glob("*.npz"))
    assert len(entries) == 1 and not list(cache.glob("*.tmp"))
    np.testing.assert_array_equal(data.from_npz(path, cache_dir=cache).images, first.images)
    # Edit the file: new bytes, new mtime -> a new entry with the new pixels.
    write_encoded_npz(path, [encode(255 - im) for im in rgb_images], [0] * 5)
    os.utime(path, ns=(1, 1))
    second = data.from_npz(path, cache_dir=cache)
    np.testing.assert_array_equal(second.images, 255 - rgb_images)
    assert len(list(cache.glob("*.npz"))) == 2


def test_folder_source(tmp_path, rgb_images):
    for i, cls in enumerate(["zebra", "apple", "apple", "mango", "zebra"]):
        folder = tmp_path / "root" / "train" / cls
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb_images[i]).save(folder / f"img{i}.png")
    (tmp_path / "root" / "train" / "apple" / "notes.txt").write_text("ignored")
    ds = data.from_folder(tmp_path / "root", "train")
    assert ds.num_classes == 3  # apple=0, mango=1, zebra=2 (sorted)
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 2, 2])
    np.testing.assert_array_equal(ds.images, rgb_images[[1, 2, 3, 0, 4]])
    same = data.load_dataset("folder:" + str(tmp_path / "root"), "train")
    np.testing.assert_array_equal(same.images, ds.images)
    with pytest.raises(ValueError, match=r"splits under .*\['train'\]"):
        data.from_folder(tmp_path / "root", "test")


def test_folder_bad_files(tmp_path, rgb_images):
    folder = tmp_path / "r" / "test" / "a"
    folder.mkdir(parents=True)
    with pytest.raises(ValueError, match="is empty"):
        data.from_folder(tmp_path / "r", "test")
    Image.fromarray(rgb_images[0]).save(folder / "0.png")
    (folder / "1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"1\.jpg \(index 1\): cannot decode"):
        data.from_folder(tmp_path / "r", "test")
    (folder / "1.jpg").unlink()
    Image.fromarray(np.zeros((30, 32, 3), np.uint8)).save(folder / "2.png")
    with pytest.raises(ValueError, match=r"2\.png \(index 1\): image is 32x30"):
        data.from_folder(tmp_path / "r", "test")


def test_folders_by_name_or_path_resize_as_the_readme_says(tmp_path):
    # The README: npz files and data.from_folder (default) reject other sizes; folders
    # given by name or path are resized, shorter side to 32 (bilinear), centre crop.
    rng = np.random.default_rng(3)
    big = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)  # H=48, W=64
    for split in ("train", "test"):
        folder = tmp_path / "root" / split / "cat"
        folder.mkdir(parents=True)
        Image.fromarray(big).save(folder / "wide.png")
    with pytest.raises(ValueError, match=r"wide\.png \(index 0\): image is 64x48"):
        data.from_folder(tmp_path / "root", "test")
    # By hand: 64x48 -> 43x32 (factor 2/3, width rounded), then columns 5..37.
    expected = np.asarray(
        Image.fromarray(big).resize((43, 32), Image.Resampling.BILINEAR).crop((5, 0, 37, 32))
    )
    by_name = data.load_dataset("folder:" + str(tmp_path / "root"), "test")
    by_path = data.load_dataset("my_set", "test", local_path=tmp_path / "root")
    for ds in (by_name, by_path):
        assert ds.images.shape == (1, 32, 32, 3)
        np.testing.assert_array_equal(ds.images[0], expected)


def test_from_arrays_and_validation(rgb_images):
    gray = rgb_images[..., 0]
    ds = data.from_arrays(gray, [1, 0, 1, 0, 1], name="g")
    assert ds.images.shape == (5, 32, 32, 3) and ds.num_classes == 2
    np.testing.assert_array_equal(ds.images[..., 2], gray)
    assert (data.from_arrays(rgb_images, name="u").labels == -1).all()
    with pytest.raises(ValueError, match="uint8"):
        data.from_arrays(rgb_images / 255.0, name="f")
    with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
        data.from_arrays(np.zeros((2, 28, 28, 3), np.uint8), name="s")
    with pytest.raises(ValueError, match="label -2 at index 0"):
        data.from_arrays(rgb_images, [-2, 0, 0, 0, 0], name="neg")
    with pytest.raises(ValueError, match="read-only"):
        ds.images[0, 0, 0, 0] = 1


def test_normalize_and_inverse(rgb_images):
    mean = np.array([125.3, 123.0, 113.9]) / 255
    std = np.array([63.0, 62.1, 66.7]) / 255
    np.testing.assert_allclose(data.CIFAR10_MEAN, mean)
    np.testing.assert_allclose(data.CIFAR10_STD, std)
    out = data.normalize(rgb_images)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (rgb_images / 255.0 - mean) / std, atol=1e-5)
    np.testing.assert_array_equal(data.denormalize(out), rgb_images)
    with pytest.raises(ValueError, match="uint8"):
        data.normalize(rgb_images.astype(np.float32))


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*cifar10.*tinyimagenet_crop"):
        data.load_dataset("mnist", "test")


def test_local_only_names_say_how():
    with pytest.raises(ValueError, match="'isun'.*not in tfds.*local_path="):
        data.load_dataset("isun", "test")


def test_offline_name_errors(tmp_path):
    with pytest.raises(ValueError, match="split"):
        data.load_dataset("tinyimagenet_crop", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="missing file"):
        data.load_dataset("cifar10_jpeg", "test", data_dir=tmp_path)


def test_local_path_overrides_name(tmp_path, rgb_images):
    path = tmp_path / "svhn_local.npz"
    np.savez(path, images=rgb_images, labels=np.arange(5, dtype=np.int32))
    ds = data.load_dataset("svhn", "test", local_path=path)
    assert ds.name == "svhn" and len(ds) == 5


def test_random_subset_is_seeded_sorted_and_bounded():
    import numpy as _np

    from ood_jax.data import from_arrays, random_subset

    images = _np.zeros((50, 32, 32, 3), _np.uint8)
    images[:, 0, 0, 0] = _np.arange(50)
    ds = from_arrays(images, _np.arange(50) % 5, name="toy")
    sub = random_subset(ds, 10, seed=3)
    expected = _np.sort(_np.random.default_rng(3).choice(50, 10, replace=False))
    _np.testing.assert_array_equal(sub.images[:, 0, 0, 0], expected)
    _np.testing.assert_array_equal(sub.labels, expected % 5)
    assert "random 10 of 50, seed 3" in sub.source
    assert random_subset(ds, None, seed=0) is ds and random_subset(ds, 80, seed=0) is ds


def test_local_labels_are_checked_against_the_dataset_class_count(tmp_path, rgb_images):
    # A "cifar10" file with labels up to 11 must not silently train a 12-class model.
    path = tmp_path / "cifar10_train.npz"
    np.savez(path, images=rgb_images, labels=np.array([0, 3, 11, 2, 1], np.int32))
    with pytest.raises(ValueError, match=r"label 11 at index 2 is out of range \[0, 10\)"):
        data.load_dataset("cifar10", "train", local_path=path)


def test_registered_dataset_spec_drives_loading_and_normalization(rgb_images):
    def loader(split, *, limit=None, data_dir=None):
        return data.from_arrays(rgb_images, np.arange(5) % 2, name="toy", num_classes=2)

    spec = data.DatasetSpec(
        "toy", "Toy", 2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0), loader=loader
    )
    data.register_dataset(spec, replace=True)
    assert "toy" in data.available_datasets() and data.get_dataset_spec("toy") is spec
    ds = data.load_dataset("toy", "train")
    batch = next(
        iter(
            data.eval_batches(
                ds, batch_size=5, process_index=0, process_count=1, mean=spec.mean, std=spec.std
            )
        )
    )
    expected = (rgb_images / 255.0 - 0.5) / np.array([0.25, 0.5, 1.0])
    np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-5)
    it = data.train_iterator(
        ds,
        batch_size=5,
        seed=0,
        augment=False,
        prefetch=0,
        process_index=0,
        process_count=1,
        mean=spec.mean,
        std=spec.std,
    )
    train_batch = next(it)
    order = np.random.default_rng([0, 0, 0]).permutation(5)  # the documented epoch order
    np.testing.assert_allclose(train_batch["image"], expected[order], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already registered"):
        data.register_dataset(spec)


def test_corrupt_npz_files_name_the_file(tmp_path, rgb_images):
    good = tmp_path / "good.npz"
    np.savez(good, images=rgb_images, labels=np.arange(5, dtype=np.int32))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noise = tmp_path / "noise.npz"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    for path in (truncated, noise):
        with pytest.raises(ValueError, match=rf"{path.name}' is not a readable .npz.*corrupt"):
            data.from_npz(path)


def test_spec_for_source_names_the_data_really_read():
    # Offline, CIFAR-10 is read as its JPEG re-encoding; a folder or tfds is the dataset.
    assert data.spec_for_source("cifar10", "local").name == "cifar10_jpeg"
    assert data.spec_for_source("cifar10_jpeg", "local").name == "cifar10_jpeg"
    assert data.spec_for_source("cifar10", "tfds").name == "cifar10"
    assert data.spec_for_source("cifar10", "/my/cifar").name == "cifar10"
    with pytest.raises(ValueError, match="'cifar100' has no offline files"):
        data.spec_for_source("cifar100", "local")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        data.spec_for_source("mnist", "tfds")


def test_default_ood_sets_never_need_tfds_without_tfds_data():
    cifar10 = data.get_dataset_spec("cifar10")
    offline = ("tinyimagenet_crop", "tinyimagenet_resize", "textures_partial")
    assert cifar10.default_ood_sets("tfds") == ("svhn", "textures")
    assert cifar10.default_ood_sets("local") == offline
    assert cifar10.default_ood_sets("/my/cifar") == offline
    assert data.get_dataset_spec("cifar10_jpeg").default_ood_sets("local") == offline
    # Without an offline suite the one suite serves every source.
    assert data.get_dataset_spec("cifar100").default_ood_sets("local") == ("svhn", "textures")
