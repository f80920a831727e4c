"""Tests for ood_jax.models: checked against PyTorch parameter counts and an
independent float64 NumPy forward pass of the tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ood_jax.models import (
    MODEL_NAMES,
    BasicBlock,
    ResNet,
    SpectralNormConv,
    WideResNet,
    build_model,
    create_model,
)
from ood_jax.train import split_model


def _images(batch: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, 32, 32, 3), jnp.float32)


def _num_params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _np_conv(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
    """Cross-correlation with PyTorch padding k // 2, NHWC x HWIO, float64."""
    k = kernel.shape[0]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h_out = (x.shape[1] + 2 * pad - k) // stride + 1
    w_out = (x.shape[2] + 2 * pad - k) // stride + 1
    out = np.zeros((x.shape[0], h_out, w_out, kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            patch = xp[:, i : i + stride * h_out : stride, j : j + stride * w_out : stride, :]
            out += patch @ kernel[i, j]
    return out


def _np_bn_train(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def _np(v) -> np.ndarray:
    return np.asarray(v[...], np.float64)


def _np_tiny_forward(model, images, *, slope: float) -> tuple[np.ndarray, np.ndarray]:
    """Float64 NumPy forward pass of TinyCNN in training mode (batch statistics)."""
    act = lambda x: np.where(x > 0, x, slope * x)
    x = np.asarray(images, np.float64)
    x = act(
        _np_bn_train(
            _np_conv(x, _np(model.conv1.kernel), 1), _np(model.bn1.scale), _np(model.bn1.bias)
        )
    )
    x = act(
        _np_bn_train(
            _np_conv(x, _np(model.conv2.kernel), 2), _np(model.bn2.scale), _np(model.bn2.bias)
        )
    )
    z = x.mean(axis=(1, 2))
    return z @ _np(model.head.kernel) + _np(model.head.bias), z


# -- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        # torch: sum(p.numel() for p in model.parameters()) of kuangliu ResNet18(10 classes)
        # and hendrycks WideResNet(40, 10, 2, dropRate=0.3); see tests/conformance/torch_models.py.
        ("resnet18", 11_173_962),
        ("resnet34", 21_282_122),
        ("resnet50", 23_520_842),
        ("wrn40_2", 2_243_546),
    ],
)
def test_parameter_counts_match_pytorch(name, expected):
    model = nnx.eval_shape(lambda: create_model(name, num_classes=10, rngs=nnx.Rngs(0)))
    assert _num_params(model) == expected


def test_wrn_parameter_count_by_formula():
    # Hand count of WRN-depth-k: stem, 3 groups of n blocks, final BN, head.
    depth, k, classes = 16, 1, 7
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = 3 * 16 * 9
    for g in range(3):
        cin, cout = widths[g], widths[g + 1]
        for i in range(n):
            c_in = cin if i == 0 else cout
            total += 2 * c_in + 9 * c_in * cout + 2 * cout + 9 * cout * cout
            total += c_in * cout if c_in != cout else 0
    total += 2 * widths[3] + widths[3] * classes + classes
    model = nnx.eval_shape(
        lambda: WideResNet(depth=depth, widen_factor=k, num_classes=classes, rngs=nnx.Rngs(0))
    )
    assert _num_params(model) == total


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="resnet18.*wrn40_2"):
        create_model("vgg16", num_classes=10, rngs=nnx.Rngs(0))
    assert set(MODEL_NAMES) == {
        "resnet18",
        "resnet34",
        "resnet50",
        "wrn40_2",
        "resnet9",
        "tiny",
        "resnet18_imagenet",
        "resnet50_imagenet",
        "densenet100",
    }


@pytest.mark.parametrize(
    "options, match",
    [
        ({"activation": "gelu"}, "activation"),
        ({"pooling": "median"}, "pooling"),
        ({"num_classes": 0}, "num_classes"),
        ({"depth_multiplier": 2}, "Bad options"),
    ],
)
def test_bad_options_raise(options, match):
    kwargs = {"num_classes": 10, **options}
    with pytest.raises(ValueError, match=match):
        create_model("tiny", rngs=nnx.Rngs(0), **kwargs)


def test_initialization_follows_pytorch_references():
    # Shallow variants of the same classes keep the test fast; same layer shapes.
    wrn = WideResNet(depth=10, widen_factor=2, num_classes=10, rngs=nnx.Rngs(0))
    kernel = np.asarray(wrn.blocks[-1].conv2.kernel[...])  # 3x3, 128 -> 128
    np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 128)), rtol=0.02)
    assert np.all(np.asarray(wrn.head.bias[...]) == 0)
    resnet = ResNet(
        stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, num_classes=10, rngs=nnx.Rngs(0)
    )
    kernel = np.asarray(resnet.blocks[-1].conv2.kernel[...])  # 3x3, 512 -> 512
    bound = 1.0 / np.sqrt(9 * 512)
    assert np.abs(kernel).max() <= bound
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3.0), rtol=0.02)


# -- forward contract -----------------------------------------------------------------------


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet50", 2048), ("wrn40_2", 128)])
def test_output_shapes(name, dim):
    model = create_model(name, num_classes=7, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, _images(3))
    assert out[0].shape == (3, 7) and out[1].shape == (3, dim)
    assert out[0].dtype == jnp.float32 and out[1].dtype == jnp.float32


@pytest.mark.parametrize("activation, slope", [("relu", 0.0), ("leaky_relu", 0.01)])
def test_tiny_matches_numpy_forward(activation, slope):
    model = create_model("tiny", num_classes=5, rngs=nnx.Rngs(1), activation=activation)
    images = _images(4)
    logits, features = model(images)
    want_logits, want_features = _np_tiny_forward(model, images, slope=slope)
    np.testing.assert_allclose(features, want_features, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)


def test_leaky_relu_changes_outputs():
    images = _images(2)
    relu = create_model("tiny", num_classes=5, rngs=nnx.Rngs(1))
    leaky = create_model("tiny", num_classes=5, rngs=nnx.Rngs(1), activation="leaky_relu")
    assert not np.allclose(relu(images)[1], leaky(images)[1])


def test_batchnorm_statistics_update_only_in_train_mode():
    model = create_model("tiny", num_classes=5, rngs=nnx.Rngs(2))
    images = _images(4)
    model(images)
    # momentum 0.9 from zeros: running_mean = 0.1 * batch mean of the first conv's output.
    pre_bn = _np_conv(np.asarray(images, np.float64), _np(model.conv1.kernel), 1)
    np.testing.assert_allclose(model.bn1.mean[...], 0.1 * pre_bn.mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(
        model.bn1.var[...], 0.9 + 0.1 * pre_bn.var(axis=(0, 1, 2)), rtol=1e-4
    )
    stats = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
    model.eval()
    eval_logits, _ = model(_images(4, seed=5))
    jax.tree.map(np.testing.assert_array_equal, stats, nnx.state(model, nnx.BatchStat))
    # Eval normalizes with the running statistics, so one example's output does not
    # depend on the rest of the batch.
    single, _ = model(_images(4, seed=5)[:1])
    np.testing.assert_allclose(single[0], eval_logits[0], rtol=1e-5, atol=1e-6)


def test_dropout_only_in_train_mode():
    model = WideResNet(depth=10, widen_factor=1, dropout_rate=0.3, num_classes=5, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, x: m(x)[0])
    images = _images(2)
    a, b = forward(model, images), forward(model, images)
    assert not np.allclose(a, b)  # BN uses the same batch statistics, so dropout differs
    # The train step's mechanism: a model rebuilt with the same step key draws the same mask.
    model_def, params, stats = split_model(model)
    keyed = lambda k: model_def.merge(params, stats, train=True, key=k)(images)[0]
    key = jax.random.key_data(jax.random.key(3))
    np.testing.assert_array_equal(keyed(key), keyed(key))
    assert not np.allclose(keyed(key), keyed(jax.random.key_data(jax.random.key(4))))
    model.train()
    model.eval()
    np.testing.assert_array_equal(forward(model, images), forward(model, images))
    no_dropout = WideResNet(depth=10, widen_factor=1, num_classes=5, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(forward(no_dropout, images), forward(no_dropout, images))


def test_normalize_features_only_changes_training_logits():
    images = _images(4)
    plain = create_model("tiny", num_classes=5, rngs=nnx.Rngs(4))
    normed = create_model("tiny", num_classes=5, rngs=nnx.Rngs(4), normalize_features=True)
    logits, features = normed(images)
    _, plain_features = plain(images)
    np.testing.assert_array_equal(features, plain_features)  # features stay raw
    z = np.asarray(features, np.float64)
    assert not np.allclose(np.linalg.norm(z, axis=1), 1.0)
    w, b = _np(normed.head.kernel), _np(normed.head.bias)
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(logits, unit @ w + b, rtol=1e-5, atol=1e-6)
    plain.eval()
    normed.eval()
    eval_logits, eval_features = normed(images)
    np.testing.assert_array_equal(eval_logits, plain(images)[0])
    np.testing.assert_allclose(eval_logits, _np(eval_features) @ w + b, rtol=1e-5, atol=1e-5)


# -- spectral normalization -----------------------------------------------------------------


def test_spectral_norm_bounds_largest_singular_value():
    model = create_model("tiny", num_classes=5, rngs=nnx.Rngs(5), spectral_norm=True)
    assert isinstance(model.conv2, SpectralNormConv)
    raw = np.asarray(model.conv2.conv.kernel[...], np.float64)
    sigma_true = np.linalg.svd(raw.reshape(-1, raw.shape[-1]), compute_uv=False)[0]
    images = _images(2)
    for _ in range(30):  # one power-iteration step per training forward pass
        model(images)
    np.testing.assert_array_equal(model.conv2.conv.kernel[...], raw.astype(np.float32))
    normalized = np.asarray(model.conv2.normalized_kernel(), np.float64)
    top = np.linalg.svd(normalized.reshape(-1, raw.shape[-1]), compute_uv=False)[0]
    assert top <= 1.0 + 1e-3 and top >= 0.99
    np.testing.assert_allclose(normalized, raw / sigma_true, rtol=1e-2, atol=1e-4)
    # The layer convolves with W / sigma.
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 32, 32, 8)), np.float64)
    model.eval()
    np.testing.assert_allclose(
        model.conv2(jnp.asarray(x, jnp.float32)), _np_conv(x, normalized, 2), rtol=1e-4, atol=1e-4
    )


def test_spectral_norm_state_updates_only_in_train_mode():
    model = create_model("tiny", num_classes=5, rngs=nnx.Rngs(6), spectral_norm=True)
    u0 = np.array(model.conv1.u[...])
    model.eval()
    model(_images(2))
    np.testing.assert_array_equal(model.conv1.u[...], u0)
    model.train()
    model(_images(2))
    assert not np.allclose(model.conv1.u[...], u0)


# -- input validation, dtypes, sharding -----------------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype, match",
    [
        ((2, 3, 32, 32), jnp.float32, "NCHW"),
        ((32, 32, 3), jnp.float32, "4-D"),
        ((2, 32, 32, 1), jnp.float32, "channels last"),
        ((2, 32, 32, 3), jnp.uint8, "floating point"),
    ],
)
def test_bad_images_raise_clear_errors(shape, dtype, match):
    model = create_model("tiny", num_classes=5, rngs=nnx.Rngs(0))
    images = jnp.zeros(shape, dtype)
    with pytest.raises(ValueError, match=match):
        model(images)
    with pytest.raises(ValueError, match=match):  # the check is on static shapes
        nnx.jit(lambda m, x: m(x))(model, images)


def test_bfloat16_compute_keeps_float32_params():
    model = create_model("tiny", num_classes=5, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    reference = create_model("tiny", num_classes=5, rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits, features = model(_images(4))
    assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
    np.testing.assert_allclose(logits, reference(_images(4))[0], rtol=0.05, atol=0.05)


def test_sharded_batch_gives_global_batchnorm_statistics():
    # Under jit with the batch split over 8 devices, BatchNorm must still use
    # the global batch mean (no axis_name needed).
    mesh = jax.make_mesh((8,), ("data",))
    images = _images(16)
    single = create_model("tiny", num_classes=5, rngs=nnx.Rngs(7))
    sharded = create_model("tiny", num_classes=5, rngs=nnx.Rngs(7))
    want, _ = single(images)
    graphdef, state = nnx.split(sharded)

    @jax.jit
    def forward(state, x):
        model = nnx.merge(graphdef, state)
        logits, _ = model(x)
        return logits, nnx.state(model)

    x = jax.device_put(images, NamedSharding(mesh, P("data")))
    got, new_state = forward(state, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    nnx.update(sharded, new_state)
    np.testing.assert_allclose(sharded.bn2.mean[...], single.bn2.mean[...], rtol=1e-4, atol=1e-6)


def test_build_model_from_a_json_identity():
    """A checkpoint's identity (JSON values: "bfloat16" as a string) builds the model
    create_model builds from the same name, class count, seed and options."""
    identity = {"name": "tiny", "num_classes": 7, "options": {"width": 4, "dtype": "bfloat16"}}
    built = build_model(identity, seed=3)
    direct = create_model("tiny", num_classes=7, rngs=nnx.Rngs(3), width=4, dtype=jnp.bfloat16)
    for kind in (nnx.Param, nnx.BatchStat):
        jax.tree.map(np.testing.assert_array_equal, nnx.state(built, kind), nnx.state(direct, kind))
    built.eval()
    logits, _ = built(_images(2))
    assert logits.shape == (2, 7) and built.dtype == jnp.bfloat16
    # The seed defaults to 0.
    default = build_model({"name": "tiny", "num_classes": 7, "options": {"width": 4}})
    zero = create_model("tiny", num_classes=7, rngs=nnx.Rngs(0), width=4)
    np.testing.assert_array_equal(default.head.kernel.value, zero.head.kernel.value)
