"""A run's optimizer and jitted steps, built from its resolved config.

The one assembly of the training runner (``experiments.train``) and of the
compile-only TPU planner (``experiments.plan.tpu``): the planner compiles exactly
the functions a run executes, so what it reports (memory, FLOPs, collectives,
sharding) is what the runner would run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
import optax
from jax.sharding import Mesh

from ood_jax.data.device import DeviceData
from ood_jax.train import (
    bind_objective,
    compile_eval_step,
    compile_train_step,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The run's learning-rate schedule and optimizer, and its length in steps."""

    schedule: optax.Schedule
    tx: optax.GradientTransformation
    num_steps: int
    steps_per_epoch: int


def num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """``config.train.num_steps``, else ``epochs * steps_per_epoch`` rounded."""
    return config.train.num_steps or int(round(config.train.epochs * steps_per_epoch))


def make_run_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Optimizer:
    """The schedule and optimizer of ``config.optim`` over the run's steps."""
    optim = config.optim
    num_steps = num_train_steps(config, steps_per_epoch)
    schedule = make_schedule(
        optim.schedule,
        base_lr=optim.lr,
        total_steps=num_steps,
        steps_per_epoch=steps_per_epoch,
        boundaries_epochs=tuple(optim.boundaries_epochs),
        decay_factor=optim.decay_factor,
        final_lr=optim.final_lr,
        warmup_steps=int(optim.warmup_epochs * steps_per_epoch),
        peak_fraction=optim.peak_fraction,
    )
    tx = make_optimizer(
        schedule,
        momentum=optim.momentum,
        nesterov=optim.nesterov,
        weight_decay=optim.weight_decay,
    )
    return Optimizer(schedule, tx, num_steps, steps_per_epoch)


def make_run_steps(
    config: ml_collections.ConfigDict,
    model_def: Any,
    optimizer: Optimizer,
    mesh: Mesh,
    *,
    device_data: DeviceData | None = None,
) -> tuple[Callable, Callable]:
    """``(train_step, eval_step)`` jitted over ``mesh``, with the objective of
    ``config.objective`` bound to its (resolved) hyperparameters.

    ``train_step.jitted`` and ``eval_step`` are ``jax.jit`` objects (``.lower``). With
    ``device_data`` (``config.data.on_device``: the split placed on the mesh, or its
    abstract shape for a plan) the train step takes the steps' plans and makes its
    batches on the device (:func:`ood_jax.train.compile_train_step`).
    """
    loss_fn = bind_objective(config.objective.name, **config.objective.hparams.to_dict())
    train_step = compile_train_step(
        make_train_step(model_def, optimizer.tx, loss_fn, learning_rate=optimizer.schedule),
        mesh,
        device_data=device_data,
    )
    return train_step, compile_eval_step(make_eval_step(model_def), mesh)
