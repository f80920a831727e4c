"""Train and eval iterators over an in-memory :class:`ImageDataset`.

Batches are dicts of NumPy arrays for this process:
``{"image": float32 [b, 32, 32, 3] normalized (default: CIFAR10_MEAN/STD),
"label": int32 [b], "mask": bool [b]}`` with ``b = batch_size // process_count``
(``batch_size`` is always the *global* batch size).

Train (:func:`train_iterator`), the determinism contract: the global batch at
global step ``s`` is a pure function of ``(dataset, seed, batch_size, s)``:

* ``steps_per_epoch = N // batch_size``; ``epoch, k = divmod(s, steps_per_epoch)``;
  the last partial batch of each epoch is dropped (a new permutation each epoch,
  so a different remainder is dropped each time);
* example order: ``np.random.default_rng([seed, 0, epoch]).permutation(N)``,
  global batch ``k`` = its slice ``[k * batch_size, (k + 1) * batch_size)``;
* augmentation: ``rng = np.random.default_rng([seed, 1, epoch, k])`` draws, for the
  whole global batch, the crop corner ``top, left = rng.integers(0, 9, (2, B))``
  and the flip ``rng.random(B) < 0.5``; the crop is the 32x32 window at
  ``(top, left)`` of the image zero-padded by 4 pixels (zeros in uint8 space, as
  ``RandomCrop(32, padding=4)``), mirrored left-right when flipped.

Process ``p`` of ``P`` yields rows ``[p * b, (p + 1) * b)`` of the global batch,
so the global batch does not depend on ``P``, and over an epoch the processes
see disjoint examples whose union is the epoch. ``get_state()`` returns a
JSON-serializable dict; pass it back as ``start_step=`` to resume exactly.

Plans (:func:`train_plans`): the same steps without pixels, ``{"index": int32 [b],
"crop": int32 [b, 3]}`` (rows of the dataset; ``top, left, flip``) for a train step
that holds the split on the device and gathers, crops and flips there
(:mod:`ood_jax.data.device`): the batches are the same, only where they are made
differs.

Eval (:func:`eval_batches`): process ``p`` reads the contiguous shard of
:func:`shard_bounds` (``tfds.even_splits`` arithmetic) in order; every process
yields the same number of batches (collectives stay in step), the last ones
padded with zero images and label -1 with ``mask=False``.

The hot path is vectorized NumPy (one ``np.take`` per batch for crop + flip, one
multiply-add for normalization); a background thread prefetches batches.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ood_jax.data.dataset import CIFAR10_MEAN, CIFAR10_STD, IMAGE_SIZE, ImageDataset, normalize

PAD = 4
_ORDER, _AUGMENT = 0, 1  # SeedSequence tags: equal-length keys never collide.


def resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Fills in ``jax.process_index()/process_count()`` and checks ``0 <= index < count``."""
    if process_index is None or process_count is None:
        import jax  # Only when not given, so tests can simulate processes without JAX.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"`process_index` must be in [0, process_count) and `process_count` >= 1, got "
            f"process_index={process_index}, process_count={process_count}."
        )
    return int(process_index), int(process_count)


def _check_batch_size(batch_size: int, process_count: int) -> None:
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if batch_size % process_count:
        raise ValueError(
            f"`batch_size` ({batch_size}) is the global batch and must be divisible by "
            f"process_count ({process_count})."
        )


def shard_bounds(num_examples: int, *, process_index: int, process_count: int) -> tuple[int, int]:
    """``[start, end)`` of process ``p``'s contiguous shard, as ``tfds.even_splits``.

    ``q, r = divmod(N, P)``; ``start = q * p + min(p, r)``, ``end = q * (p + 1) + min(p + 1, r)``
    (the first ``r`` shards hold one extra example: 11 over 3 gives 4, 4, 3).
    """
    q, r = divmod(num_examples, process_count)
    p = process_index
    return q * p + min(p, r), q * (p + 1) + min(p + 1, r)


def crop_flip(
    images: np.ndarray,
    indices: np.ndarray,
    tops: np.ndarray,
    lefts: np.ndarray,
    flips: np.ndarray,
) -> np.ndarray:
    """Gathers ``images[indices]`` with a padded random crop and flip.

    ``out[n, i, j] = padded[indices[n], tops[n] + i, lefts[n] + j']`` with
    ``j' = 31 - j`` if ``flips[n]`` else ``j``, where ``padded`` is ``images`` zero-padded
    by 4 on each side. The batch is padded once, then all crops and flips are one
    ``np.take`` on its RGB triples (viewed as 3-byte elements) with linear indices.

    Args:
      images: uint8 ``[N, 32, 32, 3]``.
      indices: int ``[B]`` rows of ``images``.
      tops, lefts: int ``[B]`` crop corners in the padded image, in ``[0, 8]``.
      flips: bool ``[B]``.

    Returns:
      uint8 ``[B, 32, 32, 3]``.
    """
    b, side = len(indices), IMAGE_SIZE + 2 * PAD
    padded = np.zeros((b, side, side, 3), np.uint8)
    padded[:, PAD : PAD + IMAGE_SIZE, PAD : PAD + IMAGE_SIZE] = images[indices]
    offsets = np.arange(IMAGE_SIZE)
    rows = tops[:, None] + offsets  # [B, 32]
    cols = np.where(flips[:, None], offsets[::-1], offsets) + lefts[:, None]
    linear = (np.arange(b) * side * side)[:, None, None] + rows[:, :, None] * side
    linear = linear + cols[:, None, :]
    pixels = padded.view("V3").reshape(-1)
    return np.take(pixels, linear).view(np.uint8).reshape(b, IMAGE_SIZE, IMAGE_SIZE, 3)


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """Infinite, deterministic, resumable train batches for one process.

    ``train_iterator(dataset, batch_size=128, seed=0)``; the contract is in the module
    docstring. ``next(it)`` gives this process's ``batch_size // process_count`` rows,
    ``it.get_state()`` its position (pass it back as ``start_step=`` to resume).

    Args:
      dataset: the training split.
      batch_size: global batch size (divisible by ``process_count``, at most ``N``).
      seed: non-negative int; with ``batch_size`` it fixes every batch.
      start_step: global step of the first batch, or a dict from ``get_state()``.
      augment: random crop 32 after 4-pixel zero padding + horizontal flip.
      process_index, process_count: default ``jax.process_index()/process_count()``.
      prefetch: batches computed ahead in a background thread (0 = synchronous).
      stream: independent streams over the same seed (0 = in-distribution,
        1 = auxiliary outliers).
      mean, std: normalization constants (the in-distribution set's).
    """

    # Eleven keyword options, each independent and with a default (as a tf.data or torch
    # DataLoader call); grouping them would only move the list into another object.
    def __init__(
        self,
        dataset: ImageDataset,
        *,
        batch_size: int,
        seed: int,
        start_step: int | Mapping[str, Any] = 0,
        augment: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        prefetch: int = 2,
        stream: int = 0,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        self.dataset = dataset
        self.process_index, self.process_count = resolve_processes(process_index, process_count)
        n = len(dataset)
        _check_batch_size(batch_size, self.process_count)
        if batch_size > n:
            raise ValueError(
                f"`batch_size` ({batch_size}) exceeds the {n} examples of {dataset.name!r}; "
                "every epoch drops its last partial batch, so use a smaller batch."
            )
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
        if prefetch < 0:
            raise ValueError(f"`prefetch` must be >= 0, got {prefetch}.")
        self.batch_size, self.seed, self.augment = int(batch_size), int(seed), bool(augment)
        self.local_batch_size = self.batch_size // self.process_count
        self.steps_per_epoch = n // self.batch_size
        # Two tags per stream keep e.g. the outlier stream independent of the train stream.
        self._tags = (2 * stream + _ORDER, 2 * stream + _AUGMENT)
        self._step = self._start(start_step)
        self._perm_cache: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prefetch = int(prefetch)
        self._error: BaseException | None = None
        self._norm = {"mean": tuple(mean), "std": tuple(std)}

    def _start(self, start: int | Mapping[str, Any]) -> int:
        if isinstance(start, Mapping):
            expected = self._identity()
            mismatch = {k: (start.get(k), v) for k, v in expected.items() if start.get(k) != v}
            if mismatch:
                raise ValueError(
                    "`start_step` state does not match this iterator (saved, current): "
                    f"{mismatch}; resume with the same dataset, seed and batch size."
                )
            start = start["step"]
        if not isinstance(start, int | np.integer) or start < 0:
            raise ValueError(
                f"`start_step` must be a non-negative int or a state dict, got {start!r}."
            )
        return int(start)

    def _identity(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset.name,
            "num_examples": len(self.dataset),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "augment": self.augment,
            "stream": self._tags[0] // 2,
        }

    def get_state(self) -> dict[str, Any]:
        """JSON-serializable position: ``step`` is the global step of the next batch returned."""
        return {"step": self._step, **self._identity()}

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``: ``default_rng([seed, tag, epoch]).permutation(N)``."""
        rng = np.random.default_rng([self.seed, self._tags[0], epoch])
        return rng.permutation(len(self.dataset))

    def rows_at(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
        """This process's rows of global step ``step``: ``(indices, crops)`` (pure in ``step``).

        ``indices``: int ``[b]`` rows of the dataset; ``crops``: int ``[b, 3]`` columns
        ``(top, left, flip)`` by the rule of the module docstring, or None without
        augmentation. What :meth:`batch_at` gathers on the host and
        :class:`PlanIterator` hands to a step that gathers on the device.
        """
        epoch, k = divmod(step, self.steps_per_epoch)
        cache = self._perm_cache  # (epoch, permutation), swapped atomically: thread-safe
        if cache[0] != epoch:
            cache = (epoch, self.epoch_permutation(epoch))
            self._perm_cache = cache
        first = self.process_index * self.local_batch_size
        rows = slice(first, first + self.local_batch_size)
        indices = cache[1][k * self.batch_size : (k + 1) * self.batch_size][rows]
        if not self.augment:
            return indices, None
        rng = np.random.default_rng([self.seed, self._tags[1], epoch, k])
        corners = rng.integers(0, 2 * PAD + 1, size=(2, self.batch_size))
        flips = rng.random(self.batch_size) < 0.5
        return indices, np.stack([corners[0, rows], corners[1, rows], flips[rows]], axis=1)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch at global step ``step`` (pure in ``step``)."""
        indices, crops = self.rows_at(step)
        if crops is not None:
            pixels = crop_flip(
                self.dataset.images, indices, crops[:, 0], crops[:, 1], crops[:, 2].astype(bool)
            )
        else:
            pixels = self.dataset.images[indices]
        return {
            "image": normalize(pixels, **self._norm),
            "label": self.dataset.labels[indices],
            "mask": np.ones(self.local_batch_size, bool),
        }

    @staticmethod
    def _produce(ref: weakref.ref, out: queue.Queue, stop: threading.Event, step: int) -> None:
        # Holds the iterator only weakly, so dropping the iterator ends the thread (__del__).
        try:
            while not stop.is_set():
                owner = ref()
                if owner is None:
                    return
                item: Any = owner.batch_at(step)
                del owner
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1
        except BaseException as err:  # Surface producer failures in the consumer thread.
            out.put(err)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._prefetch == 0:
            batch = self.batch_at(self._step)
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self._prefetch)
                self._thread = threading.Thread(
                    target=self._produce,
                    args=(weakref.ref(self), self._queue, self._stop, self._step),
                    daemon=True,
                    name="ood_jax-data",
                )
                self._thread.start()
            if self._error is not None:
                raise self._error
            batch = self._queue.get()
            if isinstance(batch, BaseException):
                self._error = batch  # the producer has stopped: fail every later call too
                raise batch
        self._step += 1
        return batch

    def close(self) -> None:
        """Stops the prefetch thread (also done when the iterator is garbage-collected)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)  # absent if __init__ raised
        if stop is not None:
            stop.set()


#: ``train_iterator(dataset, *, batch_size, seed, ...)``: see :class:`TrainIterator`.
train_iterator = TrainIterator


class PlanIterator(TrainIterator):
    """The same steps as :class:`TrainIterator`, as *plans*: which rows, which crop, no pixels.

    ``train_plans(dataset, batch_size=128, seed=0)`` takes the arguments of
    :class:`TrainIterator` (its ``get_state()`` is the same, so a checkpoint of either
    resumes the other) and yields, for this process's rows of global step ``s``,
    ``{"index": int32 [b]}`` and, with ``augment``, ``"crop": int32 [b, 3]`` (columns
    ``top``, ``left``, ``flip``), by the rule of the module docstring. A train step built
    with data on the device (:mod:`ood_jax.data.device`) gathers, crops, flips and
    normalizes those rows itself, so a run trains on exactly the batches the host
    pipeline would have made. A plan is 16 bytes an image and a few microseconds of
    NumPy a step, so ``prefetch`` defaults to 0 (computed in the caller's thread).
    """

    def __init__(self, dataset: ImageDataset, *, prefetch: int = 0, **kwargs: Any) -> None:
        super().__init__(dataset, prefetch=prefetch, **kwargs)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the plan of global step ``step`` (pure in ``step``)."""
        indices, crops = self.rows_at(step)
        plan = {"index": indices.astype(np.int32)}
        if crops is not None:
            plan["crop"] = crops.astype(np.int32)
        return plan


#: ``train_plans(dataset, *, batch_size, seed, ...)``: see :class:`PlanIterator`.
train_plans = PlanIterator


class EvalBatches:
    """Every example of this process's shard exactly once, in order, padded and masked.

    ``eval_batches(dataset, batch_size=500)``. Process ``p`` reads
    ``dataset[start:end)`` with ``start, end = shard_bounds(N, ...)`` in batches of
    ``b = batch_size // process_count`` rows. All processes yield
    ``ceil(ceil(N / P) / b)`` batches (``len()``); rows past the shard end are zero
    images with label -1 and ``mask=False``. Concatenating process 0's real rows,
    then process 1's, ... gives the split in its original order. ``mean``/``std``:
    normalization constants; ``process_index``/``process_count`` default to JAX's.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        batch_size: int,
        process_index: int | None = None,
        process_count: int | None = None,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        process_index, process_count = resolve_processes(process_index, process_count)
        _check_batch_size(batch_size, process_count)
        self.dataset = dataset
        self.start, self.end = shard_bounds(
            len(dataset), process_index=process_index, process_count=process_count
        )
        self.local_batch_size = int(batch_size) // process_count
        largest = -(-len(dataset) // process_count)  # every process runs as many batches
        self.num_batches = -(-largest // self.local_batch_size)
        self._norm = {"mean": tuple(mean), "std": tuple(std)}

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        b = self.local_batch_size
        for j in range(self.num_batches):
            lo = min(self.start + j * b, self.end)
            hi = min(lo + b, self.end)
            real = hi - lo
            image = np.zeros((b, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
            label = np.full((b,), -1, np.int32)
            image[:real] = normalize(self.dataset.images[lo:hi], **self._norm)
            label[:real] = self.dataset.labels[lo:hi]
            yield {"image": image, "label": label, "mask": np.arange(b) < real}


#: ``eval_batches(dataset, *, batch_size, ...)``: see :class:`EvalBatches`.
eval_batches = EvalBatches
