"""tfds sources through tfds.testing.mock_data (offline), and the unavailable-dataset error."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ood_jax import data
from ood_jax.data import sources


@pytest.fixture(autouse=True)
def network_up(monkeypatch):
    """The machine's network answers: the probe before a tfds download reaches a socket
    listening here (these tests use mocked or failing tfds builders, no real download)."""
    import socket

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    monkeypatch.setattr(sources, "NETWORK_PROBE", listening.getsockname())
    yield
    listening.close()


def reference_examples(tfds_name, split):
    """The mocked examples, read one by one through plain tfds (independent of ood_jax)."""
    return list(tfds.as_numpy(tfds.load(tfds_name, split=split)))


def test_cifar10_through_mock_tfds():
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load_dataset("cifar10", "train")
        ref = reference_examples("cifar10", "train")
    assert ds.images.shape == (12, 32, 32, 3) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.images, np.stack([ex["image"] for ex in ref]))
    np.testing.assert_array_equal(ds.labels, [ex["label"] for ex in ref])
    assert ds.source.startswith("tfds cifar10/")
    batch = next(data.train_iterator(ds, batch_size=4, seed=0, process_index=0, process_count=1))
    assert batch["image"].shape == (4, 32, 32, 3)


def test_textures_through_mock_tfds_resized_to_32():
    # Mocked DTD images have random sizes: exercises the shorter-side + centre-crop rule.
    with tfds.testing.mock_data(num_examples=4):
        ds = data.load_dataset("textures", "test")
        ref = reference_examples("dtd", "test")
    assert ds.images.shape == (4, 32, 32, 3) and ds.num_classes == 47
    from PIL import Image

    for image, ex in zip(ds.images, ref, strict=True):
        h, w = ex["image"].shape[:2]
        scale = 32 / min(h, w)
        new_w, new_h = max(32, round(w * scale)), max(32, round(h * scale))
        resized = np.asarray(Image.fromarray(ex["image"]).resize((new_w, new_h), Image.BILINEAR))
        top, left = (new_h - 32) // 2, (new_w - 32) // 2
        np.testing.assert_array_equal(image, resized[top : top + 32, left : left + 32])


@pytest.mark.parametrize(("num", "count"), [(103, 3), (10000, 7), (5, 8), (64, 2)])
def test_shard_bounds_equal_tfds_even_splits(num, count):
    infos = tfds.core.SplitDict(
        [tfds.core.SplitInfo(name="test", shard_lengths=[num], num_bytes=0)]
    )
    for p, split in enumerate(tfds.even_splits("test", n=count)):
        (inst,) = split.to_absolute(infos)
        expected = (inst.from_ or 0, num if inst.to is None else inst.to)
        assert data.shard_bounds(num, process_index=p, process_count=count) == expected


class _OfflineBuilder:
    """Stands in for a tfds builder on a machine without internet."""

    def is_prepared(self):
        return False

    def download_and_prepare(self, **kwargs):
        raise ConnectionError("Failed to reach http://ufldl.stanford.edu/housenumbers/\nretries")


def test_unavailable_tfds_dataset_gives_one_clear_error(monkeypatch):
    # The network answers (the probe passes, see network_up), the download itself fails.
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: _OfflineBuilder())
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset("svhn", "test")
    message = str(info.value)
    assert "'svhn'" in message and "'svhn_cropped'" in message
    assert "local_path=" in message and "ConnectionError: Failed to reach" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained trace
    with pytest.raises(data.DatasetUnavailableError, match="cifar10_jpeg"):
        data.load_dataset("cifar10", "train")  # names the offline stand-in


@pytest.mark.parametrize(
    ("name", "split", "limit", "expected"),
    [
        ("places365", "test", 100, ("places365_small", "test[:100]")),
        ("textures", "all", None, ("dtd", "train+validation+test")),
        ("lsun_classroom", "validation", None, ("lsun/classroom", "validation")),
        (
            "tfds:imagenet_resized/32x32",
            "validation",
            None,
            ("imagenet_resized/32x32", "validation"),
        ),
    ],
)
def test_name_and_split_mapping(monkeypatch, name, split, limit, expected):
    seen = []

    class Builder:
        def __init__(self, tfds_name):
            self.tfds_name = tfds_name
            self.info = type("Info", (), {"file_format": "array_record"})()

        def is_prepared(self):
            return True

        def as_data_source(self, split):
            seen.append((self.tfds_name, split))
            raise RuntimeError("stop after recording the request")

    monkeypatch.setattr(tfds, "builder", lambda tfds_name, data_dir=None: Builder(tfds_name))
    with pytest.raises(data.DatasetUnavailableError, match="stop after recording"):
        data.load_dataset(name, split, limit=limit)
    assert seen == [expected]


def test_limit_with_combined_split_is_rejected():
    with pytest.raises(ValueError, match="limit"):
        data.load_dataset("textures", "all", limit=5)


def test_offline_tfds_download_fails_in_seconds(tmp_path, monkeypatch):
    """A real tfds builder, unprepared, with the network unreachable: a probe to a closed
    port (nothing listens there) answers at once instead of tfds's minutes of retries."""
    import socket
    import time

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setattr(sources, "NETWORK_PROBE", ("127.0.0.1", port))
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset("svhn", "test", tfds_data_dir=tmp_path)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "no network" in message and f"127.0.0.1:{port}" in message
    assert "--data local" in message and "local_path=" in message
    assert not any(tmp_path.rglob("*.array_record*"))  # nothing downloaded or prepared
