"""Optimizer and learning-rate schedules, matching the papers' PyTorch training.

The LogitNorm, energy and L2-normalization repositories all train with
``torch.optim.SGD(params, lr, momentum=0.9, nesterov=True, weight_decay=wd)``
over *all* parameters (BatchNorm scales and biases included). PyTorch adds the
decay to the gradient before the momentum buffer, so per step t:

    g_t   = grad_t + wd * p_t
    b_t   = momentum * b_{t-1} + g_t          (b_0 = 0, no dampening)
    u_t   = g_t + momentum * b_t              (Nesterov)
    p_t+1 = p_t - lr_t * u_t

which is ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum,
nesterov=True))`` (decoupled AdamW-style decay would be a different method).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "step", "cosine", "onecycle")


def make_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
) -> optax.GradientTransformation:
    """PyTorch-style SGD: L2 decay added to the gradient, then (Nesterov) momentum.

    Args:
      learning_rate: a float or an optax schedule ``step -> lr``.
      momentum: momentum coefficient (0.9 in all the papers).
      nesterov: Nesterov momentum (the LogitNorm and energy repositories use it).
      weight_decay: L2 coefficient applied to every parameter (5e-4 in the papers).
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
    if not weight_decay >= 0.0 or not math.isfinite(weight_decay):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov and momentum > 0),
    )


def make_schedule(
    name: str,
    *,
    base_lr: float,
    total_steps: int,
    steps_per_epoch: int,
    boundaries_epochs: Sequence[float] = (),
    decay_factor: float = 0.1,
    final_lr: float = 0.0,
    warmup_steps: int = 0,
    peak_fraction: float = 0.3,
) -> optax.Schedule:
    """Learning-rate schedule by name, evaluated per optimizer step.

    - ``constant``: ``base_lr``.
    - ``step``: ``base_lr * decay_factor**k`` after the k-th of ``boundaries_epochs``
      (LogitNorm: 0.1 at epochs 80, 140; L2-norm paper: 40, 50). The boundaries are
      converted to steps with ``steps_per_epoch`` so the rate changes exactly where a
      per-epoch PyTorch scheduler would change it.
    - ``cosine``: optional linear warmup over ``warmup_steps`` from 0, then
      ``final_lr + (base_lr - final_lr) * (1 + cos(pi * t / T)) / 2`` per step
      (the energy fine-tuning schedule, 1e-3 down to 1e-6).
    - ``onecycle``: linear ramp from ``base_lr / 25`` up to ``base_lr`` over the first
      ``peak_fraction`` of training, then linear down to ``final_lr`` (fast short runs).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    if not base_lr > 0 or not math.isfinite(base_lr):  # NaN fails every comparison
        raise ValueError(f"base_lr must be positive, got {base_lr}.")
    if name == "constant":
        return optax.constant_schedule(base_lr)
    if name == "step":
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
        boundaries = {int(round(e * steps_per_epoch)): decay_factor for e in boundaries_epochs}
        return optax.piecewise_constant_schedule(base_lr, boundaries)
    if name == "cosine":
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}."
            )
        decay_steps = total_steps - warmup_steps

        def cosine(step):
            t = jnp.clip(step - warmup_steps, 0, decay_steps) / decay_steps
            lr = final_lr + (base_lr - final_lr) * 0.5 * (1.0 + jnp.cos(math.pi * t))
            if warmup_steps:
                lr = jnp.where(step < warmup_steps, base_lr * step / warmup_steps, lr)
            return lr

        return cosine
    if name == "onecycle":
        if not 0.0 < peak_fraction < 1.0:
            raise ValueError(f"peak_fraction must be in (0, 1), got {peak_fraction}.")
        peak = max(1, int(peak_fraction * total_steps))
        return optax.join_schedules(
            [
                optax.linear_schedule(base_lr / 25.0, base_lr, peak),
                optax.linear_schedule(base_lr, final_lr, total_steps - peak),
            ],
            [peak],
        )
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}.")
