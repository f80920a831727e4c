"""Logit/feature scores against float64 NumPy written independently here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ood_jax import scores

ALL_SCORES = (scores.msp, scores.energy, scores.neg_entropy, scores.max_logit, scores.feature_norm)


def _np_softmax(x):
    shifted = x - x.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(scale=3.0, size=(7, 10))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1000.0])
def test_msp_and_energy_match_numpy(logits, temperature):
    p = _np_softmax(logits / temperature)
    np.testing.assert_allclose(
        scores.msp(logits.astype(np.float32), temperature=temperature), p.max(-1), rtol=1e-5
    )
    # energy = T * log sum exp(f / T), summed naively in float64 (values are small).
    expected = temperature * np.log(np.exp(logits / temperature).sum(-1))
    np.testing.assert_allclose(
        scores.energy(logits.astype(np.float32), temperature=temperature), expected, rtol=1e-5
    )


def test_max_logit_neg_entropy_feature_norm_match_numpy(logits):
    x = logits.astype(np.float32)
    np.testing.assert_allclose(scores.max_logit(x), logits.max(-1), rtol=1e-6)
    p = _np_softmax(logits)
    np.testing.assert_allclose(scores.neg_entropy(x), (p * np.log(p)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(scores.feature_norm(x), np.sqrt((logits**2).sum(-1)), rtol=1e-6)


def test_hand_values():
    # Two equal logits out of two: MSP 1/2, energy log 2 + f, entropy -log 2.
    x = jnp.array([[3.0, 3.0]])
    np.testing.assert_allclose(scores.msp(x), [0.5], rtol=1e-6)
    np.testing.assert_allclose(scores.energy(x), [3.0 + np.log(2.0)], rtol=1e-6)
    np.testing.assert_allclose(scores.neg_entropy(x), [-np.log(2.0)], rtol=1e-6)
    np.testing.assert_allclose(scores.feature_norm(jnp.array([[3.0, 4.0]])), [5.0], rtol=1e-6)


def test_huge_logits_and_bfloat16_are_finite_and_exact():
    x = jnp.array([[1e30, -1e30, 0.0], [5e37, 5e37, 1.0]], jnp.float32)
    np.testing.assert_allclose(scores.msp(x), [1.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(scores.energy(x), [1e30, 5e37], rtol=1e-6)
    np.testing.assert_allclose(scores.neg_entropy(x), [0.0, -np.log(2.0)], atol=1e-6)
    np.testing.assert_allclose(
        scores.feature_norm(x), [np.sqrt(2) * 1e30, np.sqrt(2) * 5e37], rtol=1e-6
    )
    # bfloat16 input: computed and returned in float32, same values as the float32 input.
    b = jnp.array([[2.0, 1.0, -1.0]], jnp.bfloat16)
    for fn in ALL_SCORES:
        out = fn(b)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, fn(b.astype(jnp.float32)), rtol=1e-6)


def test_higher_means_more_in_distribution():
    confident = jnp.array([[10.0, 0.0, 0.0]])
    uniform = jnp.array([[1.0, 1.0, 1.0]])
    for fn in (scores.msp, scores.energy, scores.neg_entropy, scores.max_logit):
        assert fn(confident)[0] > fn(uniform)[0], fn.__name__


def test_jit_vmap_grad_and_leading_axes(logits):
    x = jnp.asarray(logits, jnp.float32)
    for fn in ALL_SCORES:
        np.testing.assert_allclose(jax.jit(fn)(x), fn(x), rtol=1e-6)
        assert fn(x.reshape(7, 1, 10)).shape == (7, 1)
        assert np.all(np.isfinite(jax.grad(lambda v, f=fn: f(v).sum())(x)))
    # vmap over temperatures (a score sweep): traced temperature works.
    temps = jnp.array([1.0, 2.0])
    swept = jax.vmap(lambda t: scores.energy(x, temperature=t))(temps)
    np.testing.assert_allclose(swept[1], scores.energy(x, temperature=2.0), rtol=1e-6)
    # d energy / d logits = softmax (independent identity).
    grad = jax.grad(lambda v: scores.energy(v).sum())(x)
    np.testing.assert_allclose(grad, _np_softmax(logits), atol=1e-6)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="temperature"):
        scores.msp(jnp.ones((2, 3)), temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        scores.energy(jnp.ones((2, 3)), temperature=-1.0)
    with pytest.raises(ValueError, match="logits"):
        scores.max_logit(jnp.float32(1.0))
    with pytest.raises(ValueError, match="features"):
        scores.feature_norm(jnp.ones((2, 0)))
