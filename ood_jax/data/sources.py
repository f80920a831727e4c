"""Dataset sources: tfds, npz files, image folders.

Each returns an :class:`~ood_jax.data.dataset.ImageDataset` (uint8
``[N, 32, 32, 3]`` + int32 labels), so one pipeline serves all. Which source
serves a dataset name is decided by its entry in :mod:`ood_jax.data.registry`.
Images of another size or mode follow a ``resize`` rule of
:mod:`ood_jax.data.decode`; when a rule changed the size of any image, the dataset's
``source`` says so (``"... (40 of 40 images to 32x32 by shorter_side_crop)"``), and
the report records that text.
"""

from __future__ import annotations

import os
import socket
import zipfile
from pathlib import Path

import numpy as np

from ood_jax.data import decode
from ood_jax.data.dataset import IMAGE_SIZE, ImageDataset, subset_indices

#: The image files a folder source reads (the name's ending, any case); other files
#: (notes, label lists) are ignored.
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
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


def _size_note(resized: int, total: int, resize: str) -> str:
    """The ``source`` suffix recording a size rule that changed images ("" if none did)."""
    if not resized:
        return ""
    return f" ({resized} of {total} images to {IMAGE_SIZE}x{IMAGE_SIZE} by {resize})"


def from_npz(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    num_classes: int | None = None,
    resize: str = "none",
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    require_labels: bool = True,
) -> ImageDataset:
    """Loads an npz file in either format of docs/data.md.

    * encoded: ``encoded`` (uint8, the image files concatenated), ``offsets``
      (int64 ``[N + 1]``), ``labels`` (int32 ``[N]``, -1 = none), ``label_names``;
      decoded with PIL and cached on disk when fully decoded.
    * decoded: ``images`` (uint8 ``[N, H, W, C]`` with ``C`` = 3, 1 or 4, or grayscale
      ``[N, H, W]``) and ``labels``.

    Grayscale is replicated to RGB, an alpha channel dropped; images that are not
    32x32 follow ``resize`` (:mod:`ood_jax.data.decode`: ``"none"`` refuses them).

    Args:
      path: the npz file.
      name: dataset name (default: the file stem).
      num_classes: default ``len(label_names)`` if present, else ``max(labels) + 1``.
      resize: the 32x32 rule for images of another size (:data:`decode.RESIZE_RULES`).
      limit: decode only a seeded random ``limit`` of the images (:func:`limit_indices`:
        the same every call, every class of a class-sorted file; quick runs, tests; not
        cached).
      cache_dir: decoded-array cache folder (default ``~/.cache/ood_jax``; ``""`` = off).
      require_labels: a file without ``labels`` is an error (in-distribution data); with
        False it is read with labels -1 (an OOD set, where labels mean nothing).
    """
    path = Path(path)
    name = name or path.stem
    if not path.is_file():
        raise ValueError(f"from_npz: `path` {str(path)!r} does not exist or is not a file.")
    where = str(path)
    with open_npz(path) as data:
        files = set(data.files)
        has_labels = "labels" in files
        encoded_format = {"encoded", "offsets"} <= files
        if not (encoded_format or "images" in files):
            raise ValueError(
                f"from_npz: {where!r} has arrays {sorted(files)}; expected either "
                "'encoded', 'offsets', 'labels' (encoded format) or 'images', 'labels' "
                "(decoded format; 'labels' may be left out of an OOD set), see docs/data.md."
            )
        if require_labels and not has_labels:
            raise ValueError(
                f"from_npz: {where!r} has no 'labels' array (arrays: {sorted(files)}); "
                "in-distribution data needs int32 labels [N]. An OOD set needs none: "
                "load it as an OOD set (load_ood_sets, --ood_sets) or with "
                "require_labels=False."
            )
        if encoded_format:
            offsets = data["offsets"]
            total = offsets.size - 1
        else:
            images = _npz_array(data, "images", where)
            total = images.shape[0] if images.ndim else 0
        if total < 1:
            raise ValueError(f"from_npz: {where!r} holds no images; write some into it.")
        chosen = limit_indices(total, limit)
        if has_labels:
            labels = _npz_array(data, "labels", where)
            if labels.shape != (total,) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(
                    f"from_npz: {where!r}: 'labels' must be integers [N] = [{total}] (one per "
                    f"image, -1 = none), got {labels.dtype} {labels.shape}."
                )
            labels = labels[chosen].astype(np.int32)
        else:
            labels = np.full((chosen.size,), -1, np.int32)
        names = data["label_names"] if "label_names" in files else np.zeros((0,), str)
        if encoded_format:
            encoded = data["encoded"]

            def build() -> dict[str, np.ndarray]:
                stats: dict = {}
                images = decode.decode_encoded(
                    encoded,
                    offsets,
                    size=(IMAGE_SIZE, IMAGE_SIZE),
                    resize=resize,
                    where=where,
                    indices=chosen,
                    stats=stats,
                )
                return {"images": images, "resized": np.asarray(stats["resized"])}

            if limit is None:
                # "none" keeps its key (no image can change size; the entries of the
                # offline files stay valid); the other rules' entries hold the count.
                key = f"rgb32|{resize}" + ("" if resize == "none" else "|counted")
                arrays = decode.cached(path, build, key=key, cache_dir=cache_dir)
            else:
                arrays = build()
            images, resized = arrays["images"], int(arrays.get("resized", 0))
        else:
            images, resized = decode.convert_array(
                images[chosen], size=(IMAGE_SIZE, IMAGE_SIZE), resize=resize, where=where
            )
    if num_classes is None:
        num_classes = len(names) if len(names) else int(max(labels.max(initial=-1), -1)) + 1
    return ImageDataset(
        images,
        labels,
        name=name,
        num_classes=num_classes,
        source=str(path) + _size_note(resized, len(labels), resize),
    )


def _npz_array(data, key: str, where: str) -> np.ndarray:
    """``data[key]``, with a clear error for an array NumPy cannot read without pickle."""
    try:
        return data[key]
    except ValueError:  # an object array: ragged images, or Python objects
        raise ValueError(
            f"from_npz: {where!r}: '{key}' is an array of Python objects (images of "
            "different sizes?); an npz array holds images of one size, [N, H, W, C] uint8. "
            "Put images of different sizes in a folder, or the encoded format of "
            "docs/data.md, instead."
        ) from None


def _read_images(files: list[Path], *, resize: str) -> tuple[np.ndarray, int]:
    """Decodes ``files`` into uint8 ``[N, 32, 32, 3]`` by ``resize``; ``(images, resized)``."""
    images = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    resized = 0
    for i, file in enumerate(files):
        where = f"{file} (index {i})"
        try:
            data = file.read_bytes()
        except OSError as err:
            raise ValueError(
                f"{where}: cannot read the file ({err.strerror or err}); make it readable "
                "or remove it."
            ) from None
        image = decode.decode_bytes(data, where=where)
        resized += image.size != (IMAGE_SIZE, IMAGE_SIZE)
        images[i] = decode.convert_image(
            image, size=(IMAGE_SIZE, IMAGE_SIZE), resize=resize, where=where
        )
    return images, resized


def from_folder(
    root: str | os.PathLike,
    split: str,
    *,
    name: str | None = None,
    resize: str = "none",
    limit: int | None = None,
) -> ImageDataset:
    """Loads ``root/<split>/<class>/<image>`` (:data:`IMAGE_EXTENSIONS`).

    Class folders are sorted by name and numbered from 0; files are read in
    sorted order within each class. Grayscale/palette images are converted to
    RGB, an alpha channel is dropped; other sizes follow ``resize`` (default: an error
    naming the file). ``limit``: read only a seeded random ``limit`` of the files, in
    that order (:func:`limit_indices`). Folders are decoded on every call (no cache).
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
    chosen = limit_indices(len(files), limit)
    files = [files[i] for i in chosen]
    images, resized = _read_images(files, resize=resize)
    return ImageDataset(
        images,
        np.asarray(labels, np.int32)[chosen],
        name=name or root.name,
        num_classes=len(classes),
        source=f"folder {split_dir}" + _size_note(resized, len(files), resize),
    )


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder``, at any depth, in the order the sources read them.

    Image files are those ending in :data:`IMAGE_EXTENSIONS` (any case). Hidden files
    and folders (names starting with ``.``, e.g. macOS's ``._x.jpg``) are skipped, and
    symbolic links to folders are not followed. The order is by path, folder by folder
    (the tuple of path parts, each compared as a string), so ``a/x.png`` comes before
    ``a-b/x.png`` and ``b.png``: a ``<class>/<image>`` layout is read class by class,
    as :func:`from_folder` reads it.
    """
    folder = Path(folder)
    found = []
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if path.suffix.lower() in IMAGE_EXTENSIONS and not any(p.startswith(".") for p in parts):
            if path.is_file():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def from_image_files(
    folder: str | os.PathLike,
    *,
    name: str | None = None,
    resize: str = "shorter_side_crop",
    limit: int | None = None,
) -> ImageDataset:
    """An unlabelled set of every image file under ``folder`` (an OOD set of your own).

    Files are found by :func:`image_files` (recursively, sorted by path, hidden files
    skipped, other files ignored); labels are -1 and ``num_classes`` 0. Each image is
    made 32x32 RGB: grayscale replicated, alpha dropped, sizes by ``resize``
    (:mod:`ood_jax.data.decode`; default ``"shorter_side_crop"``). ``limit``: read only
    a seeded random ``limit`` of the files, in path order (:func:`limit_indices`).
    Decoded on every call (no cache).

    Raises:
      ValueError: no such folder, no image file in it, or a file that cannot be read or
        decoded (the message names it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"from_image_files: no folder {str(folder)!r}.")
    files = image_files(folder)
    if not files:
        raise ValueError(
            f"from_image_files: no image files under {str(folder)!r} (searched at every "
            f"depth for {', '.join(IMAGE_EXTENSIONS)}); put the images there or give "
            "another folder."
        )
    chosen = limit_indices(len(files), limit)
    files = [files[i] for i in chosen]
    images, resized = _read_images(files, resize=resize)
    return ImageDataset(
        images,
        np.full((len(files),), -1, np.int32),
        name=name or folder.name,
        num_classes=0,
        source=f"folder {folder}, every image file" + _size_note(resized, len(files), resize),
    )


def from_any_folder(
    root: str | os.PathLike,
    split: str,
    *,
    name: str | None = None,
    resize: str = "shorter_side_crop",
    limit: int | None = None,
) -> ImageDataset:
    """A folder as an unlabelled (OOD) set, whatever its layout.

    The folder read is ``root/<split>`` if it exists, else ``root`` itself. When that
    folder holds images only as ``<class>/<image>`` (nothing loose, nothing deeper) and
    it is ``root/<split>``, it is read as :func:`from_folder` reads it, class labels
    included; otherwise as :func:`from_image_files`: every image file at any depth,
    labels -1.
    """
    root = Path(root)
    split_dir = root / split
    folder = split_dir if split_dir.is_dir() else root
    if not folder.is_dir():
        raise ValueError(f"no folder {str(root)!r}; give a folder holding images.")
    files = image_files(folder)
    if folder == split_dir and files and all(len(f.relative_to(folder).parts) == 2 for f in files):
        return from_folder(root, split, name=name, resize=resize, limit=limit)
    return from_image_files(folder, name=name or root.name, resize=resize, limit=limit)


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
