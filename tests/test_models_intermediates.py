"""The models' ``capture=`` intermediates, and that the default call is unchanged.

``fixtures/models/outputs_before_intermediates.npz`` holds every model's outputs
(``nnx.Rngs(0)``, reduced widths, a fixed input) computed with the code before the
``capture=`` option existed.
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ood_jax.models import create_model

FIXTURE = Path(__file__).parent / "fixtures" / "models" / "outputs_before_intermediates.npz"
CONFIGS = {
    "tiny": dict(width=4, dropout_rate=0.3),
    "resnet9": dict(width=4, pooling="max"),
    "resnet18": dict(widths=(4, 8, 8, 16)),
    "resnet50": dict(widths=(4, 4, 8, 8)),
    "resnet18_imagenet": dict(widths=(4, 4, 8, 8)),
    "wrn40_2": dict(base_width=4),
    "densenet100": dict(depth=10, growth_rate=4),
}
# Stem + every stage (OpenOOD's / deep_Mahalanobis_detector's feature lists).
NUM_BLOCKS = {
    "tiny": 2,
    "resnet9": 4,
    "resnet18": 5,
    "resnet50": 5,
    "resnet18_imagenet": 5,
    "wrn40_2": 4,
    "densenet100": 4,
}


def _images():
    return np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)


def _eval_model(name):
    """The fixture's model: one training-mode call (BatchNorm statistics move), then eval."""
    model = create_model(name, num_classes=5, rngs=nnx.Rngs(0), **CONFIGS[name])
    train_logits, _ = model(_images())
    model.eval()
    return model, train_logits


@pytest.mark.parametrize("name", CONFIGS)
def test_default_outputs_are_bit_identical_to_before(name):
    ref = np.load(FIXTURE)
    model, train_logits = _eval_model(name)
    logits, features = model(_images())
    # Bit-identical on the machine that saved the fixture (8 CPU devices, as conftest);
    # XLA's CPU convolutions round differently on another CPU (a later CI machine: 1.3e-6
    # on a logit of 0.019). The outputs are O(1), so 1e-5 is float32 rounding through a
    # few dozen layers; any change to what the default call computes moves them by far more.
    close = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(train_logits), ref[f"{name}/train_logits"], **close)
    np.testing.assert_allclose(np.asarray(logits), ref[f"{name}/logits"], **close)
    np.testing.assert_allclose(np.asarray(features), ref[f"{name}/features"], **close)


@pytest.mark.parametrize("name", CONFIGS)
def test_captured_intermediates_are_consistent_with_the_outputs(name):
    ref = np.load(FIXTURE)
    model, _ = _eval_model(name)
    plain_logits, plain_features = model(_images())
    logits, features, out = model(_images(), capture=("pre_pool", "blocks"))
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain_logits))
    np.testing.assert_array_equal(np.asarray(features), np.asarray(plain_features))
    pre_pool = np.asarray(out["pre_pool"], np.float64)
    pooled = pre_pool.max(axis=(1, 2)) if model.pooling == "max" else pre_pool.mean(axis=(1, 2))
    np.testing.assert_allclose(pooled, ref[f"{name}/features"], rtol=1e-5, atol=1e-5)
    # The head on the pooled map, by hand.
    head = pooled @ np.asarray(model.head.kernel[...]) + np.asarray(model.head.bias[...])
    np.testing.assert_allclose(head, ref[f"{name}/logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(model.logits_from_pre_pool(out["pre_pool"])), head, rtol=1e-4, atol=1e-5
    )
    blocks = out["blocks"]
    assert len(blocks) == NUM_BLOCKS[name]
    assert all(b.ndim == 4 and b.shape[0] == 3 and b.dtype == jnp.float32 for b in blocks)
    # Spatial size never grows along the network.
    sizes = [b.shape[1] for b in blocks]
    assert sizes == sorted(sizes, reverse=True)


def test_resnet_blocks_are_the_stem_and_each_stage_output():
    model = create_model("resnet18", num_classes=5, rngs=nnx.Rngs(0), widths=(4, 8, 8, 16))
    model.eval()
    _, _, out = model(_images(), capture=("blocks", "pre_pool"))
    assert [b.shape[1:] for b in out["blocks"]] == [
        (32, 32, 4),
        (32, 32, 4),
        (16, 16, 8),
        (8, 8, 8),
        (4, 4, 16),
    ]
    # ResNet pools the last stage's output directly.
    np.testing.assert_array_equal(np.asarray(out["blocks"][-1]), np.asarray(out["pre_pool"]))
    # The stem by hand from its own layers.
    x = jnp.asarray(_images())
    stem = model.act(model.bn1(model.conv1(x)))
    np.testing.assert_allclose(np.asarray(out["blocks"][0]), np.asarray(stem), atol=1e-6)


def test_capture_one_kind_and_unknown_names():
    model = create_model("tiny", num_classes=3, rngs=nnx.Rngs(0), width=4)
    model.eval()
    _, _, out = model(_images(), capture=("pre_pool",))
    assert set(out) == {"pre_pool"}
    with pytest.raises(ValueError, match="capture"):
        model(_images(), capture=("pre_logits",))
