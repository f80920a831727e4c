"""The score registry: every OOD score the evaluation knows, as an instance of its kind.

Evaluation (``ood_jax.evaluate``), ``--scores``, ``results.json``,
``results.md`` and the plots all iterate this registry; no other module lists
score names.

A score's kind is its type, which fixes its call signature, the fields it has and
the stage of the evaluation that computes it (``consumes``, read-only, names the
kind as a string):

- :class:`ArrayScore` (``"outputs"``): ``fn(logits [N, K], features [N, D], head,
  **hparams) -> [N]``, computed from the cached forward pass (MSP, energy, feature
  norm, GradNorm);
- :class:`FittedScore` (``"fitted"``), an array score fitted first:
  ``fit(train_logits, train_features, train_labels, **hparams) -> params`` once on
  the in-distribution training set, then ``fn(params, logits, features, head,
  **hparams) -> [N]`` (Mahalanobis, KNN, GMM, ReAct);
- :class:`ImageScore` (``"images"``): ``fn(apply_logits, images [B, H, W, C], std,
  **hparams) -> [B]`` per batch of normalized images, with ``apply_logits`` the
  eval-mode model (ODIN). The evaluation runs it on seeded subsets of at most
  ``max_examples`` images per set when that hyperparameter is set (a CPU budget). A
  ``stochastic`` one (MC dropout) is ``fn(apply_dropout, images, std, key,
  **hparams)``;
- :class:`ActivationScore` (``"activations"``): ``fn(out, to_logits, **hparams) ->
  [B]`` per batch, inside the jitted forward pass, with ``out`` the model's
  ``logits``, ``features`` and the intermediates named by ``captures``
  (``"pre_pool"`` [B, H, W, D], ``"blocks"``; see ``ood_jax.models.classifier``) and
  ``to_logits`` the rest of the network after ``pre_pool`` (global pooling, then the
  head; ``to_logits.edited(i, edit)`` the logits with block ``i`` edited, see
  ``ood_jax.evaluate.forward.Tail``). One extra forward pass per dataset serves all
  such scores; without them the evaluation never computes intermediates (ASH and
  SCALE on the feature map, RankFeat).

The last two, the model scores (:class:`ModelScore`), run the model and may be fitted
(``fit=``: MDSEns, Gram, ...): ``fn`` then takes the params first, an image score
``apply_out(x) -> out`` (``capture=captures``) for ``apply_logits``; with ``captures``
``fit(stream, **hparams)`` streams over ``(fit_features(out), labels)`` per training
batch, without them it is a :class:`FittedScore`'s fit (``docs/detectors.md``).
``head`` is a :class:`Head` (the final linear layer, ``kernel [D, K]``, ``bias [K]`` or
None). Every kind has (:class:`Score`, their common base):

- ``defaults``: every hyperparameter and its default (the only place defaults live).
- ``sweep``: optionally one hyperparameter that may be given as a sequence of
  values; the score is then computed for all of them at once with ``jax.vmap``
  and reported under one key per value (``msp`` at the default, ``msp_T1000``
  otherwise; ``sweep_label`` is the ``T``).
- ``grid``: ``{hyperparameter: values}`` searched when the evaluation tunes it.
- ``display``: the name tables and plots print.

Each kind checks its own fields when built and refuses an invalid combination with
a ``ValueError`` that names the score and the kind. Every score returns **higher =
more in-distribution**.

Registration. :func:`register_score` adds a score from your own code, as a decorator
whose ``consumes=`` picks the kind (:meth:`Score.from_consumes`)::

    from ood_jax.scores import register_score

    @register_score("my_score", consumes="outputs", display="Mine", defaults={"p": 2.0})
    def my_score(logits, features, head, *, p):
        return jnp.linalg.norm(features, ord=p, axis=-1)

or given an instance of a kind, with any of its fields::

    register_score(ActivationScore("my_map", fn, "Mine (map)", captures=("pre_pool",)))

then ``python -m experiments.evaluate --workdir DIR --scores msp,my_score
--imports my_module`` (or ``--config.imports`` when training) computes it in
the report. The built-in scores are registered by :mod:`ood_jax.scores.catalog` when
``ood_jax.scores`` is imported, in its explicit ``ORDER`` (the report's order);
:func:`available_scores` lists them in that order, then yours in registration order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax.registry import Registry

#: What a score may need from the model beyond its logits, the values of ``needs``:
#: ``"features"`` (the penultimate features ``z``), ``"head"`` (the final linear layer's
#: weights), ``"intermediates"`` (``model(x, capture=...)`` and the network's tail, as
#: ood_jax's own models give) and ``"dropout"`` (a dropout layer of rate > 0). The
#: evaluation skips, with a warning, a score whose needs the model cannot serve
#: (``ood_jax.evaluate.adapters``).
MODEL_NEEDS: tuple[str, ...] = ("features", "head", "intermediates", "dropout")


class Head(NamedTuple):
    """The final linear layer: ``logits = features @ kernel + bias``."""

    kernel: Any
    bias: Any | None


@dataclass(frozen=True)
class Score:
    """The common base of the score kinds (see the module docstring for the signatures).

    Build one of the kinds (:class:`ArrayScore`, :class:`FittedScore`,
    :class:`ImageScore`, :class:`ActivationScore`), or :meth:`from_consumes` from the
    former ``Score(...)`` arguments; ``Score`` itself is not a kind.

    Attributes:
      name: registry name and result key.
      fn: the scoring function.
      display: name in tables and plots.
      defaults: every hyperparameter with its default.
      sweep: a hyperparameter that may be a sequence (vmapped), or None.
      sweep_label: short label of the swept value in result keys (``"T"``).
      grid: ``{hyperparameter: values}`` searched on a validation pair when the
        evaluation tunes this score (OpenOOD v1.5's ``postprocessor_sweep``).
      needs: what it needs from the model beyond the logits, a subset of
        :data:`MODEL_NEEDS`. Default (None) the kind's: ``("features", "head")`` for the
        array and fitted kinds (declare ``needs=()`` for a score of the logits only, so
        that a logits-only model gets it), ``()`` for an image score, ``("dropout",)``
        for a stochastic one, ``("intermediates",)`` for an activation score or an
        image score with ``captures``; stored resolved.
      consumes: the kind as a string (read-only): ``"outputs"``, ``"fitted"``,
        ``"images"`` or ``"activations"``.
    """

    name: str
    fn: Callable[..., Any]
    display: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    sweep: str | None = None
    sweep_label: str = ""
    grid: Mapping[str, tuple] = field(default_factory=dict)
    needs: tuple[str, ...] | None = None

    consumes: ClassVar[str]

    def __post_init__(self) -> None:
        if not hasattr(type(self), "consumes"):
            raise TypeError(
                f"score {self.name!r}: {type(self).__name__} is a base of the score kinds; "
                "build an ArrayScore, FittedScore, ImageScore or ActivationScore (or "
                "Score.from_consumes(name, fn, consumes, display, ...), the former Score "
                "arguments)."
            )
        self._check(
            self.sweep is None or self.sweep in self.defaults,
            f"sweep {self.sweep!r} is not in defaults.",
        )
        self._check(
            "_" not in self.sweep_label and not (self.sweep and not self.sweep_label),
            "give a sweep_label without '_'.",
        )
        self._check(
            set(self.grid) <= set(self.defaults) and all(map(len, self.grid.values())),
            "a grid gives values of its hyperparameters.",
        )
        needs = self._default_needs() if self.needs is None else tuple(self.needs)
        self._check(
            set(needs) <= set(MODEL_NEEDS),
            f"needs {needs!r}: choose from {MODEL_NEEDS} (beyond the logits).",
        )
        object.__setattr__(self, "needs", tuple(dict.fromkeys(needs)))

    def _default_needs(self) -> tuple[str, ...]:
        """The kind's ``needs`` when none is declared."""
        return ("features", "head")

    def _check(self, valid: bool, problem: str) -> None:
        if not valid:
            raise ValueError(f"score {self.name!r} ({type(self).__name__}): {problem}")

    @property
    def fitted(self) -> bool:
        """Whether the score is fitted on the training set first (``fn`` takes the params)."""
        return False

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

    @classmethod
    def from_consumes(
        cls,
        name: str,
        fn: Callable[..., Any],
        consumes: str,
        display: str,
        defaults: Mapping[str, Any] | None = None,
        fit: Callable[..., Any] | None = None,
        sweep: str | None = None,
        sweep_label: str = "",
        jit: bool = True,
        captures: tuple[str, ...] = (),
        grid: Mapping[str, tuple] | None = None,
        stochastic: bool = False,
        fit_features: Callable[..., Any] | None = None,
        needs: tuple[str, ...] | None = None,
    ) -> Score:
        """The score of the kind ``consumes`` names, from the former ``Score(...)`` arguments.

        What :func:`register_score` builds. A field the kind does not have must keep its
        default (``fit=`` on an ``"outputs"`` score is refused); ``jit`` is the array
        kinds' and ignored for the model kinds (the forward pass traces them).
        """
        if consumes not in SCORE_KINDS:
            raise ValueError(
                f"score {name!r}: consumes must be one of {CONSUMES}, got {consumes!r}."
            )
        kind = SCORE_KINDS[consumes]
        given = {
            "fit": fit,
            "jit": jit,
            "captures": captures,
            "stochastic": stochastic,
            "fit_features": fit_features,
        }
        own = {f.name for f in dataclasses.fields(kind)}
        foreign = [k for k, v in given.items() if v and k not in own and k != "jit"]
        if foreign:
            raise ValueError(
                f"score {name!r}: {kind.__name__} (consumes={consumes!r}) takes no "
                f"{', '.join(f'{k}=' for k in foreign)}."
            )
        return kind(
            name,
            fn,
            display,
            {} if defaults is None else defaults,
            sweep,
            sweep_label,
            {} if grid is None else grid,
            needs,
            **{k: v for k, v in given.items() if k in own},
        )


@dataclass(frozen=True, kw_only=True)
class ArrayScore(Score):
    """A score of the cached outputs: ``fn(logits, features, head, **hparams) -> [N]``.

    Attributes:
      jit: jit ``fn`` (the hyperparameters other than the swept one static).
    """

    jit: bool = True

    consumes: ClassVar[str] = "outputs"


@dataclass(frozen=True, kw_only=True)
class FittedScore(ArrayScore):
    """An array score fitted on the training outputs first.

    ``fit(train_logits, train_features, train_labels, **hparams) -> params``, then
    ``fn(params, logits, features, head, **hparams) -> [N]``.

    Attributes:
      fit: the fitting function.
    """

    fit: Callable[..., Any]

    consumes: ClassVar[str] = "fitted"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.fit is not None, "needs fit= (its fit on the training outputs).")

    @property
    def fitted(self) -> bool:
        """Always: a fitted score."""
        return True


@dataclass(frozen=True, kw_only=True)
class ModelScore(Score):
    """The base of the kinds that run the model: :class:`ImageScore`, :class:`ActivationScore`.

    Attributes:
      captures: the model intermediates it reads (``"pre_pool"``, ``"blocks"``).
      fit: the fitting function of a fitted one, else None: with ``captures``
        ``fit(stream, **hparams)`` over ``(fit_features(out), labels)`` per training
        batch, without them a :class:`FittedScore`'s fit of the training outputs.
      fit_features: a fitted one's with ``captures``: ``(out, **hparams) -> pytree of
        [B, ...]`` per training batch, which ``fit`` streams over.
    """

    captures: tuple[str, ...] = ()
    fit: Callable[..., Any] | None = None
    fit_features: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(
            (self.fit is not None and bool(self.captures)) == (self.fit_features is not None),
            "a fitted score with captures needs fit_features=, others none.",
        )

    @property
    def fitted(self) -> bool:
        """Whether it has a ``fit``."""
        return self.fit is not None


@dataclass(frozen=True, kw_only=True)
class ImageScore(ModelScore):
    """A score that runs the model on images: ``fn(apply_logits, images, std, **hparams)``.

    Its ``captures`` are what a fitted one's ``apply_out`` returns. It has no sweep
    (it runs once per set of hyperparameters).

    Attributes:
      stochastic: run with dropout on (skipped, with a warning, for a model without):
        ``fn(apply_dropout, images, std, key, **hparams)``, its keys from a ``seed``
        hyperparameter; not fitted.
    """

    stochastic: bool = False

    consumes: ClassVar[str] = "images"

    def _default_needs(self) -> tuple[str, ...]:
        return ("intermediates",) * bool(self.captures) + ("dropout",) * self.stochastic

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.sweep is None, "an image score has no sweep; give a grid to tune.")
        self._check(
            self.fit is not None or not self.captures,
            "captures= name what a fitted image score's apply_out returns; give fit= too.",
        )
        if self.stochastic:
            self._check("seed" in self.defaults, "a stochastic score needs a 'seed' default.")
            self._check(self.fit is None, "a stochastic score is not fitted.")


@dataclass(frozen=True, kw_only=True)
class ActivationScore(ModelScore):
    """A score of the model's intermediates inside the forward pass: ``fn(out, to_logits,
    **hparams) -> [B]``, with ``captures`` (at least one) naming what ``out`` holds."""

    consumes: ClassVar[str] = "activations"

    def _default_needs(self) -> tuple[str, ...]:
        return ("intermediates",)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(bool(self.captures), "needs captures= (the intermediates fn reads).")


SCORE_KINDS: Mapping[str, type[Score]] = {
    kind.consumes: kind for kind in (ArrayScore, FittedScore, ImageScore, ActivationScore)
}
CONSUMES: tuple[str, ...] = tuple(SCORE_KINDS)

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
    needs: tuple[str, ...] | None = None,
    replace: bool = False,
):
    """Register a score: pass an instance of a kind, or decorate ``fn``.

    As a decorator it registers ``Score.from_consumes(name, fn, consumes, display or
    name, defaults, fit, sweep, sweep_label, jit, needs=needs)`` (the kind ``consumes``
    names; ``needs``: what it needs from the model beyond the logits, see
    :attr:`Score.needs`) and
    returns ``fn``; given a :class:`Score` it registers and returns it (the other
    arguments but ``replace`` unused). ``replace=True`` replaces a registered score of
    the same name, in its place in :func:`available_scores`.
    """

    def add(score: Score) -> Score:
        return _REGISTRY.add(score, replace=replace)

    if isinstance(name, Score):
        return add(name)

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        add(
            Score.from_consumes(
                name,
                fn,
                consumes,
                display or name,
                dict(defaults or {}),
                fit,
                sweep,
                sweep_label,
                jit,
                needs=needs,
            )
        )
        return fn

    return decorator


def get_score(name: str) -> Score:
    """The registered score called ``name``."""
    return _REGISTRY.get(name)


def available_scores() -> tuple[str, ...]:
    """Names of all registered scores: the built-ins in ``ood_jax.scores.catalog.ORDER``,
    then the others in registration order."""
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


def _jitted(score: ArrayScore, static: tuple[str, ...]) -> Callable[..., Any]:
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
    """``{result key: float32 [N]}`` of an :class:`ArrayScore` (a :class:`FittedScore` too).

    A swept hyperparameter's values are evaluated with one ``jax.vmap``; the other
    hyperparameters are static arguments of the jitted function.
    """
    if not isinstance(score, ArrayScore):
        raise ValueError(f"score {score.name!r} needs the model; use its stage.")
    lead = (params,) if isinstance(score, FittedScore) else ()
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
