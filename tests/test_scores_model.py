"""ODIN and GradNorm: per-example gradients against single-example loops and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ood_jax import scores

NUM_CLASSES = 5


def _mlp_params(seed=0, in_dim=4 * 4 * 3, hidden=16):
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.normal(size=(in_dim, hidden)) / np.sqrt(in_dim), jnp.float32),
        "b1": jnp.asarray(rng.normal(size=hidden) * 0.1, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(hidden, NUM_CLASSES)), jnp.float32),
    }


def _mlp_apply(params, images):
    hidden = jnp.tanh(images.reshape(images.shape[0], -1) @ params["w1"] + params["b1"])
    return hidden @ params["w2"]


@pytest.fixture
def images():
    return jnp.asarray(np.random.default_rng(1).normal(size=(6, 4, 4, 3)), jnp.float32)


# ----------------------------------------------------------------------------- ODIN


def _np_msp(logits, temperature):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return 1.0 / np.exp(z).sum(-1)


def _odin_loop(apply_fn, images, temperature, epsilon, std):
    """The authors' recipe, one example at a time: the gradient of the cross-entropy
    against the predicted label, step x - eps * sign(grad) / std."""

    def ce(v, label):
        return -jax.nn.log_softmax(apply_fn(v)[0] / temperature)[label]

    grad_fn = jax.jit(jax.grad(ce))
    out = []
    for image in images:
        x = image[None]
        label = int(jnp.argmax(apply_fn(x)[0]))
        grad = grad_fn(x, label)
        perturbed = x - epsilon * np.sign(np.asarray(grad)) / np.asarray(std)
        out.append(_np_msp(apply_fn(jnp.asarray(perturbed, jnp.float32)), temperature)[0])
    return np.array(out)


@pytest.mark.parametrize("temperature,epsilon", [(1000.0, 0.0014), (1.0, 0.05)])
def test_odin_matches_single_example_loop(images, temperature, epsilon):
    params = _mlp_params()
    apply_fn = lambda x: _mlp_apply(params, x)
    got = scores.odin(apply_fn, images, temperature=temperature, epsilon=epsilon)
    expected = _odin_loop(apply_fn, images, temperature, epsilon, scores.CIFAR10_STD)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_odin_perturbation_increases_confidence(images):
    apply_fn = lambda x: _mlp_apply(_mlp_params(seed=2), x)
    plain = scores.odin(apply_fn, images, temperature=1.0, epsilon=0.0)
    np.testing.assert_allclose(plain, _np_msp(apply_fn(images), 1.0), rtol=1e-5)
    perturbed = scores.odin(apply_fn, images, temperature=1.0, epsilon=0.01)
    assert np.all(np.asarray(perturbed) > np.asarray(plain))


def test_odin_std_divides_per_channel(images):
    params = _mlp_params(seed=3)
    apply_fn = lambda x: _mlp_apply(params, x)
    std = (0.5, 1.0, 2.0)
    got = scores.odin(apply_fn, images, temperature=10.0, epsilon=0.02, std=std)
    np.testing.assert_allclose(got, _odin_loop(apply_fn, images, 10.0, 0.02, std), rtol=1e-5)


class _ConvBN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
        features = jnp.mean(nnx.relu(self.bn(self.conv(x))), axis=(1, 2))
        return self.head(features), features


def test_odin_with_nnx_batchnorm_model_in_eval_mode_is_per_example(images):
    model = _ConvBN(nnx.Rngs(0))
    # Non-trivial running statistics so BatchNorm in eval mode does something.
    model.bn.mean.value = jnp.full(4, 0.3)
    model.bn.var.value = jnp.full(4, 2.0)
    model.eval()
    apply_fn = lambda x: model(x)[0]
    images = images[:3]
    odin = jax.jit(lambda x: scores.odin(apply_fn, x, temperature=1000.0, epsilon=0.0014))
    batched = odin(images)
    # The loop sees each example alone, so equality means no coupling through the batch.
    np.testing.assert_allclose(
        batched, _odin_loop(apply_fn, images, 1000.0, 0.0014, scores.CIFAR10_STD), rtol=1e-5
    )


def test_odin_bad_input(images):
    apply_fn = lambda x: _mlp_apply(_mlp_params(), x)
    with pytest.raises(ValueError, match="temperature"):
        scores.odin(apply_fn, images, temperature=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        scores.odin(apply_fn, images, epsilon=-0.1)
    with pytest.raises(ValueError, match="std"):
        scores.odin(apply_fn, images, std=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"model\(x\)\[0\]"):
        scores.odin(lambda x: (apply_fn(x), x), images)


# ----------------------------------------------------------------------------- GradNorm


@pytest.fixture
def head():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(9, 6)) * 2
    kernel = rng.normal(size=(6, NUM_CLASSES))
    bias = rng.normal(size=NUM_CLASSES)
    return features, kernel, bias


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_gradnorm_matches_closed_form(head, temperature):
    features, kernel, bias = head
    logits = (features @ kernel + bias) / temperature
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = np.abs(features).sum(1) * np.abs((p - 1 / NUM_CLASSES) / temperature).sum(1)
    got = scores.gradnorm(
        features.astype(np.float32),
        kernel.astype(np.float32),
        bias.astype(np.float32),
        temperature=temperature,
        chunk_size=4,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gradnorm_matches_single_example_kl_gradient_loop(head):
    features, kernel, bias = (jnp.asarray(a, jnp.float32) for a in head)
    uniform = jnp.full(NUM_CLASSES, 1 / NUM_CLASSES)

    def kl_uniform_to_softmax(w, z):
        # KL(u || p) = sum u (log u - log p): same gradient as the cross-entropy to u.
        log_p = jax.nn.log_softmax(z[None] @ w + bias)[0]
        return jnp.sum(uniform * (jnp.log(uniform) - log_p))

    expected = [float(jnp.abs(jax.grad(kl_uniform_to_softmax)(kernel, z)).sum()) for z in features]
    got = scores.gradnorm(features, kernel, bias)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Per example, not per batch: a batch-mean gradient (the LogitNorm repo's bug) is
    # one number for the whole batch and differs from every per-example value.
    assert np.unique(np.round(np.asarray(got), 5)).size == len(features)
    np.testing.assert_allclose(scores.gradnorm(features[2:3], kernel, bias), got[2:3], rtol=1e-6)


def test_gradnorm_higher_for_confident_inputs_and_nnx_head():
    model = _ConvBN(nnx.Rngs(1))
    kernel = np.zeros((4, NUM_CLASSES), np.float32)
    kernel[np.arange(4), np.arange(4)] = 5.0
    model.head.kernel.value = jnp.asarray(kernel)
    confident = jnp.array([[3.0, 0.0, 0.0, 0.0]])  # strong evidence for class 0
    ambiguous = jnp.array([[0.1, 0.1, 0.1, 0.1]])
    score = lambda z: scores.gradnorm(z, model.head.kernel.value, model.head.bias.value)
    assert score(confident)[0] > score(ambiguous)[0]


def test_gradnorm_bad_input(head):
    features, kernel, bias = head
    with pytest.raises(ValueError, match="head_kernel"):
        scores.gradnorm(features, kernel[:-1], bias)
    with pytest.raises(ValueError, match="head_bias"):
        scores.gradnorm(features, kernel, bias[:-1])
    with pytest.raises(ValueError, match="temperature"):
        scores.gradnorm(features, kernel, bias, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        scores.gradnorm(features, kernel, bias, chunk_size=0)
