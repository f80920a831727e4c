"""Any JAX classifier as the evaluation's model: the contract and its adapters.

The evaluation runs a model that meets one contract:

- it is an ``nnx.Module`` (so that it splits into a graph and a state, and ``eval()``
  switches BatchNorm and dropout to inference);
- ``model(images) -> (logits [B, K], features [B, D])``, ``features`` the penultimate
  features (``D`` may be 0: a model of the logits alone);
- ``model.head`` the final linear layer (``kernel [D, K]``, ``bias [K]`` or None), or
  None when the detectors cannot have it.

ood_jax's own models (:class:`ood_jax.models.Classifier`) meet it and serve every
detector; they also give the intermediates (``model(x, capture=...)``) that the
feature-map detectors read. :func:`as_classifier` builds it for any other model,
without a wrapper class of the user's:

- a Flax NNX module whose call returns the logits, or ``(logits, features)``;
- a Flax linen module with its variables (``as_classifier(module, variables)``);
- any function ``images -> logits`` or ``images -> (logits, features)``, or
  ``fn(params, images)`` with ``as_classifier(fn, params)``.

``head=`` names the final linear layer where the features come from: for an NNX
module the attribute path of an ``nnx.Linear`` (``"head"``, ``"classifier"``,
``"layers.3"``), for a linen module the name (or ``/``-separated path) of its
``nn.Dense`` (``"Dense_0"``, ``"fc"``). The features are then that layer's input,
captured as the model runs (NNX: the layer is wrapped in a copy of the model;
linen: :func:`flax.linen.intercept_methods`); the model is not edited. ``head=``
may also be the weights themselves, ``(kernel [D, K], bias [K] or None)``, for a
model that returns its features.

:func:`capabilities` says which of :data:`~ood_jax.scores.registry.MODEL_NEEDS` a
model serves, checked on the shapes of a first batch, with one message naming what
is missing and how to provide it; the evaluation skips each detector whose
``needs`` it cannot serve (:func:`servable_scores`).

What the model receives is set by the evaluation's ``mean`` and ``std``
(``EvalSpec``): ``(pixels / 255 - mean) / std``, float32 NHWC.
:func:`~ood_jax.evaluate.evaluate_model` gives a user's model the pixels as the
dataset stores them, 0 to 255 (``mean = 0``, ``std = 1 / 255``), as float32 so that
the detectors that differentiate through the input (ODIN, the adversarial noise) can.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from ood_jax.models.classifier import Classifier
from ood_jax.scores.registry import MODEL_NEEDS, get_score

# The features captured in the current call of an adapted model (its head's input).
_CAPTURED: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "ood_jax_captured_features", default=None
)

HeadLike = str | tuple | Sequence | None


class LinearHead(nnx.Module):
    """A final linear layer given by its weights: ``x @ kernel + bias``."""

    def __init__(self, kernel: Any, bias: Any | None) -> None:
        kernel = np.asarray(kernel, np.float32)
        if kernel.ndim != 2:
            raise ValueError(
                f"head: the kernel must be [D, K] (features x classes), got shape "
                f"{kernel.shape}; a PyTorch nn.Linear weight is [K, D]: pass weight.T."
            )
        self.kernel = nnx.Param(jnp.asarray(kernel))
        if bias is None:
            self.bias = None
        else:
            bias = np.asarray(bias, np.float32)
            if bias.shape != (kernel.shape[1],):
                raise ValueError(
                    f"head: the bias must be [K] = [{kernel.shape[1]}] for a kernel of shape "
                    f"{kernel.shape}, got shape {bias.shape}."
                )
            self.bias = nnx.Param(jnp.asarray(bias))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]


class _Tap(nnx.Module):
    """A layer that records its input in the running adapted call, then runs the layer."""

    def __init__(self, layer: nnx.Module) -> None:
        self.layer = layer

    def __call__(self, x, *args, **kwargs):
        captured = _CAPTURED.get()
        if captured is not None:
            captured["features"] = x
        return self.layer(x, *args, **kwargs)


def _split_output(out: Any, kind: str) -> tuple[jax.Array, jax.Array | None]:
    """``(logits, features or None)`` of a model's output."""
    if isinstance(out, tuple | list):
        if len(out) < 1 or not hasattr(out[0], "shape"):
            raise ValueError(
                f"{kind}: the model returned a {type(out).__name__} whose first item is not "
                "an array; it must return the logits, or (logits, features)."
            )
        return out[0], (out[1] if len(out) > 1 and hasattr(out[1], "shape") else None)
    if not hasattr(out, "shape"):
        raise ValueError(
            f"{kind}: the model returned {type(out).__name__}; it must return the logits "
            "[batch, classes], or (logits, features)."
        )
    return out, None


class _Adapted(nnx.Module):
    """The contract's call around ``_outputs(images) -> (logits, features or None)``."""

    head: nnx.Module | None
    label: str  # what the report calls the model
    description: str  # the label and how it was adapted

    def _outputs(self, images):  # pragma: no cover - every adapter defines it
        raise NotImplementedError

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        token = _CAPTURED.set({})
        try:
            logits, features = self._outputs(images)
            captured = _CAPTURED.get().get("features")
        finally:
            _CAPTURED.reset(token)
        if captured is not None:
            features = captured
        if features is None:
            features = jnp.zeros((logits.shape[0], 0), logits.dtype)
        return logits, features


class NNXClassifier(_Adapted):
    """A Flax NNX module as the contract (see :func:`as_classifier`)."""

    def __init__(self, module: nnx.Module, head: HeadLike = None, *, label: str, how: str) -> None:
        self.label, self.description = label, f"{label} ({how})"
        if isinstance(head, str):
            self.module = nnx.clone(module)
            layer = _replace_at(self.module, head)
            self.head = layer
        else:
            self.module = module
            own = getattr(module, "head", None)
            self.head = _weights_head(head) if head is not None else _kernel_head(own)

    def _outputs(self, images):
        return _split_output(self.module(images), "NNX module")


class LinenClassifier(_Adapted):
    """A Flax linen module and its variables as the contract (see :func:`as_classifier`)."""

    def __init__(
        self,
        module: nn.Module,
        variables: Mapping,
        head: HeadLike = None,
        *,
        apply_kwargs: Mapping | None = None,
        label: str,
        how: str,
    ) -> None:
        self.label, self.description = label, f"{label} ({how})"
        self.module = module
        self.variables = nnx.Variable(variables)
        self.apply_kwargs = tuple(sorted(dict(apply_kwargs or {}).items()))
        self.head_path = tuple(head.split("/")) if isinstance(head, str) else None
        if isinstance(head, str):
            params = _linen_params_at(variables, self.head_path)
            self.head = LinearHead(params["kernel"], params.get("bias"))
        else:
            self.head = _weights_head(head)

    def _outputs(self, images):
        variables = self.variables.get_value()
        if self.head_path is None:
            out = self.module.apply(variables, images, **dict(self.apply_kwargs))
            return _split_output(out, "linen module")
        path = self.head_path

        def record(next_fn, args, kwargs, context):
            if context.method_name == "__call__" and tuple(context.module.path) == path:
                captured = _CAPTURED.get()
                if captured is not None:
                    captured["features"] = args[0]
            return next_fn(*args, **kwargs)

        with nn.intercept_methods(record):
            out = self.module.apply(variables, images, **dict(self.apply_kwargs))
        return _split_output(out, "linen module")


class FunctionClassifier(_Adapted):
    """A function ``images -> logits | (logits, features)`` (or ``fn(params, images)``)."""

    def __init__(
        self, fn: Callable, params: Any = None, head: HeadLike = None, *, label: str, how: str
    ) -> None:
        self.label, self.description = label, f"{label} ({how})"
        self.fn = fn
        self.params = None if params is None else nnx.Variable(params)
        if isinstance(head, str):
            raise ValueError(
                f"head={head!r}: a layer can be named for an NNX or linen module only; for a "
                "function, return (logits, features) and pass head=(kernel, bias)."
            )
        self.head = _weights_head(head)

    def _outputs(self, images):
        if self.params is None:
            out = self.fn(images)
        else:
            out = self.fn(self.params.get_value(), images)
        return _split_output(out, "function")


def _weights_head(head: HeadLike) -> nnx.Module | None:
    if head is None:
        return None
    if isinstance(head, str):  # pragma: no cover - callers handle names first
        raise TypeError(head)
    parts = tuple(head)
    if len(parts) not in (1, 2):
        raise ValueError(
            "head: expected a layer name, or the weights (kernel [D, K], bias [K] or None), "
            f"got a sequence of {len(parts)} items."
        )
    return LinearHead(parts[0], parts[1] if len(parts) == 2 else None)


def _kernel_head(layer: Any) -> nnx.Module | None:
    """``layer`` when it is a linear layer with a ``kernel``, else None."""
    return layer if layer is not None and hasattr(layer, "kernel") else None


def _linear_layers(module: nnx.Module) -> list[str]:
    """The attribute paths of the ``nnx.Linear`` layers of ``module`` (for messages)."""
    return [
        ".".join(map(str, path))
        for path, m in nnx.iter_modules(module)
        if isinstance(m, nnx.Linear) and path
    ]


def _replace_at(module: nnx.Module, path: str) -> nnx.Module:
    """Wraps the linear layer at ``path`` (dots) of ``module`` in a :class:`_Tap`; returns it."""
    *parents, last = path.split(".")
    parent = module
    try:
        for name in parents:
            parent = parent[int(name)] if name.isdigit() else getattr(parent, name)
        layer = parent[int(last)] if last.isdigit() else getattr(parent, last)
    except (AttributeError, IndexError, KeyError, TypeError):
        layer = None
    if layer is None or not hasattr(layer, "kernel") or np.ndim(layer.kernel[...]) != 2:
        found = _linear_layers(module)
        raise ValueError(
            f"head={path!r}: the NNX module has no linear layer (a 2-D kernel) there; "
            + (
                f"its nnx.Linear layers are: {', '.join(found)}."
                if found
                else "it has no nnx.Linear layer: pass head=(kernel, bias) instead."
            )
        )
    tap = _Tap(layer)
    if last.isdigit():
        parent[int(last)] = tap
    else:
        setattr(parent, last, tap)
    return layer


def _linen_params_at(variables: Mapping, path: tuple[str, ...]) -> Mapping:
    params = variables.get("params") if isinstance(variables, Mapping) else None
    node = params
    for name in path:
        node = node.get(name) if isinstance(node, Mapping) else None
    if not isinstance(node, Mapping) or "kernel" not in node:
        found = _linen_dense_paths(params or {})
        raise ValueError(
            f"head={'/'.join(path)!r}: the linen variables have no layer with a kernel at "
            f"params/{'/'.join(path)}; "
            + (
                f"layers with a 2-D kernel: {', '.join(found)}."
                if found
                else "pass the module's variables (from module.init) as the second argument."
            )
        )
    return node


def _linen_dense_paths(params: Mapping, prefix: tuple[str, ...] = ()) -> list[str]:
    out = []
    for name, value in params.items():
        if isinstance(value, Mapping):
            kernel = value.get("kernel")
            if kernel is not None and np.ndim(kernel) == 2:
                out.append("/".join((*prefix, name)))
            out += _linen_dense_paths(value, (*prefix, name))
    return out


def as_classifier(
    model: Any,
    variables: Any = None,
    *,
    head: HeadLike = None,
    apply_kwargs: Mapping | None = None,
    name: str | None = None,
) -> nnx.Module:
    """``model`` as the evaluation's model contract (see the module docstring).

    Args:
      model: an ood_jax model or a module already adapted (returned as is); a Flax
        NNX module; a Flax linen module (with ``variables``); or a function.
      variables: a linen module's variables (``module.init(...)``), or a function's
        parameters when it is called ``fn(params, images)``.
      head: the final linear layer: its name in the module (NNX: attribute path,
        linen: module name or path), so that the features are its input, or its
        weights ``(kernel [D, K], bias)``. Default: an NNX module's own ``head``
        attribute when it has a kernel, else none (the detectors that need it are
        skipped).
      apply_kwargs: keyword arguments of a linen module's ``apply`` (e.g.
        ``{"train": False}``).
      name: what the report calls the model (default: its class or function name).

    Raises:
      ValueError/TypeError: a layer not found (the message lists the linear layers
        there are), a linen module without variables, a model of another kind.
    """
    if isinstance(model, Classifier | _Adapted):
        return model
    label = name or getattr(model, "__name__", None) or type(model).__name__
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise ValueError(
                "variables: an NNX module holds its own parameters; pass it alone "
                "(variables are for a linen module or a function fn(params, images))."
            )
        how = "Flax NNX" + (f", head {head!r}" if isinstance(head, str) else "")
        return NNXClassifier(model, head, label=label, how=how)
    if isinstance(model, nn.Module):
        if variables is None:
            raise ValueError(
                f"a linen module ({type(model).__name__}) needs its variables: "
                "as_classifier(module, variables) with variables = module.init(key, images)."
            )
        how = "Flax linen" + (f", head {head!r}" if isinstance(head, str) else "")
        return LinenClassifier(
            model, variables, head, apply_kwargs=apply_kwargs, label=label, how=how
        )
    if callable(model):
        return FunctionClassifier(model, variables, head, label=label, how="function")
    raise TypeError(
        f"model: expected a Flax NNX or linen module or a function images -> logits, got "
        f"{type(model).__name__}."
    )


def check_head(model: nnx.Module, logits: np.ndarray, features: np.ndarray) -> None:
    """Raises a ValueError when an adapted model's head does not map its features to its
    logits (``features @ kernel + bias``), checked on outputs of the evaluation's first
    set: the detectors that use both would be silently wrong. ood_jax's own models are
    not checked (a spectral-norm head rescales its kernel)."""
    head = getattr(model, "head", None)
    if not isinstance(model, _Adapted) or head is None or features.shape[1] == 0:
        return
    kernel = np.asarray(head.kernel[...], np.float64)
    bias = 0.0 if head.bias is None else np.asarray(head.bias[...], np.float64)
    expected = features.astype(np.float64) @ kernel + bias
    gap = float(np.max(np.abs(expected - logits))) if len(logits) else 0.0
    if gap > 1e-3 * max(1.0, float(np.max(np.abs(logits)))):
        raise ValueError(
            f"head: the model's logits are not its features times the head's kernel plus its "
            f"bias (largest difference {gap:.3g}); the features must be the final linear "
            "layer's input: name that layer (head='...'), or return the features it takes."
        )


def describe(model: nnx.Module) -> str:
    """What the report calls ``model``: an adapter's description, or the class name."""
    return getattr(model, "description", None) or type(model).__name__


def capabilities(model: nnx.Module, image_shape: Sequence[int], num_classes: int) -> frozenset:
    """Which of :data:`MODEL_NEEDS` ``model`` (the contract) serves, from its output shapes.

    ``image_shape``: one image's ``(H, W, C)``; ``num_classes``: the in-distribution
    set's class count. The model is traced on a batch of two (no computation).

    Raises:
      ValueError: the outputs do not fit the contract (logits not ``[B, num_classes]``,
        features not ``[B, D]``, a head whose kernel is not ``[D, num_classes]``), with
        what to change.
    """
    batch = jax.ShapeDtypeStruct((2, *tuple(image_shape)), jnp.float32)
    graphdef, state = nnx.split(model)
    try:
        logits, features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, batch)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"model ({describe(model)}): calling it on a batch of shape {batch.shape} "
            f"float32 failed: {err}"
        ) from err
    if logits.shape != (2, num_classes):
        raise ValueError(
            f"model ({describe(model)}): the logits must be [batch, {num_classes}] for the "
            f"in-distribution set's {num_classes} classes, got {logits.shape} for a batch of "
            "2; return the logits first (or alone)."
        )
    if features.ndim != 2 or features.shape[0] != 2:
        raise ValueError(
            f"model ({describe(model)}): the features must be [batch, D], got "
            f"{features.shape}; flatten or pool them, or name the head layer (head=...)."
        )
    caps = set()
    if features.shape[1] > 0:
        caps.add("features")
    head = getattr(model, "head", None)
    if head is not None and hasattr(head, "kernel"):
        kernel = tuple(np.shape(head.kernel[...]))
        if features.shape[1] and kernel != (features.shape[1], num_classes):
            raise ValueError(
                f"model ({describe(model)}): the head's kernel is {kernel}, but the features "
                f"are [batch, {features.shape[1]}] and the classes {num_classes}: it must be "
                f"{(features.shape[1], num_classes)}; name the layer whose input the features "
                "are."
            )
        caps.add("head")
    if isinstance(model, Classifier):
        caps.add("intermediates")
    if any(isinstance(m, nnx.Dropout) and m.rate > 0 for _, m in nnx.iter_modules(model)):
        caps.add("dropout")
    return frozenset(caps)


#: How a user serves each need, for the skip warnings.
_HOW = {
    "features": "return (logits, features), or name the final linear layer with head=",
    "head": "name the final linear layer with head= (or return (logits, features) and "
    "pass head=(kernel, bias))",
    "intermediates": "only ood_jax's own models give them, with model(x, capture=...)",
    "dropout": "give the model an NNX dropout layer of rate > 0",
}


def servable_scores(
    names: Sequence[str], caps: frozenset, *, has_train: bool = True
) -> tuple[tuple[str, ...], dict[str, str]]:
    """``(the scores the model serves, {skipped score: why})``, in the order of ``names``.

    A score is skipped when ``caps`` lacks one of its ``needs``, or when it is fitted
    and ``has_train`` is False (no in-distribution training set given).
    """
    kept, skipped = [], {}
    for name in names:
        score = get_score(name)
        missing = [need for need in score.needs if need not in caps]
        if missing:
            if {"features", "head"} <= set(missing):  # one layer name serves both
                missing_how = [n for n in missing if n != "features"]
            else:
                missing_how = missing
            how = "; ".join(_HOW[need] for need in missing_how)
            skipped[name] = f"needs the model's {' and '.join(missing)}: {how}"
        elif score.fitted and not has_train:
            skipped[name] = "is fitted on the in-distribution training set (give id_train)"
        else:
            kept.append(name)
    return tuple(kept), skipped


__all__ = [
    "MODEL_NEEDS",
    "FunctionClassifier",
    "LinearHead",
    "LinenClassifier",
    "NNXClassifier",
    "as_classifier",
    "capabilities",
    "check_head",
    "describe",
    "servable_scores",
]
