"""ood_jax.attacks: noise generators and the confidence PGD, against NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ood_jax import attacks

K, H, W, C = 4, 6, 5, 3
D = H * W * C


def _linear(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.5, (D, K)), rng.normal(0, 0.1, K)


def _images(n, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, H, W, C))


def _np_log_conf_and_grad(x, w, b):
    """log max softmax of a linear model and its gradient, by hand (float64)."""
    z = x.reshape(-1) @ w + b
    p = np.exp(z - z.max())
    p /= p.sum()
    k = int(np.argmax(z))
    return np.log(p[k]), w[:, k] - w @ p


def _np_pgd(x0, w, b, eps, steps, alpha):
    """The documented algorithm, one example at a time (no random start)."""
    out = []
    for img in x0:
        x, best, best_conf = img.copy(), img.copy(), -np.inf
        confs = []
        for _ in range(steps):
            conf, g = _np_log_conf_and_grad(x, w, b)
            confs.append(conf)
            if conf > best_conf:
                best, best_conf = x.copy(), conf
            x = np.clip(
                np.clip(x + alpha * np.sign(g.reshape(x.shape)), img - eps, img + eps), 0, 1
            )
        conf, _ = _np_log_conf_and_grad(x, w, b)
        confs.append(conf)
        if conf > best_conf:
            best = x.copy()
        out.append((best, confs))
    return out


def test_pgd_matches_a_per_example_numpy_loop_step_by_step():
    w, b = _linear()
    x0 = _images(3)
    with jax.enable_x64(True):
        apply = lambda x: x.reshape(x.shape[0], -1) @ jnp.asarray(w) + jnp.asarray(b)
        for steps in (1, 2, 5):
            got = attacks.pgd_confidence(
                apply,
                jnp.asarray(x0),
                jax.random.key(0),
                eps=0.2,
                steps=steps,
                random_start=False,
            )
            ref = _np_pgd(x0, w, b, 0.2, steps, 0.2 / steps)
            np.testing.assert_allclose(np.asarray(got), np.stack([r[0] for r in ref]), atol=1e-12)
    # Confidence rises step after step here (a linear model, sign steps inside the box).
    confs = np.asarray(_np_pgd(x0, w, b, 0.2, 5, 0.04)[0][1])
    assert np.all(np.diff(confs) >= -1e-12) and confs[-1] > confs[0]


def test_pgd_stays_in_the_ball_and_image_range_and_raises_confidence():
    w, b = _linear(2)
    x0 = jnp.asarray(_images(16, seed=3), jnp.float32)
    apply = lambda x: x.reshape(x.shape[0], -1) @ jnp.asarray(w, jnp.float32) + b
    attacked = attacks.pgd_confidence(apply, x0, jax.random.key(1), eps=0.1, steps=7)
    delta = np.asarray(attacked) - np.asarray(x0)
    assert np.abs(delta).max() <= 0.1 + 1e-6
    assert np.asarray(attacked).min() >= 0.0 and np.asarray(attacked).max() <= 1.0
    before = np.asarray(attacks.log_confidence(apply(x0)))
    after = np.asarray(attacks.log_confidence(apply(attacked)))
    assert np.all(after >= before - 1e-6) and np.mean(after - before) > 0.01
    again = attacks.pgd_confidence(apply, x0, jax.random.key(1), eps=0.1, steps=7)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(attacked))  # same key
    other = attacks.pgd_confidence(apply, x0, jax.random.key(2), eps=0.1, steps=7)
    assert not np.array_equal(np.asarray(other), np.asarray(attacked))  # random start


def test_pgd_jits_and_zero_steps_returns_the_start():
    w, b = _linear()
    x0 = jnp.asarray(_images(2), jnp.float32)
    apply = lambda x: x.reshape(x.shape[0], -1) @ jnp.asarray(w, jnp.float32) + b
    run = jax.jit(lambda x, k: attacks.pgd_confidence(apply, x, k, steps=0, random_start=False))
    np.testing.assert_array_equal(np.asarray(run(x0, jax.random.key(0))), np.asarray(x0))


def test_the_attack_is_a_loop_when_traced_for_an_accelerator_and_unrolled_for_cpu():
    # What matters for a TPU program compiled on a CPU host: the step's mesh decides
    # (attacks.tracing_for), not this process's default backend.
    w, b = _linear()
    x0 = jnp.asarray(_images(2), jnp.float32)
    apply = lambda x: x.reshape(x.shape[0], -1) @ jnp.asarray(w, jnp.float32) + b

    def loops(**kwargs):
        attack = lambda x, k: attacks.pgd_confidence(apply, x, k, steps=5, **kwargs)
        jaxpr = str(jax.make_jaxpr(attack)(x0, jax.random.key(0)))
        return jaxpr.count("while[") + jaxpr.count("scan[")  # fori_loop is either

    assert jax.default_backend() == "cpu" and loops() == 0
    with attacks.tracing_for("tpu"):
        assert loops() == 1
        assert loops(unroll=True) == 0  # an explicit choice wins
    with attacks.tracing_for("cpu"):
        assert loops() == 0
    assert loops() == 0  # the context is left as it was


def test_permutation_keeps_each_images_pixel_multiset():
    x = jnp.asarray(_images(5, seed=4), jnp.float32)
    p = np.asarray(attacks.permute_pixels(x, jax.random.key(0)))
    for a, b in zip(np.asarray(x), p, strict=True):
        rows = lambda img: img.reshape(-1, C)[np.lexsort(img.reshape(-1, C).T[::-1])]
        np.testing.assert_array_equal(rows(a), rows(b))  # RGB triplets move together
        assert not np.array_equal(a, b)


def _np_lowpass(x, sigma):
    r = attacks.LOWPASS_RADIUS
    t = np.arange(-r, r + 1)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    k = np.outer(g, g) / np.outer(g, g).sum()
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        padded = np.pad(x[n], ((r, r), (r, r), (0, 0)), mode="symmetric")
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                out[n, i, j] = np.einsum(
                    "ab,abc->c", k, padded[i : i + 2 * r + 1, j : j + 2 * r + 1]
                )
        out[n] = (out[n] - out[n].min()) / (out[n].max() - out[n].min())
    return out


@pytest.mark.parametrize("platform", ["cpu", "tpu", "gpu"])
def test_lowpass_matches_a_direct_convolution(platform):
    # The matrix form (CPU, TPU) and the GPU's depthwise convolutions, both run here.
    x = _images(2, seed=5).astype(np.float32)
    # A function of its own per platform: JAX caches traces by function, not by context.
    blur = lambda images, sigma: attacks.gaussian_lowpass(images, sigma)
    with attacks.tracing_for(platform):
        got = np.asarray(jax.jit(blur)(jnp.asarray(x), jnp.float32(1.7)))
    np.testing.assert_allclose(got, _np_lowpass(x.astype(np.float64), 1.7), atol=2e-5)
    assert got.min() == 0.0 and abs(got.max() - 1.0) < 1e-6


def test_lowpass_for_gpu_is_convolutions_and_for_cpu_and_tpu_the_matrix_products():
    x = jnp.zeros((2, H, W, C), jnp.float32)
    ops = {}
    for platform in ("cpu", "tpu", "gpu"):
        blur = lambda images, sigma: attacks.gaussian_lowpass(images, sigma)
        with attacks.tracing_for(platform):
            jaxpr = str(jax.make_jaxpr(blur)(x, jnp.float32(2.0)))
        ops[platform] = ("conv_general_dilated" in jaxpr, "dot_general" in jaxpr)
    assert ops == {"cpu": (False, True), "tpu": (False, True), "gpu": (True, False)}


def test_noise_batch_mixes_the_requested_fractions():
    x = jnp.asarray(_images(4, seed=6), jnp.float32)
    noise = np.asarray(
        attacks.noise_batch(x, jax.random.key(3), num=8, frac_perm=0.25, lowpass=False)
    )
    assert noise.shape == (8, H, W, C)
    sort = lambda img: np.sort(img.reshape(-1))
    source = np.asarray(x)
    # The first round(8 * 0.25) = 2 are permutations of batch images 0 and 1 ...
    for i in range(2):
        np.testing.assert_array_equal(sort(noise[i]), sort(source[i % 4]))
    # ... the other 6 are uniform noise, not permutations of any batch image.
    for i in range(2, 8):
        assert not any(np.array_equal(sort(noise[i]), sort(s)) for s in source)
        assert noise[i].min() >= 0.0 and noise[i].max() < 1.0
    filtered = np.asarray(attacks.noise_batch(x, jax.random.key(3), num=8, frac_perm=0.25))
    assert np.allclose(filtered.min(axis=(1, 2, 3)), 0) and np.allclose(
        filtered.max(axis=(1, 2, 3)), 1
    )
    with pytest.raises(ValueError, match="frac_perm"):
        attacks.noise_batch(x, jax.random.key(0), frac_perm=1.5)
