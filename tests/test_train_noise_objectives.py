"""CEDA and ACET objectives: the loss formula, the attack inside the step, the effect on noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy_models import FlatLinear, make_batch

from ood_jax import attacks
from ood_jax import data as D
from ood_jax.models import create_model
from ood_jax.train import bind_objective, create_train_state, make_optimizer, make_train_step

MEAN, STD = np.asarray(D.CIFAR10_MEAN), np.asarray(D.CIFAR10_STD)


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_ceda_loss_matches_the_authors_normalization():
    """(sum_in CE + w * sum_noise log max p) / (N_in + N_noise), noise recomputed here."""
    model = FlatLinear(12, 4, rngs=nnx.Rngs(0))
    w = np.asarray(model.head.kernel[...], np.float64)
    b = np.asarray(model.head.bias[...], np.float64)
    batch = make_batch(np.random.default_rng(0), 6)  # images [6, 2, 2, 3]
    apply = lambda x, **kw: (x.reshape(x.shape[0], -1) @ w + b, x)
    key = jax.random.key(5)
    for fraction, weight in ((1.0, 1.0), (0.5, 2.0)):
        loss_fn = bind_objective("ceda", noise_fraction=fraction, weight=weight)
        out = loss_fn(apply, jax.tree.map(jnp.asarray, batch), None, key)
        num = int(round(fraction * 6))
        x01 = np.clip(batch["image"] * STD + MEAN, 0, 1)
        noise = np.asarray(
            attacks.noise_batch(jnp.asarray(x01), jax.random.split(key)[0], num=num), np.float64
        )
        z_in = batch["image"].reshape(6, -1) @ w + b
        z_noise = ((noise - MEAN) / STD).reshape(num, -1) @ w + b
        ce = -_np_log_softmax(z_in)[np.arange(6), batch["label"]]
        out_term = _np_log_softmax(z_noise).max(-1)
        expected = (ce.sum() + weight * out_term.sum()) / (6 + num)
        np.testing.assert_allclose(float(jnp.mean(out.per_example)), expected, rtol=1e-5)
        np.testing.assert_allclose(float(out.metrics["noise_term"]), out_term.mean(), rtol=1e-5)


def _tiny_setup(seed=0):
    model = create_model("tiny", num_classes=10, rngs=nnx.Rngs(seed), width=8, dropout_rate=0.0)
    tx = make_optimizer(0.05, momentum=0.9, weight_decay=5e-4)
    return (*create_train_state(model, tx, seed=seed), tx)


def _colored_batches(steps, n=32, seed=0):
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, size=(10, 3))
    for _ in range(steps):
        labels = rng.integers(0, 10, n).astype(np.int32)
        pixels = np.clip(
            palette[labels][:, None, None, :] + rng.normal(0, 20, (n, 32, 32, 3)), 0, 255
        )
        yield {
            "image": D.normalize(pixels.astype(np.uint8)),
            "label": labels,
            "mask": np.ones(n, bool),
        }


def _train(objective, steps, **hparams):
    model_def, state, tx = _tiny_setup()
    step = jax.jit(make_train_step(model_def, tx, bind_objective(objective, **hparams)))
    metrics = None
    for batch in _colored_batches(steps):
        state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    return model_def, state, metrics


def _mmc_on_uniform_noise(model_def, state, n=256):
    model = model_def.merge(state.params, state.batch_stats, train=False, key=None)
    u = np.random.default_rng(9).uniform(0, 1, (n, 32, 32, 3))
    logits = np.asarray(model(jnp.asarray((u - MEAN) / STD, jnp.float32))[0], np.float64)
    return float(np.exp(_np_log_softmax(logits)).max(-1).mean())


@pytest.mark.slow
def test_ceda_lowers_confidence_on_uniform_noise_against_ce():
    ce = _mmc_on_uniform_noise(*_train("ce", 60)[:2])
    ceda = _mmc_on_uniform_noise(*_train("ceda", 60)[:2])
    # 10 classes: uniform output has MMC 0.1.
    assert ceda < 0.25 and ceda < ce - 0.2, (ce, ceda)


def test_acet_attack_raises_the_noise_confidence_the_step_trains_against():
    model_def, state, _ = _train("ce", 15)  # a model with some confidence to attack
    tx = make_optimizer(0.05)
    batch = jax.tree.map(jnp.asarray, next(_colored_batches(1, seed=3)))
    got = {}
    for name, extra in (("ceda", {}), ("acet", {"attack_steps": 5})):
        step = jax.jit(make_train_step(model_def, tx, bind_objective(name, **extra)))
        fresh = state.replace(opt_state=tx.init(state.params))
        _, metrics = step(fresh, batch)
        got[name] = float(metrics["noise_mmc"])
    assert got["acet"] > got["ceda"] + 0.01, got
