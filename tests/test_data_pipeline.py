"""Train/eval iterators: determinism, resumption, augmentation, multi-process, padding."""

import json

import numpy as np
import pytest

from ood_jax import data
from ood_jax.data.pipeline import crop_flip

N = 103  # not a multiple of the batch: exercises the dropped remainder and eval padding
MEAN = np.asarray(data.CIFAR10_MEAN, np.float64)
STD = np.asarray(data.CIFAR10_STD, np.float64)


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(123)
    images = rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    # label = example index, so every batch row says which example it holds
    return data.from_arrays(images, np.arange(N), name="toy")


def to_uint8(normalized):
    """Inverse normalization in float64, written independently of the library."""
    return np.rint((normalized.astype(np.float64) * STD + MEAN) * 255).astype(np.int64)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(x[key], y[key])


def test_batch_format(dataset):
    it = data.train_iterator(dataset, batch_size=8, seed=0, process_index=0, process_count=1)
    batch = next(it)
    it.close()
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert batch["mask"].dtype == bool and batch["mask"].all()


def test_same_seed_same_batches_different_seed_differs(dataset):
    kw = dict(batch_size=16, process_index=0, process_count=1)
    a = take(data.train_iterator(dataset, seed=5, **kw), 9)
    b = take(data.train_iterator(dataset, seed=5, prefetch=0, **kw), 9)
    c = take(data.train_iterator(dataset, seed=6, **kw), 9)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_epoch_order_follows_documented_permutation(dataset):
    batch_size, seed = 16, 3
    steps = N // batch_size  # 6 steps, 7 examples dropped per epoch
    it = data.train_iterator(
        dataset, batch_size=batch_size, seed=seed, augment=False, process_index=0, process_count=1
    )
    labels = np.concatenate([b["label"] for b in take(it, 2 * steps)])
    for epoch in range(2):
        perm = np.random.default_rng([seed, 0, epoch]).permutation(N)
        expected = perm[: steps * batch_size]
        got = labels[epoch * steps * batch_size : (epoch + 1) * steps * batch_size]
        np.testing.assert_array_equal(got, expected)
        assert len(set(got.tolist())) == steps * batch_size  # no repeats within an epoch


@pytest.mark.parametrize("start", [0, 4, 6, 7, 13])  # 6 = first step of epoch 1
def test_resume_equals_uninterrupted(dataset, start):
    kw = dict(batch_size=16, seed=11, process_index=0, process_count=1)
    full = take(data.train_iterator(dataset, **kw), 15)
    resumed = take(data.train_iterator(dataset, start_step=start, **kw), 15 - start)
    assert_batches_equal(full[start:], resumed)


def test_resume_from_saved_state_json(dataset):
    kw = dict(batch_size=16, seed=2, process_index=0, process_count=1)
    it = data.train_iterator(dataset, **kw)
    take(it, 8)  # crosses the epoch boundary at step 6
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint would store
    assert state["step"] == 8
    expected = take(it, 3)
    it.close()
    resumed = data.train_iterator(dataset, start_step=state, **kw)
    assert_batches_equal(expected, take(resumed, 3))
    with pytest.raises(ValueError, match="does not match"):
        data.train_iterator(dataset, **{**kw, "seed": 3}, start_step=state)


def slow_crop(image, top, left, flip):
    padded = np.zeros((40, 40, 3), np.uint8)
    for i in range(32):
        for j in range(32):
            padded[i + 4, j + 4] = image[i, j]
    crop = padded[top : top + 32, left : left + 32]
    return crop[:, ::-1] if flip else crop


def test_augmentation_matches_slow_reference(dataset):
    batch_size, seed, steps = 16, 9, 8
    it = data.train_iterator(
        dataset, batch_size=batch_size, seed=seed, process_index=0, process_count=1
    )
    for step, batch in enumerate(take(it, steps)):
        epoch, k = divmod(step, N // batch_size)
        rng = np.random.default_rng([seed, 1, epoch, k])
        corners = rng.integers(0, 9, size=(2, batch_size))
        flips = rng.random(batch_size) < 0.5
        got = to_uint8(batch["image"])
        for n, idx in enumerate(batch["label"]):
            ref = slow_crop(dataset.images[idx], corners[0, n], corners[1, n], flips[n])
            np.testing.assert_array_equal(got[n], ref)


def test_crop_flip_extremes():
    image = np.arange(32 * 32 * 3, dtype=np.int64).reshape(1, 32, 32, 3) % 251
    image = image.astype(np.uint8)
    idx = np.array([0, 0, 0])
    out = crop_flip(image, idx, np.array([4, 0, 8]), np.array([4, 8, 0]), np.array([1, 0, 0], bool))
    np.testing.assert_array_equal(out[0], image[0, :, ::-1])  # centred crop, mirrored
    assert (out[1, :4] == 0).all() and (out[1, :, 28:] == 0).all()  # shifted down-left
    np.testing.assert_array_equal(out[1, 4:, :28], image[0, :28, 4:])
    np.testing.assert_array_equal(out[2, :28, 4:], image[0, 4:, :28])


def test_no_augment_is_plain_normalized_rows(dataset):
    it = data.train_iterator(
        dataset, batch_size=16, seed=0, augment=False, process_index=0, process_count=1
    )
    batch = next(it)
    expected = (dataset.images[batch["label"]] / 255.0 - MEAN) / STD
    np.testing.assert_allclose(batch["image"], expected, atol=1e-5)


def test_two_processes_split_global_batch(dataset):
    kw = dict(batch_size=16, seed=4)
    single = take(data.train_iterator(dataset, process_index=0, process_count=1, **kw), 12)
    procs = [
        take(data.train_iterator(dataset, process_index=p, process_count=2, **kw), 12)
        for p in (0, 1)
    ]
    seen = []
    for step in range(12):
        a, b = procs[0][step], procs[1][step]
        assert a["label"].shape == (8,)
        assert not set(a["label"].tolist()) & set(b["label"].tolist())
        joined = {k: np.concatenate([a[k], b[k]]) for k in a}
        assert_batches_equal([joined], [single[step]])
        seen.append(joined["label"])
    epoch0 = np.concatenate(seen[:6])
    assert len(set(epoch0.tolist())) == 6 * 16  # the processes never overlap in an epoch


def test_producer_error_reaches_consumer(dataset):
    it = data.train_iterator(dataset, batch_size=8, seed=0, process_index=0, process_count=1)

    def broken(step):
        raise RuntimeError(f"boom at {step}")

    it.batch_at = broken  # the prefetch thread calls this
    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom at 0"):
            next(it)


def test_train_bad_arguments(dataset):
    kw = dict(seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="batch_size"):
        data.train_iterator(dataset, batch_size=0, **kw)
    with pytest.raises(ValueError, match="exceeds"):
        data.train_iterator(dataset, batch_size=N + 1, **kw)
    with pytest.raises(ValueError, match="divisible by process_count"):
        data.train_iterator(dataset, batch_size=15, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        data.train_iterator(dataset, batch_size=16, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="seed"):
        data.train_iterator(dataset, batch_size=16, seed=-1, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="start_step"):
        data.train_iterator(dataset, batch_size=16, start_step=-3, **kw)


def test_shard_bounds_even_splits_arithmetic():
    # tfds.even_splits: 11 examples over 3 -> sizes 4, 4, 3
    bounds = [data.shard_bounds(11, process_index=p, process_count=3) for p in range(3)]
    assert bounds == [(0, 4), (4, 8), (8, 11)]
    assert data.shard_bounds(10, process_index=1, process_count=2) == (5, 10)


def test_eval_single_process_order_padding_mask(dataset):
    batches = list(data.eval_batches(dataset, batch_size=10, process_index=0, process_count=1))
    assert len(batches) == 11  # ceil(103 / 10)
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert mask.sum() == N and mask[:N].all() and not mask[N:].any()
    np.testing.assert_array_equal(labels[:N], np.arange(N))
    assert (labels[N:] == -1).all()
    last = batches[-1]
    assert last["image"].shape == (10, 32, 32, 3)
    assert (last["image"][3:] == 0).all()
    np.testing.assert_array_equal(to_uint8(last["image"][:3]), dataset.images[100:103])


def test_eval_two_processes_cover_split_once(dataset):
    runs = [
        list(data.eval_batches(dataset, batch_size=20, process_index=p, process_count=2))
        for p in (0, 1)
    ]
    assert len(runs[0]) == len(runs[1]) == 6  # same count: collectives stay in step
    real = []
    for run in runs:
        assert all(b["label"].shape == (10,) for b in run)
        labels = np.concatenate([b["label"] for b in run])
        mask = np.concatenate([b["mask"] for b in run])
        real.append(labels[mask])
    assert not set(real[0].tolist()) & set(real[1].tolist())
    np.testing.assert_array_equal(np.concatenate(real), np.arange(N))  # in order, once


def test_eval_bad_batch_size(dataset):
    with pytest.raises(ValueError, match="divisible"):
        data.eval_batches(dataset, batch_size=5, process_index=0, process_count=2)
