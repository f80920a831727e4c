"""The score registry: every OOD score the evaluation knows, with what it consumes.

Evaluation (``ood_jax.evaluate``), ``--scores``, ``results.json``,
``results.md`` and the plots all iterate this registry; no other module lists
score names. A score declares:

- ``consumes``, which fixes its call signature:

  * ``"outputs"``: ``fn(logits [N, K], features [N, D], head, **hparams) -> [N]``,
    computed from the cached forward pass (MSP, energy, feature norm, GradNorm);
  * ``"fitted"``: ``fit(train_logits, train_features, train_labels, **hparams) ->
    params`` once on the in-distribution training set, then
    ``fn(params, logits, features, head, **hparams) -> [N]`` (Mahalanobis, KNN,
    GMM, ReAct);
  * ``"images"``: ``fn(apply_logits, images [B, H, W, C], std, **hparams) -> [B]``
    per batch of normalized images, with ``apply_logits`` the eval-mode model
    (ODIN). The evaluation runs it on seeded subsets of at most ``max_examples``
    images per set when that hyperparameter is set (a CPU budget). A ``stochastic``
    one (MC dropout) is ``fn(apply_dropout, images, std, key, **hparams)``.
  * ``"activations"``: ``fn(out, to_logits, **hparams) -> [B]`` per batch, inside
    the jitted forward pass, with ``out`` the model's ``logits``, ``features`` and
    the intermediates named by ``captures`` (``"pre_pool"`` [B, H, W, D],
    ``"blocks"``; see ``ood_jax.models.classifier``) and ``to_logits`` the rest of
    the network after ``pre_pool`` (global pooling, then the head; ``to_logits.edited(i,
    edit)`` the logits with block ``i`` edited, see ``ood_jax.evaluate.forward.Tail``). One extra
    forward pass per dataset serves all such scores; without them the evaluation
    never computes intermediates (ASH and SCALE on the feature map, RankFeat).

  A fitted ``"images"``/``"activations"`` score (``fit=``: MDSEns, Gram, ...) takes the
  params first, an ``"images"`` one ``apply_out(x) -> out`` (``capture=captures``) for
  ``apply_logits``; with ``captures`` its ``fit(stream, **hparams)`` streams over
  ``(fit_features(out), labels)`` per training batch (``docs/detectors.md``).

  ``head`` is a :class:`Head` (the final linear layer, ``kernel [D, K]``, ``bias
  [K]`` or None).
- ``defaults``: every hyperparameter and its default (the only place defaults live).
- ``sweep``: optionally one hyperparameter that may be given as a sequence of
  values; the score is then computed for all of them at once with ``jax.vmap``
  and reported under one key per value (``msp`` at the default, ``msp_T1000``
  otherwise; ``sweep_label`` is the ``T``).
- ``display``: the name tables and plots print.

Every score returns **higher = more in-distribution**.

Add a score from your own code::

    from ood_jax.scores import register_score

    @register_score("my_score", consumes="outputs", display="Mine", defaults={"p": 2.0})
    def my_score(logits, features, head, *, p):
        return jnp.linalg.norm(features, ord=p, axis=-1)

then ``python -m experiments.evaluate --workdir DIR --scores msp,my_score
--imports my_module`` (or ``--config.imports`` when training) computes it in
the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax.registry import Registry

CONSUMES: tuple[str, ...] = ("outputs", "fitted", "images", "activations")


class Head(NamedTuple):
    """The final linear layer: ``logits = features @ kernel + bias``."""

    kernel: Any
    bias: Any | None


@dataclass(frozen=True)
class Score:
    """A registered score (see the module docstring for the signatures).

    Attributes:
      name: registry name and result key.
      fn: the scoring function.
      consumes: one of ``CONSUMES``.
      display: name in tables and plots.
      defaults: every hyperparameter with its default.
      fit: for ``"fitted"`` scores, the fitting function.
      sweep: a hyperparameter that may be a sequence (vmapped), or None.
      sweep_label: short label of the swept value in result keys (``"T"``).
      jit: jit ``fn`` for ``"outputs"``/``"fitted"`` scores (hyperparameters static).
      captures: the model intermediates an ``"activations"`` score reads.
      grid: ``{hyperparameter: values}`` searched on a validation pair when the
        evaluation tunes this score (OpenOOD v1.5's ``postprocessor_sweep``).
      stochastic: an ``"images"`` score run with dropout on (skipped, with a warning,
        for a model without): ``fn(apply_dropout, images, std, key, **hparams)``.
      fit_features: a fitted score's with ``captures``: ``(out, **hparams) -> pytree of
        [B, ...]`` per training batch, which ``fit`` streams over.
    """

    name: str
    fn: Callable[..., Any]
    consumes: str
    display: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    fit: Callable[..., Any] | None = None
    sweep: str | None = None
    sweep_label: str = ""
    jit: bool = True
    captures: tuple[str, ...] = ()
    grid: Mapping[str, tuple] = field(default_factory=dict)
    stochastic: bool = False
    fit_features: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.consumes not in CONSUMES:
            raise ValueError(
                f"score {self.name!r}: consumes must be one of {CONSUMES}, got {self.consumes!r}."
            )
        if (self.consumes == "fitted" and self.fit is None) or (
            self.consumes == "outputs" and self.fit is not None
        ):
            raise ValueError(f"score {self.name!r}: a 'fitted' score needs fit=, 'outputs' none.")
        if (self.fit is not None and bool(self.captures)) != (self.fit_features is not None):
            raise ValueError(
                f"score {self.name!r}: a fitted score with captures needs fit_features=, "
                "others none."
            )
        if self.stochastic and (self.consumes != "images" or "seed" not in self.defaults):
            raise ValueError(
                f"score {self.name!r}: a stochastic score is an 'images' score with a 'seed'."
            )
        if self.consumes in ("outputs", "fitted") and self.captures:
            raise ValueError(f"score {self.name!r}: only a model score can have captures=.")
        if self.consumes == "activations" and not self.captures:
            raise ValueError(f"score {self.name!r}: an 'activations' score needs captures=.")
        if self.sweep is not None and self.sweep not in self.defaults:
            raise ValueError(f"score {self.name!r}: sweep {self.sweep!r} is not in defaults.")
        if "_" in self.sweep_label or (self.sweep and not self.sweep_label):
            raise ValueError(f"score {self.name!r}: give a sweep_label without '_'.")
        if not set(self.grid) <= set(self.defaults) or not all(map(len, self.grid.values())):
            raise ValueError(f"score {self.name!r}: a grid gives values of its hyperparameters.")

    def key(self, value: Any = None) -> str:
        """Result key for one value of the swept hyperparameter (the name at its default)."""
        if self.sweep is None or value is None or float(value) == float(self.defaults[self.sweep]):
            return self.name
        return f"{self.name}_{self.sweep_label}{float(value):g}"

    def display_for(self, key: str) -> str:
        """``"msp_T1000"`` -> ``"MSP (T=1000)"``."""
        if key == self.name or self.sweep is None:
            return self.display
        value = key[len(self.name) + 1 + len(self.sweep_label) :]
        return f"{self.display} ({self.sweep_label}={value})"


_REGISTRY: Registry[Score] = Registry("score", "ood_jax.scores.register_score")


def register_score(
    name: str | Score,
    *,
    consumes: str = "outputs",
    display: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    fit: Callable[..., Any] | None = None,
    sweep: str | None = None,
    sweep_label: str = "",
    jit: bool = True,
    replace: bool = False,
):
    """Register a score; use as a decorator on ``fn`` or pass a :class:`Score`."""

    def add(score: Score) -> Score:
        return _REGISTRY.add(score, replace=replace)

    if isinstance(name, Score):
        return add(name)

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        add(
            Score(
                name,
                fn,
                consumes,
                display or name,
                dict(defaults or {}),
                fit,
                sweep,
                sweep_label,
                jit,
            )
        )
        return fn

    return decorator


def get_score(name: str) -> Score:
    """The registered score called ``name``."""
    return _REGISTRY.get(name)


def available_scores() -> tuple[str, ...]:
    """Names of all registered scores, in registration order."""
    return _REGISTRY.names()


def check_score_names(names: Iterable[str]) -> tuple[str, ...]:
    """Validates score names; returns them without duplicates, in the given order."""
    names = tuple(dict.fromkeys(names))
    if not names:
        raise ValueError(f"scores: none given; choose from {', '.join(_REGISTRY.names())}.")
    for n in names:
        get_score(n)
    return names


def merge_hparams(
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{score: defaults updated by overrides[score]}`` for ``names`` (default: every score).

    Values are kept as given (:func:`resolve_hparams` also normalizes the swept one).
    Overrides for a registered score that is not among ``names`` are ignored (a CLI
    default may set ODIN's budget while ``--scores`` drops ODIN); an unknown score, or
    an unknown hyperparameter of a chosen score, is an error.
    """
    overrides = dict(overrides or {})
    for name in overrides:
        get_score(name)
    merged = {}
    for name in available_scores() if names is None else names:
        score = get_score(name)
        given = dict(overrides.get(name, {}) or {})
        unknown = sorted(set(given) - set(score.defaults))
        if unknown:
            raise ValueError(
                f"score {name!r} takes hyperparameters {sorted(score.defaults) or 'none'}, "
                f"got unknown {unknown}."
            )
        merged[name] = {**score.defaults, **given}
    return merged


def resolve_hparams(
    names: Sequence[str], overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """:func:`merge_hparams` for ``names``, the swept hyperparameter as a tuple of floats."""
    resolved = merge_hparams(overrides, names)
    for name, values in resolved.items():
        score = get_score(name)
        if score.sweep is not None:
            swept = values[score.sweep]
            swept = tuple(swept) if isinstance(swept, list | tuple) else (swept,)
            if not swept:
                raise ValueError(f"score {name!r}: {score.sweep} needs at least one value.")
            values[score.sweep] = tuple(float(v) for v in swept)
    return resolved


def _jitted(score: Score, static: tuple[str, ...]) -> Callable[..., Any]:
    cache = _JIT_CACHE.setdefault(score.name, {})
    fn = cache.get((score.fn, static))
    if fn is None:
        fn = jax.jit(score.fn, static_argnames=static) if score.jit else score.fn
        cache[(score.fn, static)] = fn
    return fn


_JIT_CACHE: dict[str, dict] = {}


def compute(
    score: Score,
    hparams: Mapping[str, Any],
    logits: Any,
    features: Any,
    head: Head,
    params: Any = None,
) -> dict[str, np.ndarray]:
    """``{result key: float32 [N]}`` of an ``"outputs"`` or ``"fitted"`` score.

    A swept hyperparameter's values are evaluated with one ``jax.vmap``; the other
    hyperparameters are static arguments of the jitted function.
    """
    if score.consumes in ("images", "activations"):
        raise ValueError(f"score {score.name!r} needs the model; use its stage.")
    lead = (params,) if score.consumes == "fitted" else ()
    fixed = {k: v for k, v in hparams.items() if k != score.sweep}
    fn = _jitted(score, tuple(sorted(fixed)))
    if score.sweep is None:
        return {score.name: np.asarray(fn(*lead, logits, features, head, **fixed), np.float32)}
    values = tuple(hparams[score.sweep])
    swept = jax.vmap(lambda v: fn(*lead, logits, features, head, **fixed, **{score.sweep: v}))(
        jnp.asarray(values, jnp.float32)
    )
    swept = np.asarray(swept, np.float32)
    return {score.key(v): swept[i] for i, v in enumerate(values)}


# The built-in scores register as soon as the registry exists (reports print them first).
from ood_jax.scores import builtin_entries  # noqa: E402,F401
