"""OOD sets by name: synthetic sets, name checks."""

import numpy as np
import pytest

from ood_jax import data as D
from ood_jax.evaluate import SYNTHETIC_NAMES, load_ood_sets


def test_synthetic_sets_are_seeded_and_sized():
    source = D.from_arrays(np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, int), name="id")
    sets = load_ood_sets(SYNTHETIC_NAMES, num_synthetic=6, seed=3, id_test=source)
    assert list(sets) == list(SYNTHETIC_NAMES)
    assert all(len(ds) == 6 and (ds.labels == -1).all() for ds in sets.values())
    again = load_ood_sets(["gaussian"], num_synthetic=6, seed=3)["gaussian"]
    np.testing.assert_array_equal(again.images, D.make_gaussian_noise(6, seed=3).images)


def test_bad_names_raise():
    with pytest.raises(ValueError, match="no OOD set names"):
        load_ood_sets([])
    with pytest.raises(ValueError, match="duplicate"):
        load_ood_sets(["gaussian", "gaussian"])
    with pytest.raises(ValueError, match="id_test"):
        load_ood_sets(["permuted_pixels"])
    with pytest.raises(ValueError, match="Synthetic sets"):
        load_ood_sets(["no_such_set"])
