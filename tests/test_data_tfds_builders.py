"""tfds's own CIFAR-10 and SVHN builders, run for real with only the network replaced.

The original archives are built here in their published formats (the CIFAR-10
binary tarball, SVHN's MATLAB files) and served by an HTTP server on 127.0.0.1;
tfds's downloader fetches them with its own HTTP code (only the host is
rewritten), then extracts, parses, shuffles, writes and reads the prepared
dataset, and ood_jax's loader reads it. The one other substitution: tfds checks
each download against the checksum of the original file, which these locally
built archives cannot match, so the builders are given the checksums of the
local files instead (the check itself still runs).
"""

import functools
import http.server
import io
import os
import tarfile
import threading

import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums, downloader
from tensorflow_datasets.datasets.svhn_cropped import svhn_cropped_dataset_builder as svhn
from tensorflow_datasets.image_classification import cifar

from ood_jax import data
from ood_jax.data import sources

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
SVHN_URLS = {
    s: f"http://ufldl.stanford.edu/housenumbers/{s}_32x32.mat" for s in ("train", "test", "extra")
}
CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()

pytestmark = pytest.mark.slow


def cifar_archive(folder, rng, per_file=6):
    """``cifar-10-binary.tar.gz`` as published: records of 1 label byte + 3072 bytes
    (red, green, blue planes, row-major). Returns ``{file: (images, labels)}``."""
    contents, buf = {}, io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(name, payload):
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            images = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, 10, per_file)
            records = b"".join(
                bytes([int(label)]) + image.transpose(2, 0, 1).tobytes()
                for image, label in zip(images, labels, strict=True)
            )
            add(name, records)
            contents[name] = (images, labels)
        add("batches.meta.txt", ("\n".join(CLASSES) + "\n").encode())
    (folder / "cifar-10-binary.tar.gz").write_bytes(buf.getvalue())
    return contents


def svhn_files(folder, rng, n=5):
    """SVHN's ``<split>_32x32.mat``: X [32, 32, 3, N] uint8, y [N, 1] in 1..10 (10 = digit 0)."""
    contents = {}
    for split in SVHN_URLS:
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1))
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        contents[split] = (np.moveaxis(x, -1, 0), y[:, 0] % 10)
    return contents


@pytest.fixture
def local_internet(tmp_path, monkeypatch):
    """Serves ``tmp_path/serve`` on 127.0.0.1 and points tfds's downloads at it."""
    serve = tmp_path / "serve"
    serve.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    real_open = downloader._open_url

    def open_local(url, **kwargs):
        return real_open(
            f"http://127.0.0.1:{server.server_address[1]}/{url.rsplit('/', 1)[1]}", **kwargs
        )

    monkeypatch.setattr(downloader, "_open_url", open_local)
    monkeypatch.setattr(sources, "NETWORK_PROBE", server.server_address[:2])

    def register(builder_cls, urls):
        infos = {u: checksums.compute_url_info(serve / u.rsplit("/", 1)[1]) for u in urls}
        monkeypatch.setattr(builder_cls, "url_infos", infos)

    yield serve, register
    server.shutdown()


def as_pairs(images, labels):
    return sorted(
        (image.tobytes(), int(label)) for image, label in zip(images, labels, strict=True)
    )


def test_cifar10_and_svhn_from_tfds_builders(tmp_path, local_internet):
    serve, register = local_internet
    rng = np.random.default_rng(0)
    archive = cifar_archive(serve, rng)
    mats = svhn_files(serve, rng)
    register(cifar.Cifar10, [CIFAR_URL])
    register(svhn.Builder, list(SVHN_URLS.values()))
    data_dir = tmp_path / "tfds"

    train = data.load_dataset("cifar10", "train", tfds_data_dir=data_dir)
    test = data.load_dataset("cifar10", "test", tfds_data_dir=data_dir)
    assert train.num_classes == 10 and train.source.startswith("tfds cifar10/")
    # tfds shuffles the examples while preparing: compare as (image, label) multisets.
    batches = [archive[f"data_batch_{i}.bin"] for i in range(1, 6)]
    expected_train = as_pairs(
        np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    )
    assert as_pairs(train.images, train.labels) == expected_train
    assert as_pairs(test.images, test.labels) == as_pairs(*archive["test_batch.bin"])
    assert tfds.builder("cifar10", data_dir=data_dir).info.features["label"].names == CLASSES

    # An OOD set of the paper preset's suite.
    ood = data.load_dataset("svhn", "test", tfds_data_dir=data_dir)
    assert ood.num_classes == 10
    assert as_pairs(ood.images, ood.labels) == as_pairs(*mats["test"])


NO_TENSORFLOW = """
import importlib.abc, importlib.util, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):  # as if TensorFlow were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTensorFlow())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] == "tensorflow" else _find_spec(name, package)
)
import numpy as np
from ood_jax import data

ds = data.load_dataset("cifar10", "test", tfds_data_dir=sys.argv[1])
np.savez(sys.argv[2], images=ds.images, labels=ds.labels)
print(ds.source, "tensorflow" in sys.modules)
"""


def test_a_prepared_dataset_is_read_without_tensorflow(tmp_path, local_internet):
    import subprocess
    import sys

    serve, register = local_internet
    archive = cifar_archive(serve, np.random.default_rng(1))
    register(cifar.Cifar10, [CIFAR_URL])
    data_dir = tmp_path / "tfds"
    prepared = data.load_dataset("cifar10", "test", tfds_data_dir=data_dir)  # with TensorFlow
    assert prepared.source.endswith("(array_record)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW, str(data_dir), str(tmp_path / "read.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "False"  # TensorFlow never imported
    read = np.load(tmp_path / "read.npz")
    np.testing.assert_array_equal(read["images"], prepared.images)
    np.testing.assert_array_equal(read["labels"], prepared.labels)
    assert as_pairs(read["images"], read["labels"]) == as_pairs(*archive["test_batch.bin"])
