"""OOD sets by name: synthetic sets, name checks."""

import numpy as np
import pytest

from ood_jax import data as D
from ood_jax.evaluate import SYNTHETIC_NAMES, load_ood_sets


def test_synthetic_sets_are_seeded_and_sized():
    source = D.from_arrays(np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, int), name="id")
    sets = load_ood_sets(SYNTHETIC_NAMES, num_synthetic=6, seed=3, id_test=source)
    assert list(sets) == list(SYNTHETIC_NAMES)
    assert all(len(ds) == 6 and (ds.labels == -1).all() for ds in sets.values())
    again = load_ood_sets(["gaussian"], num_synthetic=6, seed=3)["gaussian"]
    np.testing.assert_array_equal(again.images, D.make_gaussian_noise(6, seed=3).images)


def test_bad_names_raise():
    with pytest.raises(ValueError, match="no OOD set names"):
        load_ood_sets([])
    with pytest.raises(ValueError, match="duplicate"):
        load_ood_sets(["gaussian", "gaussian"])
    with pytest.raises(ValueError, match="id_test"):
        load_ood_sets(["permuted_pixels"])
    with pytest.raises(ValueError, match="Synthetic sets"):
        load_ood_sets(["no_such_set"])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("svhn", ("svhn", "test")),
        ("textures:all", ("textures", "all")),
        ("npz:/data/own.npz", ("npz:/data/own.npz", "test")),
        ("npz:/data/a:b.npz", ("npz:/data/a:b.npz", "test")),  # a file's ':' is kept
        ("/data/own.npz", ("npz:/data/own.npz", "test")),
        ("./own_folder", ("folder:./own_folder", "test")),
        ("folder:/data/own", ("folder:/data/own", "test")),
        ("folder:/data/own:val", ("folder:/data/own", "val")),
        ("tfds:svhn_cropped", ("tfds:svhn_cropped", "test")),
        ("tfds:svhn_cropped:train", ("tfds:svhn_cropped", "train")),
        ("tfds:imagenet_resized/32x32", ("tfds:imagenet_resized/32x32", "test")),
    ],
)
def test_ood_set_names_reach_load_dataset_whole(monkeypatch, name, expected):
    seen = []

    def record(dataset, split, **kwargs):
        seen.append((dataset, split))
        images, labels = np.zeros((1, 32, 32, 3), np.uint8), np.array([-1], np.int32)
        return D.ImageDataset(images, labels, name=dataset, num_classes=0)

    monkeypatch.setattr(D, "load_dataset", record)
    ds = load_ood_sets([name])[name]
    assert seen == [expected] and ds.name == name


def test_own_ood_set_paths_are_checked_without_loading(tmp_path):
    from ood_jax.evaluate.datasets import check_ood_set_names

    np.savez(tmp_path / "own.npz", images=np.zeros((1, 32, 32), np.uint8), labels=[-1])
    (tmp_path / "own").mkdir()
    check_ood_set_names(
        [f"npz:{tmp_path}/own.npz", f"{tmp_path}/own.npz", f"folder:{tmp_path}/own"]
    )
    for bad, says in [
        (f"npz:{tmp_path}/none.npz", "no file"),
        (f"{tmp_path}/none.npz", "no file"),
        (f"folder:{tmp_path}/none", "no folder"),
        (f"{tmp_path}/none", "no folder"),
        (3, "strings"),
    ]:
        with pytest.raises(ValueError, match=says):
            check_ood_set_names([bad])


def test_grayscale_decoded_npz_becomes_rgb(tmp_path):
    gray = np.arange(2 * 32 * 32, dtype=np.uint32).reshape(2, 32, 32).astype(np.uint8)
    np.savez(tmp_path / "g.npz", images=gray, labels=np.array([-1, -1], np.int32))
    ds = D.load_dataset(f"npz:{tmp_path}/g.npz", "test")
    assert ds.images.shape == (2, 32, 32, 3)
    for channel in range(3):
        np.testing.assert_array_equal(ds.images[..., channel], gray)
