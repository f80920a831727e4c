"""The pure train and eval steps, and their compilation over a device mesh.

``train_step(state, batch, aux_batch=None) -> (state, metrics)`` is a pure
function: no Python state, no host callbacks; randomness comes from
``fold_in(state.rng, state.step)``. :func:`compile_train_step` jits it once over a
``("data",)`` mesh: batch sharded, state replicated and donated. Because the
whole global batch is one array, BatchNorm statistics are over the global batch
(XLA inserts the cross-device reductions), so 1 device and N devices compute
the same function. With the data on the device (``compile_train_step(...,
device_data=...)``) the step takes each step's plan instead of its batch and makes
the batch itself, the host pipeline's batch bit for bit (:mod:`ood_jax.data.device`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from ood_jax import attacks, sharding
from ood_jax import rng as rng_lib
from ood_jax.data import device
from ood_jax.data.device import DeviceData
from ood_jax.train.objectives import Loss
from ood_jax.train.state import ModelDef, TrainState

Batch = dict[str, jax.Array]
StepFn = Callable[..., tuple[TrainState, dict[str, jax.Array]]]


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    # where, not multiply: a masked row's NaN (e.g. from its label -1) must not leak.
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def _state_after(model: nnx.Module) -> Any:
    return nnx.to_pure_dict(nnx.split(model, nnx.Param, nnx.RngState, ...)[3])


# Long (most of it docstring and the one pure step it returns): the step is kept whole so
# that what runs under jit reads top to bottom.
def make_train_step(
    model_def: ModelDef,
    tx: optax.GradientTransformation,
    loss_fn: Callable[..., Loss],
    *,
    learning_rate: optax.Schedule | None = None,
) -> StepFn:
    """Build the pure ``train_step(state, batch, aux_batch=None) -> (state, metrics)``.

    Args:
      model_def: the static half of the model (see ``ood_jax.train.state``).
      tx: optimizer.
      loss_fn: ``loss(apply, batch, aux, key) -> Loss`` from
        ``ood_jax.train.objectives.bind_objective``; it runs the model itself through
        ``apply`` (see that module for the contract).
      learning_rate: the schedule, only to report ``lr`` in the metrics.

    The step owns the BatchNorm statistics: it keeps those of the objective's last
    ``apply(..., update_stats=True)`` pass (unchanged if there was none);
    ``apply(..., train=False)`` runs in evaluation mode (running statistics, no
    dropout), as the ACET authors run their attack. Mixed
    precision is a model option (``create_model(..., dtype=jnp.bfloat16)``); ``apply``
    returns float32 logits and features whatever the compute dtype.

    ``batch`` holds ``image [B, H, W, C]`` float, ``label [B]`` int32 and ``mask [B]``
    bool; ``aux_batch`` (outliers) holds ``image [B_aux, H, W, C]``. Masked examples
    are left out of the loss and metrics (BatchNorm still sees them).

    Metrics (scalars): ``loss`` (masked mean), ``accuracy``, ``logit_norm`` (mean L2 norm of
    the logits, what LogitNorm controls), ``grad_norm``, ``lr`` (if ``learning_rate`` is
    given), ``finite`` (1.0 iff the loss and gradients are finite), plus the objective's
    own metrics.
    """

    def train_step(
        state: TrainState, batch: Batch, aux_batch: Batch | None = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        key = rng_lib.step_key(state.rng, state.step)
        objective_key = rng_lib.stream_key(key, "objective")
        mask = batch.get("mask", jnp.ones(batch["label"].shape, bool))
        # Padding rows carry label -1; any valid class keeps their (ignored) loss finite.
        labels = jnp.where(mask, batch["label"], 0)
        in_batch = {**batch, "label": labels, "mask": mask}

        def compute_loss(params):
            kept: list[Any] = []

            def apply(
                images: jax.Array,
                *,
                update_stats: bool = True,
                train: bool = True,
                frozen: bool = False,
            ):
                # frozen: parameters held constant, so no gradient flows back through
                # this pass (an attack's): JAX then need not linearize it at all.
                p = jax.lax.stop_gradient(params) if frozen else params
                model = model_def.merge(p, state.batch_stats, train=train, key=key)
                logits, features = model(images)
                if update_stats and train:
                    kept.append(_state_after(model))
                return logits.astype(jnp.float32), features.astype(jnp.float32)

            out = loss_fn(apply, in_batch, aux_batch, objective_key)
            stats = kept[-1] if kept else state.batch_stats
            new_stats = jax.tree.map(
                lambda new, old: new.astype(old.dtype), stats, state.batch_stats
            )
            return _masked_mean(out.per_example, mask), (out.logits, dict(out.metrics), new_stats)

        (loss, (logits, extra, new_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        metrics = {
            **{k: jnp.asarray(v, jnp.float32) for k, v in extra.items()},
            "loss": loss,
            "accuracy": _masked_mean(correct, mask),
            "logit_norm": _masked_mean(jnp.linalg.norm(logits, axis=-1), mask),
            "grad_norm": grad_norm,
            "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.float32),
        }
        if learning_rate is not None:
            metrics["lr"] = jnp.asarray(learning_rate(state.step), jnp.float32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=new_stats,
            opt_state=opt_state,
        )
        return new_state, metrics

    return train_step


def make_eval_step(model_def: ModelDef) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Build ``eval_step(state, batch) -> sums`` in evaluation mode (no state change).

    Returns sums over unmasked examples (so that padded batches aggregate exactly):
    ``count``, ``correct``, ``loss`` (cross-entropy) and ``logit_norm``.
    """
    from ood_jax import losses

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        model = model_def.merge(state.params, state.batch_stats, train=False, key=None)
        logits, _ = model(batch["image"])
        logits = logits.astype(jnp.float32)
        mask = batch["mask"].astype(jnp.float32)
        labels = jnp.where(batch["mask"], batch["label"], 0)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return {
            "count": jnp.sum(mask),
            "correct": jnp.sum(correct * mask),
            "loss": jnp.sum(jnp.where(mask > 0, losses.cross_entropy(logits, labels), 0.0)),
            "logit_norm": jnp.sum(jnp.linalg.norm(logits, axis=-1) * mask),
        }

    return eval_step


def compile_train_step(
    step: StepFn, mesh: Mesh, *, device_data: DeviceData | None = None
) -> StepFn:
    """``jax.jit`` the train step over ``mesh``: batch sharded on ``data``, state replicated
    and donated (updated in place), metrics replicated.

    The returned callable has the same signature as ``step``; its ``jitted`` attribute
    is the ``jax.jit`` object (``train_step.jitted.lower(state, batch, aux)``). Batches
    must be global arrays (see ``ood_jax.sharding.global_batch``).

    With ``device_data`` (the split placed on the mesh by
    :func:`ood_jax.data.device.place_split`, and the outliers' where the objective takes
    them) the step makes its batches itself: ``batch`` and ``aux_batch`` are then the
    steps' *plans* (:class:`ood_jax.data.PlanIterator`, ``{"index", "crop"}`` split over
    ``data``), gathered, cropped, flipped and normalized on the device into the very
    batches the host pipeline would have made
    (:func:`ood_jax.data.device.gather_batch`). The split is an argument of the jitted
    function (``jitted.lower(state, plan, aux_plan, device_data)``; never a constant
    of the program), passed by the returned callable, which keeps it as
    ``train_step.device_data``.
    """
    rep = sharding.replicated(mesh)
    data = sharding.batch_sharding(mesh)
    platform = mesh.devices.flat[0].platform

    @functools.wraps(step)
    def traced(state: TrainState, batch: Batch, aux_batch: Batch | None):
        # An attack inside the step (ACET) is a loop on TPU/GPU, unrolled on CPU: for
        # the mesh's devices, also when they are compile-only TPU devices on a CPU host.
        with attacks.tracing_for(platform):
            return step(state, batch, aux_batch)

    if device_data is not None:
        return _compile_on_device(traced, mesh, device_data)

    jitted = jax.jit(
        traced,
        in_shardings=(rep, data, data),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )

    def train_step(state: TrainState, batch: Batch, aux_batch: Batch | None = None):
        return jitted(state, batch, aux_batch)

    # The jit object itself, for ahead-of-time lowering (the compile-only TPU planner).
    train_step.jitted = jitted
    train_step.device_data = None
    return train_step


def _compile_on_device(traced: StepFn, mesh: Mesh, device_data: DeviceData) -> StepFn:
    """:func:`compile_train_step` with ``device_data``: ``traced(state, batch, aux)``
    behind the making of the batches from the plans, jitted with the splits as arguments."""
    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    @functools.wraps(traced)
    def traced_on_device(state, plan, aux_plan, splits: DeviceData):
        batch = device.gather_batch(splits.train, plan, mesh)
        aux = None if aux_plan is None else device.gather_batch(splits.aux, aux_plan, mesh)
        return traced(state, batch, aux)

    jitted = jax.jit(
        traced_on_device,
        in_shardings=(rep, data, data, data),
        out_shardings=(rep, rep),
        donate_argnums=0,
        # The outliers' labels are read by no objective: kept as an argument all the
        # same, so that the program's arguments are the splits' leaves, one for one.
        keep_unused=True,
    )

    def train_step(state: TrainState, batch: Batch, aux_batch: Batch | None = None):
        if aux_batch is not None and device_data.aux is None:
            raise ValueError(
                "an auxiliary plan was given but device_data has no aux split; place "
                "the outliers too (DeviceData(train=..., aux=place_split(outliers, mesh)))."
            )
        return jitted(state, batch, aux_batch, device_data)

    train_step.jitted = jitted
    train_step.device_data = device_data
    return train_step


def compile_eval_step(
    step: Callable[[TrainState, Batch], dict[str, jax.Array]], mesh: Mesh
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """``jax.jit`` the eval step over ``mesh`` (batch sharded, state replicated, not donated)."""
    rep = sharding.replicated(mesh)
    return jax.jit(step, in_shardings=(rep, sharding.batch_sharding(mesh)), out_shardings=rep)
