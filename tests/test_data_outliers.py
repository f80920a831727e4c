"""Auxiliary outlier stream: ratio, labels, independence from the train stream, resume."""

import numpy as np
import pytest

from ood_jax import data


@pytest.fixture(scope="module")
def datasets():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    inliers = data.from_arrays(images, np.arange(64) % 10, name="in")
    outliers = data.from_arrays(images[::-1].copy(), np.arange(64) % 5, name="out")
    return inliers, outliers


def test_ratio_and_labels(datasets):
    inliers, outliers = datasets
    train = data.train_iterator(inliers, batch_size=8, seed=1, process_index=0, process_count=1)
    aux = data.outlier_iterator(
        outliers, in_batch_size=8, ratio=2, seed=1, process_index=0, process_count=1
    )
    for _ in range(5):  # crosses the outlier epoch boundary (64 // 16 = 4 steps)
        b, o = next(train), next(aux)
        assert o["image"].shape == (16, 32, 32, 3) and b["image"].shape == (8, 32, 32, 3)
        assert (o["label"] == -1).all() and o["mask"].all()
    three = data.outlier_iterator(
        outliers, in_batch_size=4, ratio=3, seed=1, process_index=0, process_count=1
    )
    assert next(three)["image"].shape == (12, 32, 32, 3)


def test_independent_of_train_stream_with_same_seed(datasets):
    inliers, _ = datasets
    kw = dict(seed=3, augment=False, process_index=0, process_count=1)
    train = next(data.train_iterator(inliers, batch_size=16, **kw))
    aux = next(data.outlier_iterator(inliers, in_batch_size=8, ratio=2, **kw))
    assert not np.array_equal(train["image"], aux["image"])
    # the documented outlier order: SeedSequence tag 2 (stream 1)
    perm = np.random.default_rng([3, 2, 0]).permutation(64)
    expected = data.normalize(inliers.images[perm[:16]])
    np.testing.assert_allclose(aux["image"], expected, atol=1e-6)


def test_resume_and_two_processes(datasets):
    _, outliers = datasets
    kw = dict(in_batch_size=8, ratio=2, seed=5)
    uninterrupted = data.outlier_iterator(outliers, **kw, process_index=0, process_count=1)
    full = [next(uninterrupted) for _ in range(7)]
    it = data.outlier_iterator(outliers, **kw, process_index=0, process_count=1, start_step=4)
    state = None
    for step in range(4, 7):
        np.testing.assert_array_equal(next(it)["image"], full[step]["image"])
        state = it.get_state()
    assert state["step"] == 7
    halves = [
        next(data.outlier_iterator(outliers, **kw, process_index=p, process_count=2, start_step=2))
        for p in (0, 1)
    ]
    joined = np.concatenate([h["image"] for h in halves])
    np.testing.assert_array_equal(joined, full[2]["image"])


def test_bad_ratio(datasets):
    _, outliers = datasets
    with pytest.raises(ValueError, match="ratio"):
        data.outlier_iterator(
            outliers, in_batch_size=8, ratio=0, seed=0, process_index=0, process_count=1
        )
    with pytest.raises(ValueError, match="exceeds"):
        data.outlier_iterator(
            outliers, in_batch_size=64, ratio=2, seed=0, process_index=0, process_count=1
        )
