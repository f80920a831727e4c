"""Image decoding, the 32x32 conversion rules, and the decoded-array cache.

Decoding uses PIL (one thread: measured here, PIL JPEG decoding of 32x32
images does not speed up with threads). It happens once per file: the decoded
uint8 array is cached on disk (see :func:`cached`), so the hot path of the
pipeline never touches an encoded image.

Conversions (the only ones; anything else is an error naming the image):

* any 8-bit non-RGB mode (grayscale ``L``, ``P``, ``CMYK``, ``RGBA``, ``LA``...) -> RGB
  through ``PIL.Image.convert("RGB")``: grayscale is replicated to 3 channels, an alpha
  channel is dropped (not composited); 16-bit and float images (modes ``I``, ``I;16``,
  ``F``) are errors, since their value range is not the 0-255 of the network's inputs;
* sizes, by the ``resize`` rule of the caller (:data:`RESIZE_RULES`; an image already of
  the expected size is never changed):
  ``"none"`` the image must already be the expected size;
  ``"shorter_side_crop"`` the shorter side is resized to 32 (PIL bilinear) and the
  centre 32x32 is cropped, as ``Resize(32), CenterCrop(32)`` in the Outlier Exposure /
  energy repositories' OOD loaders (smaller images are scaled up the same way);
  ``"center_crop"`` the centre 32x32, no scaling (left/top offset ``(W - 32) // 2`` /
  ``(H - 32) // 2``); an image smaller than 32 on a side is an error;
  ``"squash"`` resized to 32x32 whatever its aspect ratio (PIL bilinear, which averages
  over the footprint when shrinking);
  ``"box"`` resized to 32x32 by area averaging (PIL ``BOX``; exactly the 2x2 mean for
  64x64 Tiny ImageNet; a non-square image is squashed).

Decoded arrays (an npz ``images`` array) follow the same rules through
:func:`convert_array`.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: The size rules, by name (module docstring).
RESIZE_RULES = ("none", "shorter_side_crop", "center_crop", "squash", "box")
# PIL modes of more than 8 bits per channel: their values are not 0-255 pixels.
_WIDE_MODES = ("I", "F")
# Bump when decoding or a conversion rule changes, so stale caches are not reused.
_CACHE_VERSION = 1


def _check_rule(resize: str) -> None:
    if resize not in RESIZE_RULES:
        raise ValueError(f"`resize` must be one of {RESIZE_RULES}, got {resize!r}.")


def convert_image(
    image: Image.Image, *, size: tuple[int, int], resize: str, where: str
) -> np.ndarray:
    """Converts one decoded PIL image to uint8 ``[H, W, 3]`` with ``(W, H) == size``.

    Args:
      image: a loaded PIL image of any 8-bit mode.
      size: expected ``(width, height)`` after the resize rule.
      resize: one of ``RESIZE_RULES`` (see the module docstring).
      where: text naming the image (file, index) for error messages.
    """
    _check_rule(resize)
    if image.mode.split(";")[0] in _WIDE_MODES:
        raise ValueError(
            f"{where}: the image has 16-bit or float pixels (PIL mode {image.mode}); "
            "save it as an 8-bit image (RGB or grayscale)."
        )
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")
        except (ValueError, OSError) as err:
            raise ValueError(
                f"{where}: cannot convert the image (PIL mode {image.mode}) to RGB ({err}); "
                "save it as an 8-bit RGB or grayscale image."
            ) from None
    if image.size != size:
        width, height = image.size
        if resize == "box":
            image = image.resize(size, Image.Resampling.BOX)
        elif resize == "squash":
            image = image.resize(size, Image.Resampling.BILINEAR)
        elif resize == "shorter_side_crop":
            scale = max(size[0] / width, size[1] / height)
            new = (max(size[0], round(width * scale)), max(size[1], round(height * scale)))
            image = image.resize(new, Image.Resampling.BILINEAR)
            left, top = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
            image = image.crop((left, top, left + size[0], top + size[1]))
        elif resize == "center_crop":
            if width < size[0] or height < size[1]:
                raise ValueError(
                    f"{where}: image is {width}x{height}, smaller than {size[0]}x{size[1]}, "
                    "so resize='center_crop' cannot crop it; use 'shorter_side_crop' or "
                    "'squash', which scale it."
                )
            left, top = (width - size[0]) // 2, (height - size[1]) // 2
            image = image.crop((left, top, left + size[0], top + size[1]))
        else:
            raise ValueError(
                f"{where}: image is {width}x{height}, expected {size[0]}x{size[1]}; resize "
                f"it, or load it with a resize rule ({', '.join(RESIZE_RULES[1:])})."
            )
    return np.asarray(image, dtype=np.uint8)


def convert_array(
    images: np.ndarray, *, size: tuple[int, int], resize: str, where: str
) -> tuple[np.ndarray, int]:
    """Decoded images (an npz ``images`` array) -> ``(uint8 [N, H, W, 3], resized)``.

    ``images`` is uint8 ``[N, H, W, C]`` (channels last, ``C`` 1, 3 or 4) or
    ``[N, H, W]`` (grayscale). Grayscale is replicated to RGB and an alpha channel
    dropped; images not of ``size`` (``(width, height)``) follow ``resize`` (module
    docstring), through PIL exactly as encoded images do. ``resized`` is how many
    images changed size (0 or N). Anything else is a ``ValueError`` naming ``where``
    and saying how to fix it: another dtype (floats, signed or wider integers), channels
    first (``[N, C, H, W]``), a single image without the ``N`` axis, no images.
    """
    _check_rule(resize)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating):
            fix = "floats in [0, 1]: (x * 255).round().astype(np.uint8)"
        elif np.issubdtype(images.dtype, np.integer):
            fix = "integers in [0, 255]: x.astype(np.uint8); wider ranges must be rescaled"
        else:
            fix = "8-bit pixels in [0, 255]"
        raise ValueError(
            f"{where}: `images` must be uint8 pixels in [0, 255], got dtype {images.dtype}; "
            f"convert them first ({fix}) and save the file again."
        )
    shape = images.shape
    channels_first = images.ndim == 4 and shape[1] in (1, 3, 4) and shape[-1] not in (1, 3, 4)
    if channels_first:
        raise ValueError(
            f"{where}: `images` has shape {shape}, channels first ([N, C, H, W]); the "
            "images must be channels last, [N, H, W, C]: save images.transpose(0, 2, 3, 1)."
        )
    if images.ndim == 3 and shape[-1] in (3, 4):
        raise ValueError(
            f"{where}: `images` has shape {shape}: one image [H, W, C], or grayscale images "
            f"{shape[-1]} pixels wide? Save N images as [N, H, W, C] (one image: images[None]) "
            "or grayscale as [N, H, W]."
        )
    if images.ndim == 4 and shape[-1] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (3, 4))):
        raise ValueError(
            f"{where}: `images` has shape {shape}; expected [N, H, W, C] (C = 1, 3 or 4, "
            "channels last) or [N, H, W] (grayscale)."
        )
    if images.shape[0] == 0 or 0 in images.shape[1:3]:
        raise ValueError(f"{where}: `images` holds no images (shape {shape}).")
    n, height, width = images.shape[:3]
    if (width, height) != size:
        out = np.empty((n, size[1], size[0], 3), np.uint8)
        for i in range(n):
            out[i] = convert_image(
                Image.fromarray(images[i]), size=size, resize=resize, where=f"{where}, image {i}"
            )
        return out, n
    if images.ndim == 3:
        return np.repeat(images[..., None], 3, axis=-1), 0
    return np.ascontiguousarray(images[..., :3]), 0


def decode_bytes(data: bytes | np.ndarray, *, where: str) -> Image.Image:
    """Decodes one encoded image (JPEG, PNG, ...) fully; a clear error if it is corrupt."""
    try:
        image = Image.open(io.BytesIO(memoryview(data)))
        image.load()
    except Exception as err:  # PIL raises several types for corrupt data.
        raise ValueError(
            f"{where}: cannot decode the image ({type(err).__name__}: {err}); the file is "
            "corrupt or not an image: remove or replace it."
        ) from None
    return image


def decode_encoded(
    encoded: np.ndarray,
    offsets: np.ndarray,
    *,
    size: tuple[int, int],
    resize: str,
    where: str,
    indices: Sequence[int] | np.ndarray | None = None,
    stats: dict | None = None,
) -> np.ndarray:
    """Decodes images ``encoded[offsets[i]:offsets[i + 1]]`` into uint8 ``[n, H, W, 3]``.

    Args:
      encoded: uint8 ``[total_bytes]``, the image files concatenated.
      offsets: int ``[N + 1]``, nondecreasing, ``offsets[0] == 0``.
      size: expected ``(width, height)`` of the output.
      resize: the size rule (module docstring).
      where: the file name, used in error messages with the image index.
      indices: which images (default: all, in order).
      stats: if given, ``stats["resized"]`` is set to how many images changed size.
    """
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.size < 1 or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{where}: `offsets` must be a nondecreasing 1-D array of N + 1 ints.")
    if offsets[-1] > encoded.size:
        raise ValueError(
            f"{where}: offsets end at byte {int(offsets[-1])} but `encoded` has only "
            f"{encoded.size} bytes; the file is truncated."
        )
    if indices is None:
        indices = range(offsets.size - 1)
    out = np.empty((len(indices), size[1], size[0], 3), np.uint8)
    resized = 0
    for row, i in enumerate(indices):
        label = f"{where}, image {int(i)}"
        image = decode_bytes(encoded[offsets[i] : offsets[i + 1]], where=label)
        resized += image.size != size
        out[row] = convert_image(image, size=size, resize=resize, where=label)
    if stats is not None:
        stats["resized"] = resized
    return out


def default_cache_dir() -> Path:
    """``$OOD_JAX_CACHE_DIR`` if set, else ``~/.cache/ood_jax``."""
    env = os.environ.get("OOD_JAX_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "ood_jax"


def cached(
    path: str | os.PathLike,
    build: Callable[[], dict[str, np.ndarray]],
    *,
    key: str,
    cache_dir: str | os.PathLike | None,
) -> dict[str, np.ndarray]:
    """Returns ``build()``, cached on disk for the file ``path``.

    The cache entry is keyed by the file's absolute path, size and mtime, the
    ``key`` text (what was built from it) and a format version, so an edited
    file or a changed rule is decoded again. Entries are written to a temporary
    file and renamed (atomic on POSIX), so concurrent runs never read half a
    file. Pass ``cache_dir=""`` to disable the cache.
    """
    if cache_dir == "":
        return build()
    stat = os.stat(path)
    ident = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{key}|{_CACHE_VERSION}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:24]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = directory / f"{Path(path).stem}-{digest}.npz"
    if entry.exists():
        try:
            with np.load(entry) as data:
                return {name: data[name] for name in data.files}
        except Exception:  # A damaged entry is rebuilt rather than trusted.
            pass
    arrays = build()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    except OSError:
        return arrays  # A read-only home must not stop training; the next run decodes again.
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, entry)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
    return arrays
