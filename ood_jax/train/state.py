"""Train state: a pytree of arrays, with the model's static structure kept outside.

A Flax NNX model is split into its graph definition (static Python structure)
and three kinds of state:

- ``params``: ``nnx.Param`` variables, trained by the optimizer;
- ``batch_stats``: every other non-RNG variable (BatchNorm running statistics,
  spectral-norm power-iteration vectors, ...), updated by the forward pass;
- RNG streams (dropout keys): *not* saved. They are re-seeded every step from
  ``TrainState.rng`` by the convention in :mod:`ood_jax.rng`, so a resumed run
  draws exactly the same random numbers without storing key counters.

The training-mode and evaluation-mode graph definitions differ only in static
flags (``model.train()`` / ``model.eval()``); both are kept in :class:`ModelDef`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ood_jax import rng as rng_lib


@struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree that orbax saves as is.

    Attributes:
      step: int32 scalar, the number of optimizer steps taken.
      params: the model's ``nnx.Param`` state.
      batch_stats: the model's other non-RNG state (BatchNorm statistics, ...).
      opt_state: the optax state.
      rng: raw ``uint32[2]`` root key; step t uses ``fold_in(rng, t)``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


@dataclass(frozen=True)
class ModelDef:
    """The static half of a split model: graph definitions and RNG stream layout.

    Attributes:
      train_graph: graph definition in training mode (``model.train()``).
      eval_graph: graph definition in evaluation mode (``model.eval()``).
      rng_state: template of the model's RNG variables (re-seeded every call).
      rng_streams: names of the model's RNG streams (e.g. ``("dropout",)``).
    """

    train_graph: Any
    eval_graph: Any
    rng_state: Any
    rng_streams: tuple[str, ...]

    def merge(self, params: Any, batch_stats: Any, *, train: bool, key: jax.Array | None):
        """Rebuild the model from state; re-seed its RNG streams from ``key``.

        ``key`` is a raw ``uint32[2]`` key (e.g. a step key); with ``key=None`` the
        streams keep their template keys (fine in eval mode, where nothing is drawn).
        """
        graph = self.train_graph if train else self.eval_graph
        return nnx.merge(graph, params, self._fresh_rng_state(key), batch_stats)

    def _fresh_rng_state(self, key: jax.Array | None) -> Any:
        return rng_lib.reseeded(self.rng_state, key)


def split_model(model: nnx.Module) -> tuple[ModelDef, Any, Any]:
    """Split ``model`` into ``(ModelDef, params, batch_stats)``.

    Leaves the model in evaluation mode.
    """
    model.train()
    train_graph, params, rng_state, batch_stats = nnx.split(model, nnx.Param, nnx.RngState, ...)
    model.eval()
    eval_graph = nnx.split(model, nnx.Param, nnx.RngState, ...)[0]
    streams = sorted(
        {
            getattr(v, "tag", None)
            for v in jax.tree.leaves(rng_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        }
        - {None}
    )
    model_def = ModelDef(train_graph, eval_graph, rng_state, tuple(streams))
    return model_def, _to_pure(params), _to_pure(batch_stats)


def _to_pure(state: Any) -> Any:
    """nnx.State -> plain nested dicts of arrays (what orbax and optax see)."""
    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, *, seed: int
) -> tuple[ModelDef, TrainState]:
    """Split an initialized model and build step-0 :class:`TrainState` (host arrays).

    Args:
      model: an initialized Flax NNX model returning ``(logits, features)``.
      tx: the optax optimizer.
      seed: root seed of the per-step keys (dropout and other in-step randomness).
    """
    model_def, params, batch_stats = split_model(model)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=rng_lib.root_key(seed),
    )
    return model_def, state


def count_params(state: TrainState) -> int:
    """Number of trainable scalars in ``state.params``."""
    return sum(int(x.size) for x in jax.tree.leaves(state.params))
