"""Training data on the device: the split placed once, each batch made inside the train step.

For CIFAR-scale sets the host need not touch pixels at all (as airbench and
hlb-CIFAR10 do): :func:`place_split` puts the whole split on the mesh once as
uint8 (CIFAR-10's 50,000 training images are 154 MB), and a train step compiled
with :class:`DeviceData` (:func:`ood_jax.train.compile_train_step`) gathers its
batch, crops, flips and normalizes it itself. The host hands it only the step's
*plan* (:class:`ood_jax.data.PlanIterator`): the rows of the split and each
row's crop corner and flip, 16 bytes an image.

The rule is the host pipeline's (:mod:`ood_jax.data.pipeline`): the plan of step
``s`` comes from the same NumPy draws as the host batch of step ``s``, the crop is
the 32x32 window at ``(top, left)`` of the image zero-padded by 4 pixels (zeros in
uint8, as ``RandomCrop(32, padding=4)``), mirrored left-right when ``flip``, and
normalization rounds as the host's does (:func:`normalize_on_device`: XLA would fuse
``x * scale + offset`` into one rounding, an FMA, and differ from NumPy's two in the
last bit). So a batch made on the device is bit-identical to the host pipeline's
batch of the same step, a run may switch between the two at a checkpoint, and
resuming stays exact. On TPUs everything in the step is slices, selects and
elementwise arithmetic besides the one gather of whole rows: no per-pixel gather (slow
there). Elsewhere the crop is one ``dynamic_slice`` per image, which XLA:CPU runs
several times faster than the nine selects per axis; both give the same bytes
(:func:`crop_flip`'s ``method``).

Placement: the split is **sharded over the** ``data`` **axis**, rows
``[d * R, (d + 1) * R)`` on the mesh's device ``d`` (``R = ceil(N / devices)``; the
last device's tail is zero rows no plan names), each process building only its own
devices' rows (``jax.make_array_from_callback``). Inside the step every device
gathers the rows of the global batch it holds (the others as zeros), and one
reduce-scatter sums them into each device's slice of the batch; only one device
contributes each row, so the sum is exact. Replicating the split instead would save
that reduce-scatter (the batch in uint8: 786 kB a step at batch 256, about the
``cpu`` preset's ResNet-9 gradient all-reduce in bf16) at the price of the whole
split on every device and every host; sharded, a device holds ``1 / devices`` of it
and a host only its devices' rows, and the global batch does not depend on the device
or process count.

The pixels are stored as rows of 768 uint32 words (the 3,072 bytes of an image,
little-endian): a ``[N, 32, 32, 3]`` uint8 array would be padded to TPU tiles along
its last dimension of 3 (about 40 times the bytes).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from ood_jax import sharding
from ood_jax.data.dataset import CIFAR10_MEAN, CIFAR10_STD, IMAGE_SIZE, ImageDataset
from ood_jax.data.pipeline import PAD

IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3
WORDS = IMAGE_BYTES // 4  # uint32 words of one image
# The share of a device's memory a split may take (the rest is the model's).
MAX_MEMORY_FRACTION = 0.5


@struct.dataclass
class DeviceSplit:
    """A training split resident on the mesh (:func:`place_split`), a pytree.

    Attributes:
      pixels: uint32 ``[R * devices, 768]``: image ``i``'s 3,072 bytes in row ``i``,
        sharded over ``data``; the rows past ``num_examples`` are zeros.
      labels: int32 ``[R * devices]``, sharded the same way (-1: outliers).
      num_examples: ``N``, the split's examples.
      mean, std: the normalization constants of the batches made from it.
    """

    pixels: Any
    labels: Any
    num_examples: int = struct.field(pytree_node=False)
    mean: tuple[float, ...] = struct.field(pytree_node=False, default=CIFAR10_MEAN)
    std: tuple[float, ...] = struct.field(pytree_node=False, default=CIFAR10_STD)


@struct.dataclass
class DeviceData:
    """What a train step with data on the device reads: the split, and the auxiliary
    outlier split of objectives that take one (outlier exposure, energy fine-tuning)."""

    train: DeviceSplit
    aux: DeviceSplit | None = None


def padded_rows(num_examples: int, num_devices: int) -> int:
    """Rows of a placed split: ``num_examples`` rounded up to a multiple of the devices."""
    return -(-num_examples // num_devices) * num_devices


def resident_bytes(num_examples: int, num_devices: int) -> int:
    """Device memory a split of ``num_examples`` images takes on each of ``num_devices``
    devices: ``ceil(N / devices)`` rows of 3,072 pixel bytes and a 4-byte label."""
    return padded_rows(num_examples, num_devices) // num_devices * (IMAGE_BYTES + 4)


def _device_memory(devices: Sequence[Any]) -> int | None:
    """The smallest ``bytes_limit`` of ``devices`` (None where JAX reports none: CPU)."""
    limits = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # backends without memory statistics
            stats = None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def place_split(
    dataset: ImageDataset,
    mesh: Mesh,
    *,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    max_memory_fraction: float = MAX_MEMORY_FRACTION,
) -> DeviceSplit:
    """Places ``dataset`` on ``mesh`` once, sharded over ``data`` (the module docstring).

    Every process passes the same split and builds only its own devices' rows. A split
    that would take more than ``max_memory_fraction`` of a device's memory (where JAX
    reports it: GPU, TPU) is a ``ValueError``: train it with the host pipeline.
    """
    n, devices = len(dataset), mesh.devices.size
    rows = padded_rows(n, devices)
    need = resident_bytes(n, devices)
    limit = _device_memory([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    if limit is not None and need > max_memory_fraction * limit:
        raise ValueError(
            f"the {n} images of {dataset.name!r} need {need / 2**20:.0f} MiB on each of the "
            f"{devices} devices, more than {max_memory_fraction:.0%} of a device's "
            f"{limit / 2**20:.0f} MiB; train with the host pipeline (data.on_device=false) "
            "or on more devices."
        )
    images = np.ascontiguousarray(dataset.images).reshape(n, IMAGE_BYTES)
    labels = np.asarray(dataset.labels, np.int32)

    def pixel_rows(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[0].indices(rows)
        out = np.zeros((stop - start, IMAGE_BYTES), np.uint8)
        real = max(0, min(stop, n) - start)
        out[:real] = images[start : start + real]
        return out.view("<u4")

    def label_rows(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[0].indices(rows)
        out = np.zeros(stop - start, np.int32)
        real = max(0, min(stop, n) - start)
        out[:real] = labels[start : start + real]
        return out

    placement = sharding.batch_sharding(mesh)
    return DeviceSplit(
        pixels=jax.make_array_from_callback((rows, WORDS), placement, pixel_rows),
        labels=jax.make_array_from_callback((rows,), placement, label_rows),
        num_examples=n,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


def abstract_split(
    num_examples: int,
    mesh: Mesh,
    *,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> DeviceSplit:
    """A :class:`DeviceSplit` of ``jax.ShapeDtypeStruct`` s, for lowering a step without
    data (the compile-only planner)."""
    rows, placement = padded_rows(num_examples, mesh.devices.size), sharding.batch_sharding(mesh)
    return DeviceSplit(
        pixels=jax.ShapeDtypeStruct((rows, WORDS), jnp.uint32, sharding=placement),
        labels=jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=placement),
        num_examples=num_examples,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


def _shifted(padded: jax.Array, shift: jax.Array, *, axis: int, step: int) -> jax.Array:
    """``padded`` sliced at ``shift * step`` along ``axis`` (``32 * step`` long), per row
    of ``shift`` (``[b]``, in ``[0, 8]``): nine static slices and selects, no gather (a
    gather of single elements is slow on TPUs)."""
    size = IMAGE_SIZE * step
    out = jax.lax.slice_in_dim(padded, 0, size, axis=axis)
    for k in range(1, 2 * PAD + 1):
        window = jax.lax.slice_in_dim(padded, k * step, k * step + size, axis=axis)
        out = jnp.where((shift == k)[:, None, None], window, out)
    return out


# How the crop window is cut out: nine static slices and selects per axis ("select",
# for TPUs) or one dynamic_slice per image ("slice", faster on CPUs and GPUs).
CROP_METHODS = ("select", "slice")


def crop_method(mesh: Mesh) -> str:
    """The crop formulation for ``mesh``'s devices: ``"select"`` on TPUs, else ``"slice"``."""
    return "select" if mesh.devices.flat[0].platform == "tpu" else "slice"


def _crop_flip_rows(images: jax.Array, crops: jax.Array, method: str = "select") -> jax.Array:
    """:func:`crop_flip` on images as ``[b, 32, 96]`` rows of pixels (the layout the
    split's rows come in: channels beside their pixel)."""
    if method not in CROP_METHODS:
        raise ValueError(f"crop method must be one of {CROP_METHODS}, got {method!r}.")
    b = images.shape[0]
    padded = jnp.pad(images, ((0, 0), (PAD, PAD), (3 * PAD, 3 * PAD)))  # [b, 40, 120]
    if method == "select":
        out = _shifted(padded, crops[:, 0], axis=1, step=1)  # [b, 32, 120]
        out = _shifted(out, crops[:, 1], axis=2, step=3)  # [b, 32, 96]
    else:
        out = jax.vmap(
            lambda image, top, left: jax.lax.dynamic_slice(
                image, (top, 3 * left), (IMAGE_SIZE, 3 * IMAGE_SIZE)
            )
        )(padded, crops[:, 0], crops[:, 1])
    mirrored = out.reshape(b, IMAGE_SIZE, IMAGE_SIZE, 3)[:, :, ::-1].reshape(out.shape)
    return jnp.where((crops[:, 2] != 0)[:, None, None], mirrored, out)


def crop_flip(images: jax.Array, crops: jax.Array, method: str = "select") -> jax.Array:
    """The host pipeline's crop and flip (:func:`ood_jax.data.pipeline.crop_flip`) in JAX.

    ``out[n, i, j] = padded[n, top + i, left + j']`` with ``j' = 31 - j`` if ``flip``
    else ``j``, where ``padded`` is ``images`` zero-padded by 4 on each side.

    Args:
      images: uint8 ``[b, 32, 32, 3]``.
      crops: int ``[b, 3]``: ``top, left`` in ``[0, 8]`` and ``flip`` (0 or 1).
      method: ``"select"`` (static slices and selects: no gather, for TPUs) or
        ``"slice"`` (a ``dynamic_slice`` per image); the same result.
    """
    b = images.shape[0]
    rows = _crop_flip_rows(images.reshape(b, IMAGE_SIZE, IMAGE_SIZE * 3), crops, method)
    return rows.reshape(images.shape)


def _normalize_constants(mean: Sequence[float], std: Sequence[float]):
    """Per channel: the host's ``scale = M * 2**E`` (``M`` its 24-bit integer mantissa)
    and ``offset``, as :func:`ood_jax.data.normalize` computes them."""
    mean64, std64 = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    scale = (1.0 / (255.0 * std64)).astype(np.float32)
    offset = (-mean64 / std64).astype(np.float32)
    fraction, exponent = np.frexp(scale.astype(np.float64))
    mantissa = np.rint(np.ldexp(fraction, 24)).astype(np.uint32)  # exact: a float32's 24 bits
    power = np.ldexp(np.ones(3), exponent - 24).astype(np.float32)
    assert np.array_equal(mantissa.astype(np.float64) * power, scale.astype(np.float64))
    return mantissa, power, offset


def normalize_on_device(
    images: jax.Array, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
    """uint8 ``[..., 3]`` (channels last, or ``[..., 96]``: rows of 32 pixels) -> float32,
    equal bit for bit to the host's :func:`ood_jax.data.normalize`.

    The host rounds twice, ``fl(fl(x * scale) + offset)``; XLA would fuse the multiply
    and add into one rounding (an FMA) and differ in the last bit for about half the
    values. So ``fl(x * scale)`` is made exactly first: ``x * M`` in uint32 (below
    ``2**32``), rounded once to float32 by the conversion, times ``2**E`` (exact). The
    multiply that remains has an exact product, so fused or not, the add rounds the
    host's way.
    """
    mantissa, power, offset = _normalize_constants(mean, std)
    repeat = images.shape[-1] // 3
    mantissa, power, offset = (np.tile(c, repeat) for c in (mantissa, power, offset))
    scaled = (images.astype(jnp.uint32) * mantissa).astype(jnp.float32) * power
    return scaled + offset


def _local_batch(
    norm: tuple[tuple[float, ...], tuple[float, ...]],
    method: str,
    pixels: jax.Array,
    labels: jax.Array,
    index_rows: jax.Array,
    *crop_rows: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Per device, inside ``shard_map``: this device's rows of the global batch, made."""
    axis = sharding.DATA_AXIS
    index = jax.lax.all_gather(index_rows, axis, tiled=True)  # the global batch's rows
    held = pixels.shape[0]
    offset = index - jax.lax.axis_index(axis) * held
    mine = (offset >= 0) & (offset < held)
    local = jnp.where(mine, offset, 0)
    rows = jnp.where(mine[:, None], pixels[local], 0)
    row_labels = jnp.where(mine, labels[local], 0)
    # One device holds each row: the sum over devices is that device's row, exactly.
    rows = jax.lax.psum_scatter(rows, axis, scatter_dimension=0, tiled=True)
    row_labels = jax.lax.psum_scatter(row_labels, axis, scatter_dimension=0, tiled=True)
    return _make_images(norm, method, rows, *crop_rows), row_labels


def _make_images(
    norm: tuple[tuple[float, ...], tuple[float, ...]],
    method: str,
    rows: jax.Array,
    *crop_rows: jax.Array,
) -> jax.Array:
    """uint32 ``[b, 768]`` rows -> the batch's float32 ``[b, 32, 32, 3]`` images:
    cropped and flipped (with ``crop_rows``), normalized."""
    # [b, 768, 4] little-endian bytes -> [b, 32, 96]: the image's rows, channels beside
    # their pixel (a last dimension of 3 would be padded to TPU tiles).
    images = jax.lax.bitcast_convert_type(rows, jnp.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE * 3)
    if crop_rows:
        images = _crop_flip_rows(images, crop_rows[0], method)
    images = normalize_on_device(images, *norm)
    return images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3)


def gather_batch(split: DeviceSplit, plan: Mapping[str, jax.Array], mesh: Mesh) -> dict:
    """The batch of ``plan`` made from ``split``, inside a jitted step over ``mesh``.

    ``plan``: ``{"index": int32 [B]}`` and, to augment, ``"crop": int32 [B, 3]``, both
    split over ``data`` (what :class:`ood_jax.data.PlanIterator` yields, assembled by
    :func:`ood_jax.sharding.global_batch`). Returns the host pipeline's batch format
    ``{"image": float32 [B, 32, 32, 3], "label": int32 [B], "mask": bool [B]}``, split
    over ``data``. Each device makes its own rows (``shard_map``): the gather, the one
    reduce-scatter, crop, flip and normalization. On a mesh of one device the rows are
    gathered directly, without ``shard_map`` and its collectives: the same bytes.
    """
    norm, method = (split.mean, split.std), crop_method(mesh)
    crop = (plan["crop"],) if "crop" in plan else ()
    if mesh.size == 1:
        index = plan["index"]
        images = _make_images(norm, method, split.pixels[index], *crop)
        labels = split.labels[index]
        return {"image": images, "label": labels, "mask": jnp.ones(labels.shape, bool)}
    spec = PartitionSpec(sharding.DATA_AXIS)
    args = (split.pixels, split.labels, plan["index"], *crop)
    images, labels = jax.shard_map(
        functools.partial(_local_batch, norm, method),
        mesh=mesh,
        in_specs=(spec,) * len(args),
        out_specs=(spec, spec),
    )(*args)
    return {"image": images, "label": labels, "mask": jnp.ones(labels.shape, bool)}
