"""ResNet-9 (DAWNBench): parameter count by formula, shapes, train/eval contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ood_jax.models import create_model


def _expected_params(w: int, k: int) -> int:
    # Counted by hand from the architecture: 3x3 bias-free convs, BN scale+bias, linear head.
    convs = [(3, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w)]
    convs += [(8 * w, 8 * w)] * 2
    conv_params = sum(9 * cin * cout for cin, cout in convs)
    bn_params = sum(2 * cout for _, cout in convs)
    return conv_params + bn_params + 8 * w * k + k


@pytest.mark.parametrize("width", [64, 16])
def test_parameter_count(width):
    model = create_model("resnet9", num_classes=10, rngs=nnx.Rngs(0), width=width)
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == _expected_params(width, 10)
    if width == 64:
        assert count == 6_573_130  # the published ResNet-9 size


def test_outputs_and_modes():
    model = create_model("resnet9", num_classes=7, rngs=nnx.Rngs(1), width=4)
    x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
    logits, feats = model(x)
    assert logits.shape == (3, 7) and feats.shape == (3, 32)
    # The head is linear in the (pooled) features.
    k, b = model.head.kernel.value, model.head.bias.value
    np.testing.assert_allclose(
        logits, np.asarray(feats) @ np.asarray(k) + np.asarray(b), rtol=1e-5, atol=1e-5
    )
    model.eval()
    l1, _ = model(x)
    l2, _ = model(x)
    np.testing.assert_array_equal(l1, l2)  # eval: running statistics, deterministic


def test_bad_width():
    with pytest.raises(ValueError, match="width"):
        create_model("resnet9", num_classes=10, rngs=nnx.Rngs(0), width=0)
    with pytest.raises(ValueError, match="NHWC"):
        create_model("resnet9", num_classes=10, rngs=nnx.Rngs(0), width=2)(jnp.ones((1, 3, 32, 32)))


def test_global_pooling_matches_numpy():
    from ood_jax.models.classifier import global_pool

    x = np.random.default_rng(0).normal(size=(2, 4, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(global_pool(jnp.asarray(x), "max"), x.max(axis=(1, 2)))
    np.testing.assert_allclose(global_pool(jnp.asarray(x), "avg"), x.mean(axis=(1, 2)), rtol=1e-6)
    model = create_model("resnet9", num_classes=3, rngs=nnx.Rngs(0), width=2, pooling="max")
    _, feats = model(jnp.ones((1, 32, 32, 3)))
    assert feats.shape == (1, 16)
