"""Tests for ood_jax.losses against float64 NumPy references written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ood_jax import losses

K = 5


# ---------------------------------------------------------------- float64 NumPy references
def np_log_softmax(f):
    f = np.asarray(f, np.float64)
    shifted = f - f.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_softmax(f):
    return np.exp(np_log_softmax(f))


def np_cross_entropy(f, y):
    log_p = np_log_softmax(f)
    return -np.take_along_axis(log_p, np.asarray(y)[..., None], axis=-1)[..., 0]


def np_logitnorm(f, y, tau=0.04, eps=1e-7):
    f = np.asarray(f, np.float64)
    norm = np.sqrt((f * f).sum(axis=-1, keepdims=True))
    return np_cross_entropy(f / (tau * (norm + eps)), y)


def np_outlier_exposure(f):
    return -np_log_softmax(f).mean(axis=-1)


def np_max_confidence(f):
    return np.log(np_softmax(f).max(axis=-1))


def np_energy_margin(f_in, f_out, m_in=-23.0, m_out=-5.0, t=1.0):
    def energy(f):
        z = np.asarray(f, np.float64) / t
        top = z.max(axis=-1)
        return -t * (top + np.log(np.exp(z - top[..., None]).sum(axis=-1)))

    loss_in = np.mean(np.maximum(energy(f_in) - m_in, 0.0) ** 2)
    loss_out = np.mean(np.maximum(m_out - energy(f_out), 0.0) ** 2)
    return loss_in + loss_out


def np_l2_normalize(x, axis=-1, eps=1e-12):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.sqrt((x * x).sum(axis=axis, keepdims=True)), eps)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(7, K)).astype(np.float32)
    labels = rng.integers(0, K, size=7).astype(np.int32)
    return logits, labels


# Per-example losses with labels bound, so that one table drives the generic tests.
def _per_example(name):
    return {
        "cross_entropy": (lambda f, y: losses.cross_entropy(f, y), np_cross_entropy),
        "logitnorm": (lambda f, y: losses.logitnorm_loss(f, y), np_logitnorm),
        "logitnorm_tau1": (
            lambda f, y: losses.logitnorm_loss(f, y, temperature=1.0, eps=1e-3),
            lambda f, y: np_logitnorm(f, y, tau=1.0, eps=1e-3),
        ),
        "outlier_exposure": (
            lambda f, y: losses.outlier_exposure_loss(f),
            lambda f, y: np_outlier_exposure(f),
        ),
        "max_confidence": (
            lambda f, y: losses.max_confidence_loss(f),
            lambda f, y: np_max_confidence(f),
        ),
    }[name]


PER_EXAMPLE = ["cross_entropy", "logitnorm", "logitnorm_tau1", "outlier_exposure", "max_confidence"]


@pytest.mark.parametrize("name", PER_EXAMPLE)
def test_per_example_matches_numpy(name, batch):
    fn, ref = _per_example(name)
    logits, labels = batch
    out = jax.jit(fn)(logits, labels)
    assert out.shape == (7,) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref(logits, labels), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", PER_EXAMPLE)
def test_extra_batch_axes_and_vmap(name, batch):
    fn, ref = _per_example(name)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, K)).astype(np.float32)
    labels = rng.integers(0, K, size=(2, 3)).astype(np.int32)
    np.testing.assert_allclose(fn(logits, labels), ref(logits, labels), rtol=2e-5, atol=2e-5)
    # vmap over single examples must agree with the batched call.
    logits, labels = batch
    np.testing.assert_allclose(
        jax.vmap(fn)(logits, labels), fn(logits, labels), rtol=1e-6, atol=1e-6
    )


def test_known_values_at_uniform_output():
    log_k = np.log(K)
    labels = jnp.array([0, 2, 4])
    for logits in (jnp.zeros((3, K)), jnp.full((3, K), 7.5), jnp.full((3, K), -1e4)):
        np.testing.assert_allclose(losses.cross_entropy(logits, labels), log_k, rtol=1e-6)
        np.testing.assert_allclose(losses.logitnorm_loss(logits, labels), log_k, rtol=1e-6)
        np.testing.assert_allclose(losses.outlier_exposure_loss(logits), log_k, rtol=1e-6)
        np.testing.assert_allclose(losses.max_confidence_loss(logits), -log_k, rtol=1e-6)


def test_identities_on_random_logits(batch):
    logits, labels = batch
    log_k = np.log(K)
    oe = losses.outlier_exposure_loss(logits)
    mc = losses.max_confidence_loss(logits)
    assert np.all(oe >= log_k - 1e-6)  # uniform output is the minimum
    assert np.all(mc >= -log_k - 1e-6) and np.all(mc <= 0.0)
    # LogitNorm only sees the direction of f: rescaling by c > 0 changes it by O(eps).
    np.testing.assert_allclose(
        losses.logitnorm_loss(logits * 37.0, labels),
        losses.logitnorm_loss(logits, labels),
        rtol=1e-5,
    )
    # CE >= -max_confidence: the true class cannot beat the top class.
    assert np.all(losses.cross_entropy(logits, labels) >= -mc - 1e-6)


def test_out_of_range_labels_give_nan():
    logits = jnp.zeros((4, K))
    labels = jnp.array([-1, K, 0, 100])
    out = jax.jit(losses.cross_entropy)(logits, labels)
    assert np.isnan(out[0]) and np.isnan(out[1]) and np.isnan(out[3])
    np.testing.assert_allclose(out[2], np.log(K), rtol=1e-6)
    assert np.isnan(losses.logitnorm_loss(logits, labels)[0])


def test_energy_margin_matches_numpy_with_different_batch_sizes():
    rng = np.random.default_rng(2)
    f_in = rng.normal(scale=8.0, size=(6, K)).astype(np.float32) + 20.0
    f_out = rng.normal(scale=4.0, size=(11, K)).astype(np.float32)
    out = jax.jit(losses.energy_margin_loss)(f_in, f_out)
    assert out.shape == () and out.dtype == jnp.float32
    np.testing.assert_allclose(out, np_energy_margin(f_in, f_out), rtol=1e-5)
    kwargs = dict(m_in=-10.0, m_out=-2.0, temperature=2.5)
    np.testing.assert_allclose(
        losses.energy_margin_loss(f_in, f_out, **kwargs),
        np_energy_margin(f_in, f_out, -10.0, -2.0, 2.5),
        rtol=1e-5,
    )


def test_energy_margin_by_hand():
    # Zero logits: E = -log K = -1.609 with K = 5.
    zeros_in, zeros_out = jnp.zeros((2, K)), jnp.zeros((3, K))
    # E_in - m_in = -1.609 + 23 > 0; m_out - E_out = -5 + 1.609 < 0: only the ID term.
    expected = (np.log(K) * -1 + 23.0) ** 2
    loss = jax.jit(losses.energy_margin_loss)
    np.testing.assert_allclose(loss(zeros_in, zeros_out), expected, rtol=1e-6)
    # Energies inside both margins give exactly 0.
    confident = jnp.array([[40.0, 0, 0, 0, 0]])  # E ~ -40 < m_in
    assert loss(confident, zeros_out) == 0.0


def test_l2_normalize_matches_numpy_and_keeps_dtype():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6, 3)).astype(np.float32)
    for axis in (-1, 1, 0):
        np.testing.assert_allclose(
            losses.l2_normalize(x, axis=axis), np_l2_normalize(x, axis=axis), rtol=1e-6
        )
    tiny = np.full((1, 3), 1e-14, np.float32)
    np.testing.assert_allclose(losses.l2_normalize(tiny), tiny / 1e-12, rtol=1e-5)
    assert losses.l2_normalize(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16
    np.testing.assert_array_equal(losses.l2_normalize(jnp.zeros((2, 3))), 0.0)


# ---------------------------------------------------------------- gradients
def _scalar_losses(labels):
    return {
        "cross_entropy": lambda f: jnp.sum(
            losses.cross_entropy(f, labels) * jnp.arange(1.0, f.shape[0] + 1.0)
        ),
        "logitnorm": lambda f: jnp.sum(losses.logitnorm_loss(f, labels, temperature=0.5)),
        "outlier_exposure": lambda f: jnp.sum(losses.outlier_exposure_loss(f)),
        "max_confidence": lambda f: jnp.sum(losses.max_confidence_loss(f)),
        "energy_margin": lambda f: losses.energy_margin_loss(
            f, -f[:2], m_in=-1.0, m_out=1.0, temperature=0.7
        ),
        "l2_normalize": lambda f: jnp.sum(losses.l2_normalize(f) * jnp.arange(K)),
    }


@pytest.mark.parametrize(
    "name",
    [
        "cross_entropy",
        "logitnorm",
        "outlier_exposure",
        "max_confidence",
        "energy_margin",
        "l2_normalize",
    ],
)
def test_check_grads_float64(name):
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        logits = jnp.asarray(rng.normal(size=(3, K)), jnp.float64)
        fn = _scalar_losses(jnp.array([0, 3, 1]))[name]
        assert fn(logits).dtype == jnp.float64
        # jit: eager op-by-op evaluation makes check_grads' many calls several times slower.
        check_grads(jax.jit(fn), (logits,), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def test_gradients_match_closed_forms(batch):
    logits, labels = batch
    onehot = np.eye(K)[labels]
    p = np_softmax(logits)
    # d CE / d f = softmax(f) - onehot(y)
    g = jax.grad(lambda f: jnp.sum(losses.cross_entropy(f, labels)))(logits)
    np.testing.assert_allclose(g, p - onehot, atol=1e-6)
    # d OE / d f = softmax(f) - 1/K
    g = jax.grad(lambda f: jnp.sum(losses.outlier_exposure_loss(f)))(logits)
    np.testing.assert_allclose(g, p - 1.0 / K, atol=1e-6)
    # d log max softmax / d f = onehot(argmax) - softmax(f)
    g = jax.grad(lambda f: jnp.sum(losses.max_confidence_loss(f)))(logits)
    np.testing.assert_allclose(g, np.eye(K)[logits.argmax(-1)] - p, atol=1e-6)


def test_logitnorm_gradient_finite_difference(batch):
    logits, labels = batch
    logits64 = logits.astype(np.float64)
    grad = jax.grad(lambda f: jnp.sum(losses.logitnorm_loss(f, labels)))(logits)
    step = 1e-5
    numeric = np.zeros_like(logits64)
    for i in range(logits64.shape[0]):
        for j in range(K):
            up, down = logits64.copy(), logits64.copy()
            up[i, j] += step
            down[i, j] -= step
            numeric[i, j] = (np_logitnorm(up, labels).sum() - np_logitnorm(down, labels).sum()) / (
                2 * step
            )
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_gradient_at_zero_logits_is_finite_and_correct():
    tau, eps = 0.04, 1e-7
    labels = jnp.array([1, 4])
    g = jax.jit(jax.grad(lambda f: jnp.sum(losses.logitnorm_loss(f, labels))))(jnp.zeros((2, K)))
    # At f = 0 the norm's subgradient is 0, so d/df CE(f / (tau * eps)) = (1/K - onehot)/(tau eps).
    expected = (1.0 / K - np.eye(K)[np.array([1, 4])]) / (tau * eps)
    np.testing.assert_allclose(g, expected, rtol=1e-4)
    weights = jnp.arange(1.0, K + 1.0)
    g = jax.jit(jax.grad(lambda x: jnp.sum(losses.l2_normalize(x) * weights)))(jnp.zeros((K,)))
    np.testing.assert_allclose(g, weights / 1e-12, rtol=1e-6)


# ---------------------------------------------------------------- stability
STABILITY_CASES = {
    "huge": np.array([[1e4, -1e4, 0.0, 5e3, -3.0], [-1e4, -1e4, -1e4, -1e4, 1e4]]),
    "all_equal": np.full((2, K), 3.0),
    "all_zero": np.zeros((2, K)),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("case", sorted(STABILITY_CASES))
def test_finite_values_and_gradients(case, dtype):
    logits = jnp.asarray(STABILITY_CASES[case], dtype)
    fns = _scalar_losses(jnp.array([1, 4]))
    # One jit for all losses: a compile per loss would dominate this test's time.
    results = jax.jit(lambda f: {n: jax.value_and_grad(fn)(f) for n, fn in fns.items()})(logits)
    for name, (value, grad) in results.items():
        assert np.isfinite(value), (name, case, dtype)
        grad = np.asarray(grad, np.float32)
        if name in ("logitnorm", "l2_normalize") and case == "all_zero" and dtype == jnp.float16:
            # The exact gradients at 0 are ~1/(tau * eps) = 2.5e8 and 1/eps = 1e12, beyond
            # the float16 maximum 65504: the cast back to the input dtype overflows them
            # to a signed inf (never NaN). Checked in float32 by the test below.
            assert not np.any(np.isnan(grad)) and np.any(np.isinf(grad)), name
            continue
        assert np.all(np.isfinite(grad)), (name, case, dtype)
        if name != "l2_normalize":
            assert value.dtype == jnp.float32, name  # low precision is upcast


def test_huge_logits_match_float64_reference():
    logits = STABILITY_CASES["huge"].astype(np.float32)
    labels = np.array([1, 4])
    np.testing.assert_allclose(
        losses.cross_entropy(logits, labels), np_cross_entropy(logits, labels), rtol=1e-6
    )
    np.testing.assert_allclose(
        losses.logitnorm_loss(logits, labels), np_logitnorm(logits, labels), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        losses.outlier_exposure_loss(logits), np_outlier_exposure(logits), rtol=1e-6
    )
    np.testing.assert_allclose(
        losses.max_confidence_loss(logits), np_max_confidence(logits), atol=1e-6
    )


def test_low_precision_inputs_computed_in_float32(batch):
    logits, labels = batch
    half = jnp.asarray(logits, jnp.bfloat16)
    # Reference on the bfloat16-rounded logits: only the input is rounded, not the math.
    rounded = np.asarray(half, np.float64)
    np.testing.assert_allclose(
        losses.logitnorm_loss(half, labels), np_logitnorm(rounded, labels), rtol=1e-5
    )


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: losses.cross_entropy(jnp.zeros((3, K)), jnp.zeros((3,), jnp.float32)), "labels"),
        (lambda: losses.cross_entropy(jnp.zeros((3, K)), jnp.zeros((4,), jnp.int32)), "labels"),
        (lambda: losses.cross_entropy(jnp.zeros((3, K)), jnp.zeros((3, K), jnp.int32)), "labels"),
        (lambda: losses.cross_entropy(jnp.float32(1.0), jnp.int32(0)), "logits"),
        (lambda: losses.cross_entropy(jnp.zeros((3, K), jnp.int32), jnp.zeros(3, int)), "logits"),
        (lambda: losses.outlier_exposure_loss(jnp.zeros((3, 0))), "logits"),
        (
            lambda: losses.logitnorm_loss(jnp.zeros((3, K)), jnp.zeros(3, int), temperature=0.0),
            "temperature",
        ),  # noqa: E501
        (lambda: losses.logitnorm_loss(jnp.zeros((3, K)), jnp.zeros(3, int), eps=-1.0), "eps"),
        (lambda: losses.energy_margin_loss(jnp.zeros((0, K)), jnp.zeros((2, K))), "logits_in"),
        (lambda: losses.energy_margin_loss(jnp.zeros((2, K)), jnp.zeros((0, K))), "logits_out"),
        (lambda: losses.energy_margin_loss(jnp.zeros((2, K)), jnp.zeros((2, 3))), "classes"),
        (
            lambda: losses.energy_margin_loss(
                jnp.zeros((2, K)), jnp.zeros((2, K)), temperature=-1.0
            ),
            "temperature",
        ),  # noqa: E501
        (lambda: losses.l2_normalize(jnp.zeros((2, 3)), eps=0.0), "eps"),
        (lambda: losses.l2_normalize(jnp.float32(2.0)), "x"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_shape_checks_work_under_jit():
    with pytest.raises(ValueError, match="labels"):
        jax.jit(losses.cross_entropy)(jnp.zeros((3, K)), jnp.zeros((2,), jnp.int32))
