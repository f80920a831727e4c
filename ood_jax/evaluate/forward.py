"""One jitted, sharded forward pass per dataset, collecting logits and features.

Every post-hoc score except ODIN is a function of a model's logits and
penultimate features, so the evaluation runs the network once per dataset
(in-distribution test set, each OOD set, the training set when a fitted score
needs it), keeps the outputs as NumPy arrays, and computes all scores from
that cache. That pass never computes intermediates: scores of the feature map
(``"activations"``: ASH on the map, RankFeat) get one more pass,
:meth:`ForwardPass.map_captured`, only when one of them is chosen.

Batches follow the contract in ``docs/architecture.md``: dicts of NumPy arrays
``{"image": float32 [B, H, W, C] (normalized), "label": int32 [B],
"mask": bool [B]}`` where ``mask`` is False on padding rows. The batch axis is
sharded over the ``"data"`` axis of a mesh; parameters are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ood_jax import rng as rng_lib
from ood_jax import sharding


@dataclasses.dataclass(frozen=True)
class ModelOutputs:
    """Cached network outputs for one dataset (padding rows removed).

    Attributes:
      logits: float32 ``[N, K]``.
      features: float32 ``[N, D]``, the raw penultimate features ``z``.
      labels: int32 ``[N]``; -1 where the dataset has no labels.
    """

    logits: np.ndarray
    features: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        n = self.logits.shape[0]
        if self.features.shape[0] != n or self.labels.shape[0] != n:
            raise ValueError(
                "ModelOutputs: logits, features and labels must have the same length, got "
                f"{self.logits.shape[0]}, {self.features.shape[0]}, {self.labels.shape[0]}."
            )

    def __len__(self) -> int:
        return int(self.logits.shape[0])


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[0] == size:
        return x
    pad = np.zeros((size - x.shape[0], *x.shape[1:]), dtype=x.dtype)
    return np.concatenate([x, pad], axis=0)


def model_out(model: nnx.Module, images: jax.Array, capture: tuple[str, ...]) -> dict:
    """``{"logits", "features", *capture}`` of ``model(images, capture=capture)``."""
    if not capture:
        logits, features = model(images)
        return {"logits": logits, "features": features}
    logits, features, out = model(images, capture=capture)
    return {**out, "logits": logits, "features": features}


class Tail:
    """The network after an intermediate, for one batch of ``images``.

    ``tail(pre_pool)`` is ``model.logits_from_pre_pool``; ``tail.edited(index, edit)``
    the logits with block ``index``'s output replaced by ``edit`` of itself
    (``model.logits_with_block_edit``: the later blocks run again).
    """

    def __init__(self, model: nnx.Module, images: jax.Array) -> None:
        self.model = model
        self.images = images

    def __call__(self, pre_pool: jax.Array) -> jax.Array:
        return self.model.logits_from_pre_pool(pre_pool)

    def edited(self, index: int, edit: Callable[[jax.Array], jax.Array]) -> jax.Array:
        return self.model.logits_with_block_edit(self.images, index, edit)


class ForwardPass:
    """A model's jitted inference function, compiled once and reused per dataset.

    ``ForwardPass(model)(batches) -> ModelOutputs``. The model is switched to
    eval mode (BatchNorm running statistics, no dropout, no training-only
    feature normalization) and split into a static graph and a state pytree so
    that one ``jax.jit`` serves every dataset of the same batch shape.

    Args:
      model: an NNX module whose call returns ``(logits [B, K], features [B, D])``.
      mesh: the mesh to shard batches over its ``"data"`` axis; default: all
        local devices (single process: multi-host evaluation is not supported).
        A batch whose size does not divide by the number of devices is
        padded (and the padding dropped again).
    """

    def __init__(self, model: nnx.Module, *, mesh: jax.sharding.Mesh | None = None) -> None:
        if jax.process_count() > 1:
            # Batches are placed with device_put from one host; a multi-host mesh would
            # need per-process slices and an all-gather of the outputs (not built yet).
            raise ValueError(
                f"ForwardPass runs in a single process; this job has {jax.process_count()} "
                "processes. Evaluate from one host (e.g. restore the checkpoint on one VM)."
            )
        model.eval()
        # The model's own arrays; placed on the mesh when first run (``state``), so that
        # a compile-only mesh (no devices to place on) can still lower the functions.
        self.graphdef, self.host_state = nnx.split(model)
        self.mesh = sharding.make_mesh() if mesh is None else mesh
        if sharding.DATA_AXIS not in self.mesh.axis_names:
            raise ValueError(
                f"mesh: expected an axis named {sharding.DATA_AXIS!r}, got axes "
                f"{self.mesh.axis_names}; build it with ood_jax.sharding.make_mesh()."
            )
        self.num_shards = self.mesh.shape[sharding.DATA_AXIS]
        self._replicated = replicated = sharding.replicated(self.mesh)
        self._map_cache: dict = {}
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        graphdef = self.graphdef

        def apply(state, images):
            logits, features = nnx.merge(graphdef, state)(images)
            return logits.astype(jnp.float32), features.astype(jnp.float32)

        # ``jitted(state, images) -> (logits, features)``: the forward pass's jax.jit.
        self.jitted = jax.jit(
            apply,
            in_shardings=(replicated, self.batch_sharding),
            out_shardings=(self.batch_sharding, self.batch_sharding),
        )

    @functools.cached_property
    def state(self):
        """The model state replicated on the mesh (placed at the first call)."""
        # device_put (not sharding.replicate, which copies through NumPy): the state
        # holds typed PRNG keys (dropout streams), and evaluation never donates it.
        return jax.device_put(self.host_state, self._replicated)

    def map_batches(
        self,
        fn: Callable[[Callable[[jax.Array], jax.Array], jax.Array], jax.Array],
        batches: Iterable[Mapping[str, np.ndarray]],
        *,
        capture: tuple[str, ...] | None = None,
    ) -> np.ndarray:
        """Per-example values ``fn(apply_logits, images) -> [B]`` over a dataset.

        For scores that need the model itself (ODIN's input gradients):
        ``apply_logits`` is the eval-mode ``images -> logits`` function; with
        ``capture`` (a tuple, possibly empty) it is ``apply_out(images) -> out``, the
        dict of ``logits``, ``features`` and the intermediates named by ``capture``.
        ``fn`` is jitted once (cached by identity) with the model state as an argument,
        not a baked-in constant, and padding rows are dropped with the batch mask.
        """
        jitted = self.jitted_map(fn, capture=capture)
        run = self._run(lambda images: jitted(self.state, images), batches)
        return np.concatenate([out[mask] for out, mask, _ in run])

    def jitted_map(
        self,
        fn: Callable[[Callable[[jax.Array], jax.Array], jax.Array], jax.Array],
        *,
        capture: tuple[str, ...] | None = None,
    ) -> Callable:
        """The ``jax.jit`` of ``(state, images) -> [B]`` that :meth:`map_batches` runs."""
        jitted = self._map_cache.get(("map", fn, capture))
        if jitted is None:
            graphdef = self.graphdef

            def apply(state, images):
                def apply_model(x):
                    model = nnx.merge(graphdef, state)
                    return model(x)[0] if capture is None else model_out(model, x, capture)

                return fn(apply_model, images)

            jitted = jax.jit(
                apply,
                in_shardings=(self._replicated, self.batch_sharding),
                out_shardings=self.batch_sharding,
            )
            self._map_cache[("map", fn, capture)] = jitted
        return jitted

    def map_stochastic(
        self,
        fn: Callable[..., jax.Array],
        batches: Iterable[Mapping[str, np.ndarray]],
        *,
        seed: int,
    ) -> np.ndarray:
        """Per-example values ``fn(apply_dropout, images, key) -> [B]`` over a dataset.

        For Monte Carlo dropout: ``apply_dropout(images, key) -> logits`` is the model
        with its dropout layers active (BatchNorm still on running statistics), its RNG
        streams seeded from the raw key ``key``; batch ``i`` gets ``fold_in(root_key(seed),
        i)``. Raises a ValueError when the model has no dropout of rate > 0
        (:meth:`has_dropout`).
        """
        jitted = self._map_cache.get(("stochastic", fn))
        if jitted is None:
            graphdef = self._dropout_graphdef()

            def apply(state, images, key):
                def apply_dropout(x, k):
                    return nnx.merge(graphdef, rng_lib.reseeded(state, k))(x)[0]

                return fn(apply_dropout, images, key)

            jitted = jax.jit(
                apply,
                in_shardings=(self._replicated, self.batch_sharding, self._replicated),
                out_shardings=self.batch_sharding,
            )
            self._map_cache[("stochastic", fn)] = jitted
        root, index = rng_lib.root_key(seed), itertools.count()
        run = self._run(
            lambda images: jitted(self.state, images, rng_lib.step_key(root, next(index))), batches
        )
        return np.concatenate([out[mask] for out, mask, _ in run])

    def has_dropout(self) -> bool:
        """Whether the model has a dropout layer of rate > 0 (what MC dropout samples)."""
        model = nnx.merge(self.graphdef, self.host_state)
        return any(isinstance(m, nnx.Dropout) and m.rate > 0 for _, m in nnx.iter_modules(model))

    def _dropout_graphdef(self):
        """The graph of the eval-mode model with its dropout layers switched on."""
        if not self.has_dropout():
            raise ValueError(
                "MC dropout: the model has no dropout layer with rate > 0; build it with "
                "dropout (e.g. the WRN-40-2 preset, or model.options.dropout_rate=0.3 for "
                "wrn/tiny) or drop the score."
            )
        model = nnx.merge(self.graphdef, self.host_state)
        for _, module in nnx.iter_modules(model):
            if isinstance(module, nnx.Dropout):
                module.deterministic = False
        return nnx.split(model)[0]

    def map_captured(
        self,
        fn: Callable[[Mapping[str, jax.Array], Callable[[jax.Array], jax.Array]], Mapping],
        capture: tuple[str, ...],
        batches: Iterable[Mapping[str, np.ndarray]],
    ) -> dict[str, np.ndarray]:
        """``{key: [N]}`` of ``fn(out, to_logits) -> {key: [B]}`` over a dataset.

        For scores of the model's intermediates: ``out`` holds ``logits``,
        ``features`` and the intermediates named by ``capture`` (the model called with
        ``capture=``), ``to_logits`` a :class:`Tail` of the model. Only this pass
        computes intermediates; ``__call__`` never does. ``fn`` is jitted once per
        ``(fn, capture)``.
        """
        run = [values for values, _ in self.iter_captured(fn, capture, batches)]
        return {key: np.concatenate([values[key] for values in run]) for key in run[0]}

    def iter_captured(
        self,
        fn: Callable[[Mapping[str, jax.Array], Callable[[jax.Array], jax.Array]], Any],
        capture: tuple[str, ...],
        batches: Iterable[Mapping[str, np.ndarray]],
    ) -> Iterator[tuple[Any, np.ndarray]]:
        """:meth:`map_captured`'s pass one batch at a time: yields ``(fn's pytree of [B, ...]
        NumPy arrays, labels [B])`` of the real rows (a streaming fit's input)."""
        jitted = self._map_cache.get(("captured", fn, capture))
        if jitted is None:
            graphdef = self.graphdef

            def apply(state, images):
                model = nnx.merge(graphdef, state)
                return fn(model_out(model, images, capture), Tail(model, images))

            jitted = jax.jit(
                apply,
                in_shardings=(self._replicated, self.batch_sharding),
                out_shardings=self.batch_sharding,
            )
            self._map_cache[("captured", fn, capture)] = jitted
        for out, mask, labels in self._run(lambda images: jitted(self.state, images), batches):
            yield jax.tree.map(lambda x, mask=mask: x[mask], out), labels[mask]

    def bind(self, fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
        """``fn(apply_logits, images, *args)`` jitted with this model bound in.

        Returns ``call(images, *args)``: ``images`` sharded over the batch (its size a
        multiple of the device count), ``args`` replicated, the output sharded like
        ``images``. For model-dependent transforms of whole batches (an attack);
        ``call.jitted`` is the ``jax.jit`` of ``(state, images, *args)``.
        """
        graphdef = self.graphdef

        def apply(state, images, *args):
            return fn(lambda x: nnx.merge(graphdef, state)(x)[0], images, *args)

        jitted = jax.jit(apply, out_shardings=self.batch_sharding)

        def call(images, *args):
            images = jax.device_put(images, self.batch_sharding)
            args = jax.device_put(args, self._replicated)
            return jitted(self.state, images, *args)

        call.jitted = jitted
        return call

    def _run(self, apply, batches):
        """Yields ``(outputs, mask, labels)`` per batch, cut to the batch's own rows.

        A batch whose size does not divide by the number of devices is padded
        for the sharded call and cut back here; ``mask`` marks the real rows.
        """
        count = 0
        for batch in batches:
            images = np.asarray(batch["image"], dtype=np.float32)
            n = images.shape[0]
            mask = np.asarray(batch.get("mask", np.ones(n, bool)), dtype=bool)
            labels = np.asarray(batch.get("label", np.full(n, -1)), dtype=np.int32)
            padded = -(-n // self.num_shards) * self.num_shards
            images = jax.device_put(_pad_rows(images, padded), self.batch_sharding)
            out = apply(images)
            # One host copy per batch.
            yield jax.tree.map(lambda x, n=n: np.asarray(x)[:n], out), mask, labels
            count += 1
        if not count:
            raise ValueError(
                "batches: the dataset yielded no batches; check that the dataset is not empty."
            )

    def __call__(self, batches: Iterable[Mapping[str, np.ndarray]]) -> ModelOutputs:
        """Runs the model over ``batches``; returns the real (mask True) rows' outputs."""
        logits, features, labels = [], [], []
        run = self._run(lambda images: self.jitted(self.state, images), batches)
        for (batch_logits, batch_features), mask, batch_labels in run:
            logits.append(batch_logits[mask])
            features.append(batch_features[mask])
            labels.append(batch_labels[mask])
        return ModelOutputs(
            logits=np.concatenate(logits),
            features=np.concatenate(features),
            labels=np.concatenate(labels),
        )
