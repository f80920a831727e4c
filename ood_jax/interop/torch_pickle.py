"""Read ``torch.save`` files without torch and without running code from them.

A ``.pt`` / ``.pth`` / ``.ckpt`` file is a pickle, and unpickling an untrusted
pickle can run any code (``__reduce__``). This reader never imports a name the
file asks for: ``find_class`` answers only from ``_ALLOWED`` (our own stand-ins
for PyTorch's tensor and storage constructors, ``torch.Size`` as a tuple, and
``collections.OrderedDict``) and refuses everything else with
:class:`UnsafeCheckpointError` before anything is called. Tensors come back as NumPy arrays.

Two layouts are read:

- the zip layout of PyTorch >= 1.6: ``<folder>/data.pkl`` (the pickle) and one
  raw little-endian buffer per storage at ``<folder>/data/<key>``;
- the legacy layout of PyTorch < 1.6 (the outlier-exposure / energy / ODIN
  checkpoints): five pickles in a row (magic number, protocol version,
  system info, the object, the list of storage keys), then each storage as an
  int64 element count followed by its bytes, in that list's order.

Every tensor's offset, shape and strides are checked against its storage's
size before a view is taken, so a crafted file cannot read outside it.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint that is not only tensors and plain containers, or is malformed."""


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: only carries the dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    """A storage's dtype and element count; ``data`` is filled once its bytes are read."""

    def __init__(self, storage_type: Any, key: str, numel: Any):
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"storage {key!r} has no known storage type.")
        if not isinstance(numel, int) or numel < 0:
            raise UnsafeCheckpointError(f"storage {key!r} has a bad size {numel!r}.")
        self.dtype = storage_type.dtype
        self.key = key
        self.numel = numel
        self.data: np.ndarray | None = None

    def fill(self, raw: bytes) -> None:
        if len(raw) != self.numel * self.dtype.itemsize:
            raise UnsafeCheckpointError(
                f"storage {self.key!r} holds {len(raw)} bytes, expected "
                f"{self.numel} x {self.dtype.itemsize}."
            )
        self.data = np.frombuffer(raw, dtype=self.dtype)


class _PendingTensor:
    """A tensor whose storage may not be read yet (the legacy layout stores data last)."""

    def __init__(self, storage, offset, size, stride, *_ignored):
        if not isinstance(storage, _Storage):
            raise UnsafeCheckpointError("a tensor's storage is not a storage reference.")
        dims = (offset, *size, *stride)
        if len(size) != len(stride) or not all(isinstance(d, int) and d >= 0 for d in dims):
            raise UnsafeCheckpointError(f"tensor on storage {storage.key!r} has a bad layout.")
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if all(size) and last >= storage.numel:
            raise UnsafeCheckpointError(
                f"tensor on storage {storage.key!r} reaches element {last}, "
                f"past the storage's {storage.numel}."
            )
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), stride

    def materialize(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise UnsafeCheckpointError(f"storage {self.storage.key!r} has no data in the file.")
        if not all(self.size):
            return np.zeros(self.size, data.dtype)
        strides = tuple(s * data.itemsize for s in self.stride)
        view = np.lib.stride_tricks.as_strided(data[self.offset :], self.size, strides)
        return np.array(view)


def _rebuild_parameter(data, requires_grad, backward_hooks, *_ignored):
    del requires_grad, backward_hooks
    return data


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
    ("torch._utils", "_rebuild_tensor_v2"): _PendingTensor,
    ("torch._utils", "_rebuild_tensor"): _PendingTensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, storages: dict[str, _Storage]):
        super().__init__(file, encoding="latin1")
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"the checkpoint asks for {module}.{name}, which is not a tensor, storage or "
                "plain container; refusing to load it (nothing from the file was run). Only "
                "state_dicts of tensors can be read; re-save the model with "
                "torch.save(model.state_dict(), path) or as .safetensors."
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(
                f"the checkpoint holds a persistent object {str(pid)[:80]!r} that is not a "
                "tensor storage (a pickled module or its source?); refusing to load it."
            )
        _, storage_type, key, _location, numel, *view = pid
        if view and view[0] is not None:
            raise UnsafeCheckpointError("storage views (PyTorch < 0.4 files) are not supported.")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type, key, numel)
        return self.storages[key]


def _materialize(obj: Any) -> Any:
    if isinstance(obj, _PendingTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _unpickle(stream: io.BufferedIOBase, storages: dict[str, _Storage]) -> Any:
    try:
        return _RestrictedUnpickler(stream, storages).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # a truncated or corrupt pickle raises many kinds of error
        raise UnsafeCheckpointError(f"not a readable PyTorch checkpoint: {err}") from err


def _load_zip(archive: zipfile.ZipFile) -> Any:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise UnsafeCheckpointError("a zip file without one <folder>/data.pkl is no torch.save.")
    folder = pickles[0][: -len("data.pkl")]
    if f"{folder}byteorder" in archive.namelist():
        if archive.read(f"{folder}byteorder").strip() != b"little":
            raise UnsafeCheckpointError("big-endian checkpoints are not supported.")
    storages: dict[str, _Storage] = {}
    obj = _unpickle(io.BytesIO(archive.read(pickles[0])), storages)
    for key, storage in storages.items():
        storage.fill(archive.read(f"{folder}data/{key}"))
    return _materialize(obj)


def _load_legacy(stream: io.BytesIO) -> Any:
    storages: dict[str, _Storage] = {}
    if _unpickle(stream, storages) != LEGACY_MAGIC:
        raise UnsafeCheckpointError("not a PyTorch checkpoint (no torch.save magic number).")
    if _unpickle(stream, storages) != LEGACY_PROTOCOL:
        raise UnsafeCheckpointError("unknown legacy torch.save protocol version.")
    sys_info = _unpickle(stream, storages)
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
        raise UnsafeCheckpointError("big-endian checkpoints are not supported.")
    obj = _unpickle(stream, storages)
    keys = _unpickle(stream, storages)
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise UnsafeCheckpointError("the legacy checkpoint's storage list does not match.")
    for key in map(str, keys):
        count = np.frombuffer(stream.read(8), dtype="<i8")
        storage = storages[key]
        if count.size != 1 or int(count[0]) != storage.numel:
            raise UnsafeCheckpointError(f"storage {key!r} has a bad size header.")
        storage.fill(stream.read(storage.numel * storage.dtype.itemsize))
    return _materialize(obj)


def load_pickle_checkpoint(raw: bytes) -> tuple[Any, str]:
    """The object a ``torch.save`` file holds, tensors as NumPy arrays; and its layout.

    Args:
      raw: the file's bytes.

    Returns:
      ``(obj, layout)`` with ``layout`` "zip" or "legacy".

    Raises:
      UnsafeCheckpointError: the file asks for anything but tensors, storages and
        plain containers (nothing is run), or is not a readable checkpoint.
    """
    stream = io.BytesIO(raw)
    if zipfile.is_zipfile(stream):
        with zipfile.ZipFile(stream) as archive:
            return _load_zip(archive), "zip"
    return _load_legacy(io.BytesIO(raw)), "legacy"
