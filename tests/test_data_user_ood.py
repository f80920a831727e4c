"""The user's own OOD sets in ordinary forms: npz files without labels, flat image
folders, images that are not 32x32 RGB (the size rules), and their errors; from Python
(``load_ood_sets``, ``load_dataset``) and from ``python -m experiments.evaluate``.

Expected pixels are computed apart from the loaders: numpy slices of hand-built images,
constant images, 2x2-block images (whose box downsample is the blocks), or PIL's own
resize of the same image.
"""

import io
import json

import numpy as np
import pytest
from PIL import Image
from test_evaluate_cli import user_error

from ood_jax import data as D
from ood_jax.data.sources import image_files
from ood_jax.evaluate import check_ood_set_names, load_ood_sets
from ood_jax.evaluate.datasets import is_own_files, split_resize_rule, with_resize


def one(name, **kwargs):
    return load_ood_sets([name], **kwargs)[name]


def blocks_image(rng, size=32):
    """A uint8 ``[2 * size, 2 * size, 3]`` image of 2x2 constant blocks, and the blocks."""
    small = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return small.repeat(2, axis=0).repeat(2, axis=1), small


def pil_bilinear(image, size):
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def encode_png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), np.uint8)


# ---- npz files -------------------------------------------------------------------------


def test_npz_without_labels_is_an_ood_set_with_labels_minus_one(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "own.npz"
    np.savez(path, images=images)
    ds = one(f"npz:{path}")
    np.testing.assert_array_equal(ds.images, images)
    assert (ds.labels == -1).all() and ds.num_classes == 0
    assert ds.source == str(path)  # 32x32 already: no rule changed anything
    # A plain path names the same set.
    np.testing.assert_array_equal(one(str(path)).images, images)
    # In-distribution data needs labels: the same file is refused there, saying why.
    for load in (
        lambda: D.load_dataset("cifar10", "train", local_path=path),
        lambda: D.load_dataset(f"npz:{path}", "test"),
        lambda: D.from_npz(path),
    ):
        with pytest.raises(ValueError, match=r"no 'labels' array.*in-distribution.*OOD set"):
            load()


def test_npz_labels_are_kept_when_present(tmp_path):
    images = np.zeros((3, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "l.npz", images=images, labels=np.array([2, 0, 1], np.int32))
    ds = one(f"npz:{tmp_path / 'l.npz'}")
    np.testing.assert_array_equal(ds.labels, [2, 0, 1])
    np.savez(tmp_path / "bad.npz", images=images, labels=np.array([2, 0], np.int32))
    with pytest.raises(ValueError, match=r"'labels' must be integers \[N\] = \[3\]"):
        one(f"npz:{tmp_path / 'bad.npz'}")


def test_encoded_npz_without_labels_64x64_each_rule(tmp_path):
    rng = np.random.default_rng(1)
    pairs = [blocks_image(rng) for _ in range(3)]
    big = np.stack([b for b, _ in pairs])
    files = [encode_png(b) for b in big]
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
    path = tmp_path / "enc64.npz"
    np.savez(path, encoded=np.concatenate(files), offsets=offsets)
    # center_crop: rows and columns 16..47 of each 64x64 image, no scaling.
    crop = one(f"npz:{path}@center_crop", data_dir=None)
    np.testing.assert_array_equal(crop.images, big[:, 16:48, 16:48])
    assert (crop.labels == -1).all()
    assert crop.source.endswith("(3 of 3 images to 32x32 by center_crop)")
    # box: the 2x2 mean, which for 2x2-constant blocks is the blocks themselves.
    box = one(f"npz:{path}@box")
    np.testing.assert_array_equal(box.images, np.stack([s for _, s in pairs]))
    # The default (shorter_side_crop) of a square image is PIL's bilinear 32x32.
    default = one(f"npz:{path}")
    for i in range(3):
        np.testing.assert_array_equal(default.images[i], pil_bilinear(big[i], (32, 32)))
    assert "by shorter_side_crop" in default.source


def test_decoded_npz_grayscale_28x28_is_scaled_up_and_replicated(tmp_path):
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    gray[0] = 77  # a constant image stays constant whatever the filter
    np.savez(tmp_path / "g.npz", images=gray)
    np.savez(tmp_path / "g1.npz", images=gray[..., None])
    for name in ("g.npz", "g1.npz"):
        ds = one(f"npz:{tmp_path / name}")
        assert ds.images.shape == (4, 32, 32, 3)
        assert (ds.images[0] == 77).all()
        for i in range(4):
            expected = pil_bilinear(gray[i], (32, 32))  # shorter side 28 -> 32
            for c in range(3):
                np.testing.assert_array_equal(ds.images[i, :, :, c], expected)
        assert ds.source.endswith("(4 of 4 images to 32x32 by shorter_side_crop)")
    with pytest.raises(ValueError, match=r"image 0: image is 28x28, smaller than 32x32"):
        one(f"npz:{tmp_path / 'g.npz'}@center_crop")


def test_decoded_npz_rgba_drops_alpha_and_squash_ignores_the_aspect(tmp_path):
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (2, 32, 32, 4), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=rgba)
    np.testing.assert_array_equal(one(f"npz:{tmp_path / 'a.npz'}").images, rgba[..., :3])
    wide = rng.integers(0, 256, (2, 48, 64, 4), dtype=np.uint8)  # H=48, W=64
    np.savez(tmp_path / "w.npz", images=wide)
    ds = one(f"npz:{tmp_path / 'w.npz'}@squash")
    for i in range(2):
        np.testing.assert_array_equal(ds.images[i], pil_bilinear(wide[i, ..., :3], (32, 32)))
    # shorter_side_crop: 64x48 -> 43x32 (factor 2/3), then columns 5..36.
    ds = one(f"npz:{tmp_path / 'w.npz'}")
    np.testing.assert_array_equal(ds.images[1], pil_bilinear(wide[1, ..., :3], (43, 32))[:, 5:37])


def test_load_ood_sets_resize_applies_to_own_files_and_the_name_wins(tmp_path):
    big = np.zeros((1, 40, 40, 3), np.uint8)
    big[0, 4:36, 4:36] = 200  # the centre 32x32 is 200, a 4-pixel frame is 0
    np.savez(tmp_path / "f.npz", images=big)
    sets = load_ood_sets(
        [f"npz:{tmp_path / 'f.npz'}", f"npz:{tmp_path / 'f.npz'}@squash", "gaussian"],
        resize="center_crop",
        num_synthetic=4,
    )
    assert (sets[f"npz:{tmp_path / 'f.npz'}"].images == 200).all()
    assert (sets[f"npz:{tmp_path / 'f.npz'}@squash"].images[0, 0, 0] < 200).all()
    assert len(sets["gaussian"]) == 4


@pytest.mark.parametrize(
    ("images", "says"),
    [
        (np.zeros((2, 32, 32, 3), np.float32), r"must be uint8 .*dtype float32.*\* 255"),
        (np.zeros((2, 32, 32, 3), np.int16), r"must be uint8 .*dtype int16.*astype\(np.uint8\)"),
        (np.zeros((2, 3, 32, 32), np.uint8), r"channels first \(\[N, C, H, W\]\).*transpose"),
        (np.zeros((2, 1, 28, 28), np.uint8), r"channels first"),
        (np.zeros((32, 32, 3), np.uint8), r"one image \[H, W, C\].*images\[None\]"),
        (np.zeros((2, 32, 32, 2), np.uint8), r"expected \[N, H, W, C\]"),
        (np.zeros((0, 32, 32, 3), np.uint8), r"holds no images"),
    ],
)
def test_npz_images_that_cannot_be_meant_are_refused(tmp_path, images, says):
    path = tmp_path / "x.npz"
    np.savez(path, images=images)
    with pytest.raises(ValueError, match=says) as err:
        one(f"npz:{path}")
    assert str(path) in str(err.value)


def test_ragged_npz_and_empty_encoded_npz(tmp_path):
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((32, 32, 3), np.uint8), np.zeros((40, 30, 3), np.uint8)
    np.savez(tmp_path / "r.npz", images=ragged)
    with pytest.raises(ValueError, match=r"Python objects \(images of different sizes\?\)"):
        one(f"npz:{tmp_path / 'r.npz'}")
    np.savez(tmp_path / "e.npz", encoded=np.zeros(0, np.uint8), offsets=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match=r"e\.npz' holds no images"):
        one(f"npz:{tmp_path / 'e.npz'}")


# ---- folders ---------------------------------------------------------------------------


def save(path, array):
    """Saves ``array`` as an image file; its dtype and shape give the mode (L, RGB, RGBA,
    I;16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_flat_folder_every_image_at_any_depth_sorted_by_path(tmp_path):
    root = tmp_path / "own"
    colour = lambda v: np.full((32, 32, 3), v, np.uint8)  # noqa: E731
    save(root / "b.png", colour(30))
    save(root / "a" / "z.png", colour(10))
    save(root / "a-b" / "y.PNG", colour(20))  # '-' sorts before '/', yet folder "a" is first
    save(root / "a" / "deeper" / "x.bmp", colour(15))
    save(root / "gray.png", np.full((28, 28), 99, np.uint8))  # scaled up, replicated
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 60, 0  # fully transparent: alpha dropped, not composited
    save(root / "rgba.png", rgba)
    (root / "notes.txt").write_text("ignored")
    (root / "._b.png").write_bytes(b"macOS metadata, not an image")  # hidden: skipped
    (root / ".cache").mkdir()
    (root / ".cache" / "c.png").write_bytes(b"hidden folder: skipped")
    ds = one(f"folder:{root}")
    # (a, deeper, x.bmp) < (a, z.png) < (a-b, y.PNG) < (b.png,) < (gray.png,) < (rgba.png,)
    assert [int(im[0, 0, 0]) for im in ds.images] == [15, 10, 20, 30, 99, 60]
    assert (ds.images[4] == 99).all() and (ds.images[5] == 60).all()
    assert (ds.labels == -1).all() and ds.num_classes == 0
    assert ds.source == (
        f"folder {root}, every image file (1 of 6 images to 32x32 by shorter_side_crop)"
    )
    assert [p.name for p in image_files(root)][:2] == ["x.bmp", "z.png"]
    # A plain path is the same set; a flat folder is not in-distribution data.
    np.testing.assert_array_equal(one(str(root)).images, ds.images)
    with pytest.raises(ValueError, match="no split folder"):
        D.load_dataset(f"folder:{root}", "test")


def test_flat_folder_sizes_follow_the_rule(tmp_path):
    rng = np.random.default_rng(4)
    wide = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)  # H=48, W=64
    save(tmp_path / "f" / "wide.png", wide)
    centre = one(f"folder:{tmp_path / 'f'}@center_crop")
    np.testing.assert_array_equal(centre.images[0], wide[8:40, 16:48])
    squash = one(f"folder:{tmp_path / 'f'}@squash")
    np.testing.assert_array_equal(squash.images[0], pil_bilinear(wide, (32, 32)))
    with pytest.raises(ValueError, match=r"wide\.png \(index 0\): image is 64x48, expected 32x32"):
        one(f"folder:{tmp_path / 'f'}@none")


def test_folder_layouts_split_folder_and_class_folders(tmp_path):
    colour = lambda v: np.full((32, 32, 3), v, np.uint8)  # noqa: E731
    # root/test/ holding images directly (ImageFolder-like releases): that folder is read.
    save(tmp_path / "r1" / "test" / "1.png", colour(1))
    save(tmp_path / "r1" / "train" / "2.png", colour(2))
    assert [int(v) for v in one(f"folder:{tmp_path / 'r1'}").images[:, 0, 0, 0]] == [1]
    assert [int(v) for v in one(f"folder:{tmp_path / 'r1'}:train").images[:, 0, 0, 0]] == [2]
    with pytest.raises(ValueError, match=r"no split folder .*val'; leave the ':val' out"):
        one(f"folder:{tmp_path / 'r1'}:val")
    with pytest.raises(ValueError, match="no split folder"):
        check_ood_set_names([f"folder:{tmp_path / 'r1'}:val@squash"])
    # root/test/<class>/<image>: read as before, class labels kept.
    save(tmp_path / "r2" / "test" / "b" / "1.png", colour(5))
    save(tmp_path / "r2" / "test" / "a" / "1.png", colour(6))
    labelled = one(f"folder:{tmp_path / 'r2'}")
    np.testing.assert_array_equal(labelled.labels, [0, 1])
    assert [int(v) for v in labelled.images[:, 0, 0, 0]] == [6, 5]


def test_folder_errors_name_what_is_wrong(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"no image files under .*empty'.*at every depth"):
        one(f"folder:{tmp_path / 'empty'}")
    save(tmp_path / "bad" / "0.png", np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "bad" / "1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"bad/1\.jpg \(index 1\): cannot decode the image"):
        one(f"folder:{tmp_path / 'bad'}")
    save(tmp_path / "deep" / "16bit.png", np.full((32, 32), 1000, np.uint16))
    with pytest.raises(ValueError, match=r"16bit\.png \(index 0\): .*16-bit or float pixels"):
        one(f"folder:{tmp_path / 'deep'}")


# ---- names -----------------------------------------------------------------------------


def test_rule_suffix_is_part_of_the_name_only_for_own_files(tmp_path):
    assert split_resize_rule("npz:/d/own.npz@squash") == ("npz:/d/own.npz", "squash")
    assert split_resize_rule("npz:/d/a@b.npz") == ("npz:/d/a@b.npz", None)
    assert is_own_files("/d/own@squash") and is_own_files("folder:/d/x:val@box")
    assert not is_own_files("svhn") and not is_own_files("tfds:imagenet_resized/32x32")
    assert with_resize("npz:/d/own.npz", "center_crop") == "npz:/d/own.npz@center_crop"
    assert with_resize("npz:/d/own.npz@squash", "center_crop") == "npz:/d/own.npz@squash"
    assert with_resize("svhn", "center_crop") == "svhn"
    with pytest.raises(ValueError, match="unknown resize rule 'crop'"):
        with_resize("npz:/d/own.npz", "crop")
    with pytest.raises(ValueError, match=r"@squash\) applies only to your own files"):
        check_ood_set_names(["svhn@squash"])
    with pytest.raises(ValueError, match=r"@squash\) applies only to your own files"):
        one("textures_partial@squash")
    np.savez(tmp_path / "o.npz", images=np.zeros((1, 32, 32, 3), np.uint8))
    check_ood_set_names([f"{tmp_path}/o.npz@center_crop", f"npz:{tmp_path}/o.npz@none"])
    with pytest.raises(ValueError, match=r"no file .*'@centre_crop' is not a resize rule"):
        check_ood_set_names([f"npz:{tmp_path}/o.npz@centre_crop"])
    with pytest.raises(ValueError, match=r"`resize` must be one of"):
        one(f"npz:{tmp_path}/o.npz", resize="crop")
    with pytest.raises(ValueError, match=r"`resize` applies to your own files"):
        D.load_dataset("textures_partial", "test", resize="squash")


# ---- the command line ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 4-step smoke-preset run on CIFAR-like npz files (no end-of-training report)."""
    from experiments.configs import default as presets
    from experiments.train import train_and_evaluate

    data = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 40)):
        labels = rng.integers(0, 10, n).astype(np.int32)
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        np.savez(data / f"cifar10_{split}.npz", images=images, labels=labels)
    config = presets.get_config("smoke", "logitnorm")
    config.data.source = str(data)
    config.data.train_limit = 0
    config.data.test_limit = 0
    config.data.eval_batch_size = 40
    config.train.batch_size = 16
    config.train.epochs = 1
    config.train.progress = False
    config.eval.ood = False
    run = tmp_path_factory.mktemp("run")
    train_and_evaluate(config, run)
    # The user's sets: an npz of 64x64 images without labels, a flat folder of mixed sizes.
    own = tmp_path_factory.mktemp("own")
    big = rng.integers(0, 256, (20, 64, 64, 3), dtype=np.uint8)
    np.savez(own / "own64.npz", images=big)
    for i in range(20):
        size = (40 + i, 36) if i % 2 else (32, 32)
        save(own / "flat" / f"{i:02d}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return run, data, own, big


CLI_ARGS = ["--scores=msp", "--num_draws=1", "--max_train=32", "--config.eval.adversarial_noise=0"]


@pytest.mark.slow
def test_cli_reads_own_sets_with_the_chosen_rule(tiny_run, tmp_path):
    from experiments import evaluate as cli

    run, data, own, big = tiny_run
    out = tmp_path / "report"
    npz, flat = f"npz:{own / 'own64.npz'}", str(own / "flat")
    results = cli.main(
        [
            f"--workdir={run}",
            f"--data_dir={data}",
            f"--ood_sets={npz},{flat}@squash,gaussian",
            "--ood_resize=center_crop",
            "--num_synthetic=20",
            f"--out_dir={out}",
            *CLI_ARGS,
        ]
    )
    on_disk = json.loads((out / "results.json").read_text())
    assert results["data"] == on_disk["data"]
    # The flag is written into the name of the set without a rule; a name's own rule wins.
    names = [f"{npz}@center_crop", f"{flat}@squash", "gaussian"]
    assert list(on_disk["config"]["eval"]["ood_sets"]) == names
    sets = on_disk["data"]["ood"]
    assert set(sets) == set(names)
    assert sets[names[0]]["num_examples"] == 20
    assert (
        sets[names[0]]["source"] == f"{own / 'own64.npz'} (20 of 20 images to 32x32 by center_crop)"
    )
    assert sets[names[1]]["source"].endswith("(10 of 20 images to 32x32 by squash)")
    # The pixels the model saw: the centre crops (the scores of the same images loaded here).
    ds = one(names[0])
    np.testing.assert_array_equal(ds.images, big[:, 16:48, 16:48])
    scores = np.load(out / "scores.npz")
    assert scores[f"ood/{names[0]}/msp"].shape == (20,)


@pytest.mark.slow
def test_cli_user_errors_are_one_line(tiny_run, tmp_path, capsys):
    run, data, own, _ = tiny_run
    base = [f"--workdir={run}", f"--data_dir={data}", f"--out_dir={tmp_path / 'x'}", *CLI_ARGS]
    npz = f"--ood_sets=npz:{own / 'own64.npz'}"
    err = user_error(capsys, [*base, npz, "--ood_resize=crop"])
    assert "--ood_resize 'crop': unknown rule; the rules: none, shorter_side_crop" in err
    err = user_error(capsys, [*base, "--ood_sets=gaussian", "--ood_resize=squash"])
    assert "applies to your own sets" in err and "they name none" in err
    err = user_error(capsys, [*base, "--ood_resize=squash"])
    assert "they name none" in err
    err = user_error(capsys, [*base, npz, "--ood_resize=none"])
    assert "own64.npz, image 0: image is 64x64, expected 32x32" in err
    err = user_error(capsys, [*base, f"--ood_sets=npz:{own / 'own64.npz'}@centre_crop"])
    assert "'@centre_crop' is not a resize rule" in err
    assert not (tmp_path / "x").exists()
