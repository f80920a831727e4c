"""``EvalSpec``: what an evaluation computes, in one frozen, validated value.

Scores and their hyperparameters, protocols and convention, draws and seed, the
budgets, the adversarial-noise attack and the model's input normalization: every
setting that changes a number of the report. The data, the model, the output
folder and the metadata stay arguments of :func:`~ood_jax.evaluate.run_evaluation`.
The spec is stored as-is in ``results.json`` (``"spec"``), so a report says what
it computed. An experiment builds it from its config section (``config.eval``) in
one place (``experiments.evaluation.eval_spec``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ood_jax import data as D
from ood_jax import metrics as M
from ood_jax.evaluate.protocol import PROTOCOLS
from ood_jax.scores.registry import available_scores, check_score_names, get_score
from ood_jax.scores.registry import resolve_hparams as resolve_score_hparams


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """What :func:`~ood_jax.evaluate.run_evaluation` computes.

    Attributes:
      scores: registered score names (None: every registered score); stored as
        the checked tuple of names.
      score_hparams: ``{score: {hyperparameter: value}}`` overriding the registered
        defaults, e.g. ``{"msp": {"temperature": (1, 1000)}, "odin": {"max_examples":
        1000}}``; a swept hyperparameter given as a sequence is vmapped. Stored
        resolved: every chosen score's full settings.
      protocols: any of ``"papers"`` (``num_ood`` OOD examples per draw,
        ``num_draws`` draws) and ``"full"``.
      convention: ``"hendrycks"`` or ``"openood"``.
      num_ood, num_draws, seed: the papers' protocol (default ``N_id // 5``, 10, 0);
        every draw is seeded by ``seed`` and the set's name.
      max_train: fit the fitted scores on a seeded random subset of at most this
        many training images (None = all), e.g. to keep a CPU run short.
      max_ood: evaluate each OOD set on a seeded random subset of at most this many
        images (None = all; recorded in the set's ``source``).
      adversarial_noise: add the ACET paper's adversarial-noise OOD set of this
        many uniform-noise images attacked against the model (``attack_steps``-step
        L-infinity PGD of radius ``attack_eps`` in [0, 1] pixels, maximizing
        confidence); 0 = none.
      batch_size: forward-pass batch size (padded to a multiple of the devices);
        the attack's batches, and so its random starts, follow it.
      mean, std: the in-distribution set's normalization (the model's input space).
      plots: write PNG plots with the report.
      plot_scores: score keys that get a histogram and a ROC plot (None: all).
      tune: scores whose hyperparameters are chosen on the validation pair
        (``("all",)``: every chosen score with a grid): the grid's value of best
        validation AUROC, then the test sets are scored at that value only
        (:mod:`ood_jax.evaluate.tuning`). Default: none, the registered values.
      tune_grids: ``{score: {hyperparameter: values}}`` over the registered grids
        (``Score.grid``, OpenOOD's); a swept hyperparameter given as several values
        in ``score_hparams`` is searched over those. Stored resolved for ``tune``.
      val_size: images of the validation pair: the ID training images held out from
        the fits (seeded), and the subset of the OOD validation set.
      fit_on_val: fitted scores fitted on the held-out ID split instead of the
        training set (as OpenOOD fits TempScale and KLM on its ID validation split).
    """

    scores: Sequence[str] | None = None
    score_hparams: Mapping[str, Mapping[str, Any]] | None = None
    protocols: Sequence[str] = PROTOCOLS
    convention: str = "hendrycks"
    num_ood: int | None = None
    num_draws: int = 10
    seed: int = 0
    max_train: int | None = None
    max_ood: int | None = None
    adversarial_noise: int = 0
    attack_steps: int = 40
    attack_eps: float = 0.3
    batch_size: int = 256
    mean: Sequence[float] = D.CIFAR10_MEAN
    std: Sequence[float] = D.CIFAR10_STD
    plots: bool = True
    plot_scores: Sequence[str] | None = None
    tune: Sequence[str] = ()
    tune_grids: Mapping[str, Mapping[str, Sequence]] | None = None
    val_size: int = 1000
    fit_on_val: Sequence[str] = ()

    def __post_init__(self) -> None:
        names = check_score_names(available_scores() if self.scores is None else self.scores)
        hparams = resolve_score_hparams(names, self.score_hparams)
        grids = tune_grids(names, hparams, self.tune, self.tune_grids)
        resolved = {
            "scores": names,
            "score_hparams": hparams,
            "tune": tuple(grids),
            "tune_grids": grids,
            "fit_on_val": _names(self.fit_on_val),
            "protocols": tuple(self.protocols),
            "mean": tuple(float(v) for v in self.mean),
            "std": tuple(float(v) for v in self.std),
            "plot_scores": None if self.plot_scores is None else tuple(self.plot_scores),
        }
        for field, value in resolved.items():
            object.__setattr__(self, field, value)
        self._check()

    def _check(self) -> None:
        if not self.protocols:
            raise ValueError(f"protocols: choose at least one of {PROTOCOLS}.")
        for protocol in self.protocols:
            if protocol not in PROTOCOLS:
                raise ValueError(f"protocols: {protocol!r} is not one of {PROTOCOLS}.")
        if self.convention not in M.CONVENTIONS:
            raise ValueError(
                f"convention: expected one of {M.CONVENTIONS}, got {self.convention!r}."
            )
        at_least = {
            "num_ood": (self.num_ood, 1, True),
            "num_draws": (self.num_draws, 1, False),
            "seed": (self.seed, 0, False),
            "max_train": (self.max_train, 1, True),
            "max_ood": (self.max_ood, 1, True),
            "adversarial_noise": (self.adversarial_noise, 0, False),
            "attack_steps": (self.attack_steps, 0, False),
            "batch_size": (self.batch_size, 1, False),
            "val_size": (self.val_size, 1, False),
        }
        for field, (value, low, none_ok) in at_least.items():
            if value is None and none_ok:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                allowed = " or None" if none_ok else ""
                raise ValueError(f"{field}: expected an integer >= {low}{allowed}, got {value!r}.")
        if not self.attack_eps >= 0:
            raise ValueError(f"attack_eps: expected a radius >= 0, got {self.attack_eps!r}.")
        if len(self.mean) != len(self.std) or min(self.std, default=0.0) <= 0:
            raise ValueError(
                f"mean, std: expected one mean and one positive std per channel, got "
                f"{self.mean} and {self.std}."
            )
        for name in self.fit_on_val:
            if name not in self.fitted_scores:
                raise ValueError(
                    f"fit_on_val: {name!r} is not a chosen fitted score; fitted: "
                    f"{self.fitted_scores}."
                )
            if name in self.tune:
                raise ValueError(
                    f"fit_on_val: {name!r} is tuned; it would be chosen on the split it is "
                    "fitted on."
                )

    @property
    def uses_val(self) -> bool:
        """Whether the ID training set gives up ``val_size`` images for validation."""
        return bool(self.tune or self.fit_on_val)

    @property
    def fitted_scores(self) -> list[str]:
        """The chosen scores fitted on the in-distribution training set."""
        return [name for name in self.scores if get_score(name).fitted]

    def with_scores(self, names: Sequence[str]) -> EvalSpec:
        """This spec with only the scores ``names`` (a subset of ``scores``): their
        settings, tuning, fitting split and plots kept, the others' dropped."""
        keep = tuple(n for n in self.scores if n in set(names))
        unknown = sorted(set(names) - set(self.scores))
        if unknown or not keep:
            raise ValueError(
                f"with_scores: expected some of the spec's scores {list(self.scores)}, got "
                f"{list(names)}."
            )

        def kept_key(key: str) -> bool:
            swept = {n: get_score(n).sweep_label for n in keep if get_score(n).sweep}
            return key in keep or any(key.startswith(f"{n}_{label}") for n, label in swept.items())

        return dataclasses.replace(
            self,
            scores=keep,
            score_hparams={n: self.score_hparams[n] for n in keep},
            tune=tuple(n for n in self.tune if n in keep),
            tune_grids={n: g for n, g in self.tune_grids.items() if n in keep},
            fit_on_val=tuple(n for n in self.fit_on_val if n in keep),
            plot_scores=None
            if self.plot_scores is None
            else tuple(k for k in self.plot_scores if kept_key(k)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain values (the ``"spec"`` entry of ``results.json``)."""
        return dataclasses.asdict(self)

    def attack_options(self) -> dict[str, Any]:
        """The adversarial-noise attack's keyword arguments (``adversarial_noise``)."""
        return {
            "mean": self.mean,
            "std": self.std,
            "eps": self.attack_eps,
            "steps": self.attack_steps,
            "batch_size": self.batch_size,
        }

    def protocol_options(self) -> dict[str, Any]:
        """The ``protocol_options`` entry of ``results.json`` (read by study reports)."""
        attacked = bool(self.adversarial_noise)
        return {
            "num_ood": self.num_ood,
            "num_draws": self.num_draws,
            "seed": self.seed,
            "convention": self.convention,
            "max_train": self.max_train,
            "max_ood": self.max_ood,
            "adversarial_noise": self.adversarial_noise,
            "attack_steps": self.attack_steps if attacked else None,
            "attack_eps": self.attack_eps if attacked else None,
        }


def _names(names: str | Sequence[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def tune_grids(
    names: Sequence[str],
    hparams: Mapping[str, Mapping[str, Any]],
    tune: Sequence[str],
    overrides: Mapping[str, Mapping[str, Sequence]] | None = None,
) -> dict[str, dict[str, tuple]]:
    """``{tuned score: {hyperparameter: values}}``, validated (see :class:`EvalSpec`).

    ``names``: the chosen scores; ``hparams``: their resolved hyperparameters;
    ``tune``: names among them, or ``("all",)`` for every one with a grid.
    """
    overrides = {k: dict(v or {}) for k, v in (overrides or {}).items()}
    for name, grid in overrides.items():
        unknown = sorted(set(grid) - set(get_score(name).defaults))
        if unknown:
            raise ValueError(
                f"tune_grids: score {name!r} takes {sorted(get_score(name).defaults)}, "
                f"got unknown {unknown}."
            )
    grids = {}
    for name in names:
        score = get_score(name)
        grid = dict(score.grid)
        swept = hparams[name].get(score.sweep, ())
        if score.sweep is not None and len(swept) > 1:
            grid[score.sweep] = swept
        grid.update(overrides.get(name, {}))
        grids[name] = {
            k: tuple(v) if isinstance(v, list | tuple) else (v,) for k, v in grid.items()
        }
    tune = list(_names(tune))
    if tune == ["all"]:
        return {name: grid for name, grid in grids.items() if grid}
    for name in tune:
        if name not in grids:
            raise ValueError(f"tune: {name!r} is not among the chosen scores {list(names)}.")
        if not grids[name] or not all(grids[name].values()):
            score = get_score(name)
            example = score.sweep or next(iter(score.defaults), None)
            hint = (
                f"give one, e.g. tune_grids.{name}.{example}=(v1, v2)"
                if example
                else "it has no hyperparameters"
            )
            raise ValueError(
                f"tune: score {name!r} has no grid to search (OpenOOD does not tune it); {hint}."
            )
    return {name: grids[name] for name in dict.fromkeys(tune)}
