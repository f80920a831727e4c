"""ForwardPass: sharded, padded forward pass and per-example model scores (ODIN)."""

import jax
import numpy as np
import pytest
from flax import nnx

from ood_jax import data as D
from ood_jax import scores as S
from ood_jax import sharding
from ood_jax.evaluate import ForwardPass, score_images
from ood_jax.models import create_model
from ood_jax.scores import resolve_hparams


@pytest.fixture(scope="module")
def model():
    m = create_model("tiny", num_classes=5, width=4, rngs=nnx.Rngs(0))
    m.eval()
    return m


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
    return D.from_arrays(images, rng.integers(0, 5, 37), name="toy", num_classes=5)


def test_outputs_match_unjitted_model_and_drop_padding(model, dataset):
    # 37 examples in batches of 16 -> the last batch has 11 padding rows.
    forward = ForwardPass(model, mesh=sharding.make_mesh())
    assert forward.num_shards == len(jax.devices()) == 8
    out = forward(D.eval_batches(dataset, batch_size=16, process_index=0, process_count=1))
    assert out.logits.shape == (37, 5) and out.features.shape == (37, 8)
    np.testing.assert_array_equal(out.labels, dataset.labels)
    # Reference: the model called eagerly, one example at a time.
    images = D.normalize(dataset.images)
    for i in (0, 15, 16, 36):
        logits, features = model(images[i : i + 1])
        np.testing.assert_allclose(out.logits[i], np.asarray(logits[0]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out.features[i], np.asarray(features[0]), rtol=1e-4, atol=1e-5)


def test_batch_not_divisible_by_devices(model, dataset):
    images = D.normalize(dataset.images[:13])
    out = ForwardPass(model)([{"image": images}])
    assert len(out) == 13
    np.testing.assert_array_equal(out.labels, -np.ones(13))
    np.testing.assert_allclose(out.logits, np.asarray(model(images)[0]), rtol=1e-4, atol=1e-5)


def test_empty_dataset_raises(model):
    with pytest.raises(ValueError, match="no batches"):
        ForwardPass(model)([])


def test_odin_per_example_equals_loop_over_single_examples(model, dataset):
    """ODIN through the sharded, padded wiring == ODIN of each example alone."""
    hparams = resolve_hparams(["odin"], {"odin": {"temperature": 10.0, "epsilon": 0.01}})
    forward = ForwardPass(model)
    scores, sizes = score_images(
        hparams,
        forward,
        {"set": dataset},
        batches=lambda ds: D.eval_batches(ds, batch_size=24, process_index=0, process_count=1),
        std=D.CIFAR10_STD,
        seed=0,
    )
    values = scores["set"]["odin"]
    assert values.shape == (37,) and sizes == {"odin": {"set": 37}}
    images = D.normalize(dataset.images)
    apply = lambda x: model(x)[0]
    for i in range(0, 37, 6):
        alone = S.odin(apply, images[i : i + 1], temperature=10.0, epsilon=0.01)
        np.testing.assert_allclose(values[i], np.asarray(alone)[0], rtol=1e-4, atol=1e-6)
    # The perturbation matters: ODIN differs from plain temperature-scaled MSP.
    logits = np.asarray(apply(images), np.float64) / 10.0
    plain = 1.0 / np.exp(logits - logits.max(1, keepdims=True)).sum(1)
    assert np.abs(values - plain).max() > 1e-6
