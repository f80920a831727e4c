"""Dataset sources: tfds, npz files, image folders.

Each returns an :class:`~ood_jax.data.dataset.ImageDataset` (uint8
``[N, 32, 32, 3]`` + int32 labels), so one pipeline serves all. Which source
serves a dataset name is decided by its entry in :mod:`ood_jax.data.registry`.
"""

from __future__ import annotations

import os
import socket
import zipfile
from pathlib import Path

import numpy as np

from ood_jax.data import decode
from ood_jax.data.dataset import IMAGE_SIZE, ImageDataset, subset_indices

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# tfds retries a download for minutes when offline; before one, a connection to its
# storage host (seconds) says at once that the network is unreachable.
NETWORK_PROBE = ("storage.googleapis.com", 443)
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")


class DatasetUnavailableError(RuntimeError):
    """A tfds dataset could not be loaded or downloaded; the message says how to use local files."""


def default_data_dir() -> Path | None:
    """The offline data folder: ``$OOD_JAX_DATA_DIR`` if set, else None.

    The library never guesses it from where it is installed; the project's commands,
    run from a checkout, set the variable to the workplace's folder (:mod:`experiments`).
    """
    env = os.environ.get("OOD_JAX_DATA_DIR")
    return Path(env) if env else None


def open_npz(path: str | os.PathLike):
    """``np.load(path)`` of an .npz archive, with a clear error for a corrupt file.

    A truncated download or a file of other bytes otherwise fails deep in zipfile
    (``BadZipFile``) or with NumPy's advice about ``allow_pickle``.
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"{str(path)!r} is not a readable .npz archive ({type(err).__name__}); the file "
            "is corrupt or truncated: download or write it again."
        ) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{str(path)!r} holds a single array, not an .npz archive of arrays.")
    return data


# The seed of ``limit=`` subsets: the same images every call.
LIMIT_SEED = 0


def limit_indices(total: int, limit: int | None) -> np.ndarray:
    """The file positions a ``limit=`` load reads: all ``total`` when ``limit`` is None,
    else a seeded random ``limit`` of them (:data:`LIMIT_SEED`), in file order.

    Random, not the first ``limit``: the offline files are sorted by class, so the first
    images would be one class only. On a class-sorted file every class is represented in
    about its share.
    """
    if limit is None or limit >= total:
        return np.arange(total)
    if limit < 1:
        raise ValueError(f"`limit` must be >= 1 (or None for all), got {limit}.")
    return subset_indices(total, limit, seed=LIMIT_SEED)


def from_npz(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    num_classes: int | None = None,
    resize: str = "none",
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ImageDataset:
    """Loads an npz file in either format of docs/data.md.

    * encoded: ``encoded`` (uint8, the image files concatenated), ``offsets``
      (int64 ``[N + 1]``), ``labels`` (int32 ``[N]``, -1 = none), ``label_names``;
      decoded with PIL (grayscale -> RGB) and cached on disk when fully decoded.
    * decoded: ``images`` (uint8 ``[N, 32, 32, 3]``, or grayscale ``[N, 32, 32]`` /
      ``[N, 32, 32, 1]``, repeated to RGB) and ``labels``.

    Args:
      path: the npz file.
      name: dataset name (default: the file stem).
      num_classes: default ``len(label_names)`` if present, else ``max(labels) + 1``.
      resize: 32x32 rule for encoded images of another size (:mod:`ood_jax.data.decode`).
      limit: decode only a seeded random ``limit`` of the images (:func:`limit_indices`:
        the same every call, every class of a class-sorted file; quick runs, tests; not
        cached).
      cache_dir: decoded-array cache folder (default ``~/.cache/ood_jax``; ``""`` = off).
    """
    path = Path(path)
    name = name or path.stem
    if not path.is_file():
        raise ValueError(f"from_npz: `path` {str(path)!r} does not exist or is not a file.")
    with open_npz(path) as data:
        files = set(data.files)
        if {"encoded", "offsets", "labels"} <= files:
            offsets = data["offsets"]
            chosen = limit_indices(offsets.size - 1, limit)
            labels = data["labels"][chosen].astype(np.int32)
            names = data["label_names"] if "label_names" in files else np.zeros((0,), str)
            encoded = data["encoded"]
            build = lambda: {
                "images": decode.decode_encoded(
                    encoded,
                    offsets,
                    size=(IMAGE_SIZE, IMAGE_SIZE),
                    resize=resize,
                    where=str(path),
                    indices=chosen,
                )
            }
            if limit is None:
                images = decode.cached(path, build, key=f"rgb32|{resize}", cache_dir=cache_dir)
            else:
                images = build()
            images = images["images"]
        elif {"images", "labels"} <= files:
            chosen = limit_indices(len(data["labels"]), limit)
            images = data["images"][chosen]
            labels = data["labels"][chosen].astype(np.int32)
            names = data["label_names"] if "label_names" in files else np.zeros((0,), str)
        else:
            raise ValueError(
                f"from_npz: {str(path)!r} has arrays {sorted(files)}; expected either "
                "'encoded', 'offsets', 'labels' (encoded format) or 'images', 'labels' "
                "(decoded format), see docs/data.md."
            )
    if num_classes is None:
        num_classes = len(names) if len(names) else int(max(labels.max(initial=-1), -1)) + 1
    if images.ndim == 3:  # grayscale [N, H, W]
        images = images[..., None]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return ImageDataset(images, labels, name=name, num_classes=num_classes, source=str(path))


def from_folder(
    root: str | os.PathLike,
    split: str,
    *,
    name: str | None = None,
    resize: str = "none",
) -> ImageDataset:
    """Loads ``root/<split>/<class>/*.jpg|jpeg|png``.

    Class folders are sorted by name and numbered from 0; files are read in
    sorted order within each class. Grayscale/palette images are converted to
    RGB; other sizes follow ``resize`` (default: an error naming the file).
    Folders are decoded on every call (no cache).
    """
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        if root.is_dir():
            available = sorted(p.name for p in root.iterdir() if p.is_dir()) or "none"
        else:
            available = "none (no such folder)"
        raise ValueError(
            f"from_folder: no split folder {str(split_dir)!r}; splits under {str(root)!r}: "
            f"{available}. Expected root/<split>/<class>/*.png|jpg."
        )
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    files, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((split_dir / cls).iterdir()):
            if file.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(file)
                labels.append(label)
    if not files:
        raise ValueError(
            f"from_folder: the split {str(split_dir)!r} is empty: no {IMAGE_EXTENSIONS} files in "
            f"class folders (found classes {classes})."
        )
    images = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, file in enumerate(files):
        where = f"{file} (index {i})"
        image = decode.decode_bytes(file.read_bytes(), where=where)
        images[i] = decode.convert_image(
            image, size=(IMAGE_SIZE, IMAGE_SIZE), resize=resize, where=where
        )
    return ImageDataset(
        images,
        np.asarray(labels, np.int32),
        name=name or root.name,
        num_classes=len(classes),
        source=f"folder {split_dir}",
    )


def from_tfds(
    tfds_name: str,
    split: str,
    *,
    name: str | None = None,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    num_classes: int | None = None,
    offline: str | None = None,
) -> ImageDataset:
    """Materializes a tfds split as an :class:`ImageDataset`.

    A dataset that is not prepared yet is downloaded and prepared in tfds's
    ``array_record`` format, which is then read through ``tfds.data_source``: random
    access, images decoded with PIL, **no TensorFlow**. Preparing runs tfds's
    builders, which need TensorFlow (``pip install tensorflow-cpu``); a dataset
    prepared before in the ``tfrecord`` format is read through TensorFlow. Grain is
    not needed: the split is read once into memory (CIFAR-sized data), and the
    project's own pipeline shards, shuffles and resumes it.

    32x32 images are kept as they are; others are converted (resize shorter side to
    32 bilinear, centre crop, grayscale -> RGB). Labels come from the ``label``
    feature (-1 if absent).

    Raises:
      DatasetUnavailableError: the dataset is not prepared and cannot be downloaded
        or prepared; the message says how to use local files instead.
    """
    import tensorflow_datasets as tfds

    name = name or tfds_name
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        if download and not builder.is_prepared():
            check_network()
            builder.download_and_prepare(file_format="array_record")
        array_record = str(builder.info.file_format).lower().endswith("array_record")
        if array_record:
            source = builder.as_data_source(split=split)
            examples = _data_source_examples(source)
        else:
            examples = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
        features = builder.info.features
        label_feature = features["label"] if "label" in features.keys() else None
        images, labels = [], []
        for i, ex in enumerate(examples):
            images.append(_to_32x32(ex["image"], where=f"tfds {tfds_name} {split}, example {i}"))
            labels.append(int(ex["label"]) if label_feature else -1)
    except DatasetUnavailableError:
        raise
    except Exception as err:  # tfds raises many types (network, missing module, manual dir).
        raise DatasetUnavailableError(
            _unavailable_message(name, tfds_name, split, err, offline)
        ) from None
    if num_classes is None:
        num_classes = int(getattr(label_feature, "num_classes", 0) or 0)
    return ImageDataset(
        np.stack(images) if images else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
        np.asarray(labels, np.int32),
        name=name,
        num_classes=num_classes,
        source=f"tfds {builder.info.full_name}" + (" (array_record)" if array_record else ""),
    )


def check_network(timeout: float = 3.0) -> None:
    """Raises ``ConnectionError`` unless :data:`NETWORK_PROBE` answers within ``timeout``
    seconds (skipped behind a proxy, which alone knows what is reachable)."""
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return
    host, port = NETWORK_PROBE
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(
            f"no network: {host}:{port} is unreachable ({err}), so tfds cannot download"
        ) from None


def _data_source_examples(source, chunk: int = 1024):
    """Every example of a ``tfds.data_source``, in order, fetched ``chunk`` at a time."""
    for start in range(0, len(source), chunk):
        indices = list(range(start, min(start + chunk, len(source))))
        yield from source.__getitems__(indices)


def _to_32x32(pixels: np.ndarray, *, where: str) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3):
        return pixels.astype(np.uint8, copy=False)
    from PIL import Image

    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return decode.convert_image(
        Image.fromarray(pixels),
        size=(IMAGE_SIZE, IMAGE_SIZE),
        resize="shorter_side_crop",
        where=where,
    )


def _unavailable_message(
    name: str, tfds_name: str, split: str, err: Exception, offline: str | None = None
) -> str:
    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    lines = [
        f"Dataset {name!r} (tfds {tfds_name!r}, split {split!r}) is not available: tfds could "
        f"not load or download it ({reason[:300]}).",
        "To use local files instead: on the command line pass --data local (the offline "
        "files) or --data PATH (a folder with <dataset>_{train,test}.npz or "
        "<split>/<class>/ images); from Python pass local_path= (an .npz file in the "
        "docs/data.md format, or a folder <root>/<split>/<class>/*.png|jpg) to load_dataset, "
        "or use the name 'npz:/path/file.npz' / 'folder:/path/root'; or prepare it with "
        "tfds on a machine with internet and pass tfds_data_dir=.",
    ]
    if "tensorflow" in str(err).lower() and isinstance(err, ImportError):
        lines.insert(
            1,
            "Preparing a tfds dataset runs tfds's builders, which need TensorFlow: "
            "pip install 'ood_jax[prepare]' (or tensorflow-cpu) once; reading a prepared "
            "dataset does not.",
        )
    if offline:
        lines.append(
            f"An offline stand-in exists: load_dataset({offline!r}, ...) reads it from "
            "$OOD_JAX_DATA_DIR (or data_dir=)."
        )
    return " ".join(lines)
