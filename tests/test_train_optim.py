"""Optimizer and schedules vs hand-written float64 references (PyTorch SGD semantics)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ood_jax.train import make_optimizer, make_schedule


def torch_sgd_reference(params, grads_seq, lrs, *, momentum, weight_decay, nesterov):
    """torch.optim.SGD's update rule written out in float64 NumPy (dampening 0)."""
    p = np.asarray(params, np.float64).copy()
    buf = None
    for grad, lr in zip(grads_seq, lrs, strict=True):
        g = np.asarray(grad, np.float64) + weight_decay * p
        buf = g.copy() if buf is None else momentum * buf + g
        update = g + momentum * buf if nesterov else buf
        p = p - lr * update
    return p


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_matches_pytorch_rule_with_step_schedule(nesterov):
    rng = np.random.default_rng(0)
    params = rng.normal(size=(5,)).astype(np.float32)
    grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(7)]
    # 2 steps per epoch, decay x0.1 after epoch 2 -> lr 0.1 for steps 0-3, 0.01 after.
    schedule = make_schedule(
        "step", base_lr=0.1, total_steps=7, steps_per_epoch=2, boundaries_epochs=(2,)
    )
    tx = make_optimizer(schedule, momentum=0.9, nesterov=nesterov, weight_decay=5e-4)
    state = tx.init(jnp.asarray(params))
    p = jnp.asarray(params)
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, updates)
    lrs = [0.1] * 4 + [0.01] * 3
    expected = torch_sgd_reference(
        params, grads, lrs, momentum=0.9, weight_decay=5e-4, nesterov=nesterov
    )
    np.testing.assert_allclose(np.asarray(p), expected, rtol=1e-5, atol=1e-6)


def test_weight_decay_applies_to_every_parameter():
    # PyTorch's SGD in the papers' repositories decays BatchNorm scales and biases too.
    tx = make_optimizer(1.0, momentum=0.0, weight_decay=0.5)
    params = {"bn": {"scale": jnp.ones(2)}, "bias": jnp.full(3, 2.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["bn"]["scale"], -0.5 * np.ones(2))
    np.testing.assert_allclose(updates["bias"], -1.0 * np.ones(3))


def test_step_schedule_paper_boundaries():
    s = make_schedule(
        "step", base_lr=0.1, total_steps=200 * 391, steps_per_epoch=391, boundaries_epochs=(80, 140)
    )
    for epoch, lr in [(0, 0.1), (79, 0.1), (80, 0.01), (139, 0.01), (140, 0.001), (199, 0.001)]:
        np.testing.assert_allclose(float(s(epoch * 391)), lr, rtol=1e-6)
        np.testing.assert_allclose(float(s(epoch * 391 + 390)), lr, rtol=1e-6)


def test_cosine_schedule_closed_form():
    # Energy fine-tuning: lr 1e-3 -> 1e-6 over T steps, 0.5 * (1 + cos(pi t / T)).
    total = 100
    s = make_schedule("cosine", base_lr=1e-3, total_steps=total, steps_per_epoch=10, final_lr=1e-6)
    for t in [0, 1, 25, 50, 99, 100]:
        expected = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * t / total))
        np.testing.assert_allclose(float(s(t)), expected, rtol=1e-5, atol=1e-10)


def test_cosine_warmup_and_onecycle_shapes():
    s = make_schedule("cosine", base_lr=0.4, total_steps=110, steps_per_epoch=10, warmup_steps=10)
    np.testing.assert_allclose([float(s(t)) for t in (0, 5, 10)], [0.0, 0.2, 0.4], atol=1e-7)
    o = make_schedule(
        "onecycle", base_lr=0.5, total_steps=100, steps_per_epoch=10, peak_fraction=0.2
    )
    np.testing.assert_allclose(float(o(0)), 0.5 / 25, rtol=1e-6)
    np.testing.assert_allclose(float(o(20)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(o(60)), 0.25, rtol=1e-5)
    np.testing.assert_allclose(float(o(100)), 0.0, atol=1e-7)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_schedule("linear", base_lr=0.1, total_steps=10, steps_per_epoch=1)
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule("step", base_lr=0.1, total_steps=0, steps_per_epoch=1)
    with pytest.raises(ValueError, match="momentum"):
        make_optimizer(0.1, momentum=1.5)
    with pytest.raises(ValueError, match="weight_decay"):
        make_optimizer(0.1, weight_decay=-1.0)
