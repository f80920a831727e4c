"""The models' BatchNorm (closed-form backward) and 2x2 max-pool, against float64 NumPy
and finite differences, and against the Flax/lax operations they replace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ood_jax.models.layers import BatchNorm, batch_norm, batch_norm_train, max_pool_2x2

EPS = 1e-5


def _np_batch_norm(x, scale, bias):
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))  # biased, as in training-mode BatchNorm
    return (x - mean) / np.sqrt(var + EPS) * scale + bias


def _data(shape=(6, 5, 4, 3), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.5, 2.0, size=shape)
    scale = rng.uniform(0.5, 2.0, size=shape[-1])
    bias = rng.normal(size=shape[-1])
    weights = rng.normal(size=shape)  # a fixed linear read-out: loss = sum(w * y)
    return x, scale, bias, weights


def test_batch_norm_train_forward_and_statistics_match_numpy():
    x, scale, bias, _ = _data()
    y, mean, var = batch_norm_train(*(jnp.asarray(a, jnp.float32) for a in (x, scale, bias)), EPS)
    np.testing.assert_allclose(y, _np_batch_norm(x, scale, bias), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(var, x.var(axis=(0, 1, 2)), rtol=1e-4)


def test_batch_norm_train_gradient_matches_finite_differences():
    # Central differences of the float64 NumPy loss, coordinate by coordinate.
    x, scale, bias, w = _data(shape=(4, 3, 2, 3))

    def loss(x_, scale_, bias_):
        return float((w * _np_batch_norm(x_, scale_, bias_)).sum())

    def numeric(index, h=1e-5):
        args = [x.copy(), scale.copy(), bias.copy()]
        arg, pos = index
        plus, minus = [a.copy() for a in args], [a.copy() for a in args]
        plus[arg][pos] += h
        minus[arg][pos] -= h
        return (loss(*plus) - loss(*minus)) / (2 * h)

    def jax_loss(x_, scale_, bias_):
        return (jnp.asarray(w, jnp.float32) * batch_norm_train(x_, scale_, bias_, EPS)[0]).sum()

    grads = jax.grad(jax_loss, argnums=(0, 1, 2))(
        *(jnp.asarray(a, jnp.float32) for a in (x, scale, bias))
    )
    for arg, array in enumerate((x, scale, bias)):
        expected = np.array([numeric((arg, pos)) for pos in np.ndindex(array.shape)])
        np.testing.assert_allclose(np.asarray(grads[arg]).ravel(), expected, rtol=2e-3, atol=2e-3)


def test_batch_norm_statistics_cotangents_flow_to_the_input():
    # d/dx of sum(c1 * mean + c2 * var) = (c1 + 2 c2 (x - mean)) / count, per channel.
    x, scale, bias, _ = _data()
    c1, c2 = np.array([0.3, -1.0, 2.0]), np.array([1.5, 0.2, -0.7])

    def f(x_):
        _, mean, var = batch_norm_train(x_, jnp.asarray(scale), jnp.asarray(bias), EPS)
        return (c1 * mean + c2 * var).sum()

    count = x.shape[0] * x.shape[1] * x.shape[2]
    expected = (c1 + 2 * c2 * (x - x.mean(axis=(0, 1, 2)))) / count
    np.testing.assert_allclose(
        jax.grad(f)(jnp.asarray(x, jnp.float32)), expected, rtol=1e-4, atol=1e-6
    )


def test_batch_norm_module_matches_flax_batch_norm():
    # Same parameters, outputs, running statistics and gradients as nnx.BatchNorm.
    x, scale, bias, w = _data(shape=(8, 6, 6, 5), seed=1)
    x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    ours = batch_norm(5, dtype=None, rngs=nnx.Rngs(0))
    flax_bn = nnx.BatchNorm(5, momentum=0.9, epsilon=EPS, rngs=nnx.Rngs(0))
    assert isinstance(ours, BatchNorm)
    results = []
    for module in (ours, flax_bn):
        module.scale[...] = jnp.asarray(scale, jnp.float32)
        module.bias[...] = jnp.asarray(bias, jnp.float32)
        grad_module, grad_x = nnx.grad(lambda m, x_: (w * m(x_)).sum(), argnums=(0, 1))(module, x)
        results.append(
            {
                "grad_x": grad_x,
                "grad_scale": grad_module.scale[...],
                "grad_bias": grad_module.bias[...],
                "mean": module.mean[...],
                "var": module.var[...],
                "train_out": module(x),
            }
        )
        module.eval()
        results[-1]["eval_out"] = module(x)
    for key in results[0]:
        np.testing.assert_allclose(results[0][key], results[1][key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32])  # a bf16 conv's output, images
def test_bf16_batch_norm_matches_flax_batch_norm(x_dtype):
    # In bf16 (the presets' TPU/GPU precision) the training pass normalizes as
    # x * a + (bias - mean * a), which libtpu's v6e compiler takes where nnx.BatchNorm's
    # (x - mean) * a + bias crashes it (ood_jax.models.layers): the same outputs, running
    # statistics and gradients as nnx.BatchNorm(dtype=bf16), the formulation it replaces.
    x, scale, bias, w = _data(shape=(16, 6, 6, 8), seed=2)
    x, w = jnp.asarray(x, x_dtype), jnp.asarray(w, jnp.float32)
    results = []
    for module in (
        batch_norm(8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
        nnx.BatchNorm(8, momentum=0.9, epsilon=EPS, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
    ):
        module.scale[...] = jnp.asarray(scale, jnp.float32)
        module.bias[...] = jnp.asarray(bias, jnp.float32)

        def loss(m, x_):
            return (w * m(x_).astype(jnp.float32)).sum()

        grad_module, grad_x = nnx.grad(loss, argnums=(0, 1))(module, x)
        out = module(x)
        assert out.dtype == jnp.bfloat16 and grad_x.dtype == x_dtype
        results.append(
            {
                "train_out": out,
                "grad_x": grad_x,
                "grad_scale": grad_module.scale[...],
                "grad_bias": grad_module.bias[...],
                "mean": module.mean[...],
                "var": module.var[...],
            }
        )
        module.eval()
        results[-1]["eval_out"] = module(x)
    ours, flax = ({k: np.asarray(v, np.float32) for k, v in r.items()} for r in results)
    for key in ours:
        # Equal up to float32 rounding before the cast to bf16 (equal bit for bit on
        # XLA:CPU here): at most one bf16 step (2**-8 relative) apart, and rarely.
        np.testing.assert_allclose(ours[key], flax[key], rtol=2**-7, atol=1e-6, err_msg=key)
        assert np.mean(ours[key] != flax[key]) < 0.01, key


def test_batch_norm_module_falls_back_for_other_cases():
    bn = batch_norm(3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = bn(jnp.ones((2, 2, 2, 3), jnp.float32), mask=jnp.ones((2, 2, 2, 3), bool))
    assert y.dtype == jnp.bfloat16  # nnx.BatchNorm's dtype handling


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (1, 5, 7, 2)])
def test_max_pool_2x2_matches_reduce_window_and_numpy(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    n, h, w, c = shape
    hh, ww = h // 2, w // 2
    expected = x[:, : 2 * hh, : 2 * ww].reshape(n, hh, 2, ww, 2, c).max(axis=(2, 4))
    np.testing.assert_array_equal(max_pool_2x2(jnp.asarray(x)), expected)
    np.testing.assert_array_equal(
        max_pool_2x2(jnp.asarray(x)), nnx.max_pool(jnp.asarray(x), (2, 2), strides=(2, 2))
    )
    # Without ties the gradient goes to each window's maximum, as lax.reduce_window's does.
    g = rng.normal(size=expected.shape).astype(np.float32)
    ours = jax.vjp(max_pool_2x2, jnp.asarray(x))[1](jnp.asarray(g))[0]
    theirs = jax.vjp(lambda v: nnx.max_pool(v, (2, 2), strides=(2, 2)), jnp.asarray(x))[1](
        jnp.asarray(g)
    )[0]
    np.testing.assert_array_equal(ours, theirs)
    assert np.count_nonzero(np.asarray(ours)) == g.size
