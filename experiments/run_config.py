"""A run's settings, resolved once: overrides, registry-implied fields, validation.

Only the experiments read configs, and each command resolves its config once,
in two steps, before anything is built:

1. :func:`parse`: the preset with the ``--config.*`` overrides, completed from the
   registries (the objective's hyperparameter defaults, the dataset spec's values,
   every score's defaults) between the schema-deciding overrides and the rest;
2. :func:`resolve`: the values checked, and what they imply derived once (the OOD
   sets, the report's :class:`~ood_jax.evaluate.EvalSpec`, the model's identity),
   into a frozen :class:`RunSettings`.

A bad value is one clear error before any data is loaded or file written; after
:func:`resolve` nothing changes the settings (energy fine-tuning's data-derived
margins give a new :class:`RunSettings`, :meth:`RunSettings.with_objective_hparams`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections

from experiments import cli
from ood_jax import data as D
from ood_jax.evaluate import EvalSpec, check_ood_set_names
from ood_jax.models import MODEL_NAMES
from ood_jax.scores import check_score_names
from ood_jax.scores import merge_hparams as merge_score_hparams
from ood_jax.train import SCHEDULES, get_objective
from ood_jax.train import resolve_hparams as resolve_objective_hparams

# Overrides applied before the rest: they decide which other fields exist.
SCHEMA_FIELDS = ("imports", "objective.name", "data.dataset")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """A command's settings, resolved once (:func:`resolve`).

    Attributes:
      config: the completed, validated config, frozen.
      ood_sets: the OOD test sets of the report (``()`` when ``config.eval.ood`` is off).
      eval: the report's settings (None when ``config.eval.ood`` is off); its
        ``batch_size`` is the config's, made a multiple of the devices when the mesh is
        known (:func:`eval_batch_size`).
    """

    config: ml_collections.FrozenConfigDict
    ood_sets: tuple[str, ...]
    eval: EvalSpec | None

    def model_identity(self, num_classes: int) -> dict[str, Any]:
        """The run's model identity (:func:`model_identity`)."""
        return model_identity(self.config, num_classes)

    def with_objective_hparams(self, values: Mapping[str, float]) -> RunSettings:
        """These settings with objective hyperparameters set from data (energy
        fine-tuning's automatic margins), the rest unchanged."""
        config = self.config.as_configdict()
        for name, value in values.items():
            config.objective.hparams[name] = value
        return dataclasses.replace(self, config=ml_collections.FrozenConfigDict(config))


def parse(
    config: ml_collections.ConfigDict, overrides: Sequence[str] = ()
) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the ``--config.*`` ``overrides`` applied and completed
    from the registries (:func:`complete_config`, once, after the schema's fields)."""
    return cli.apply_overrides(config, overrides, first=SCHEMA_FIELDS, prepare=complete_config)


def resolve(config: ml_collections.ConfigDict) -> RunSettings:
    """The settings of a parsed (:func:`parse`) ``config``: checked, derived, frozen."""
    validate_config(config)
    if not config.eval.ood:
        return RunSettings(ml_collections.FrozenConfigDict(config), (), None)
    names = ood_set_names(config)
    with _config_field("eval.ood_sets"):
        check_ood_set_names(names)
    with _config_field("eval"):
        spec = eval_spec(config, batch_size=config.data.eval_batch_size)
    _check_tuning(config, names)
    return RunSettings(ml_collections.FrozenConfigDict(config), tuple(names), spec)


def model_identity(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """What must match between a checkpoint and the model restoring it (the
    identity :func:`ood_jax.models.build_model` builds from)."""
    options = dict(config.model.options.to_dict())
    options.update(get_objective(config.objective.name).model_options)
    if config.model.mixed_precision:
        options["dtype"] = "bfloat16"
    return {"name": config.model.name, "num_classes": num_classes, "options": options}


def eval_spec(config: ml_collections.ConfigDict, *, batch_size: int) -> EvalSpec:
    """The :class:`~ood_jax.evaluate.EvalSpec` of ``config.eval`` (0 budgets = none)."""
    settings = config.eval
    dataset = D.get_dataset_spec(config.data.dataset)
    return EvalSpec(
        scores=[s for s in settings.scores if s] or None,
        score_hparams=settings.score_hparams.to_dict(),
        protocols=tuple(settings.protocols),
        convention=settings.convention,
        num_draws=settings.num_draws,
        seed=config.seed,
        max_train=settings.max_train or None,
        max_ood=settings.max_ood or None,
        adversarial_noise=settings.adversarial_noise,
        attack_steps=settings.attack_steps,
        attack_eps=settings.attack_eps,
        batch_size=batch_size,
        mean=dataset.mean,
        std=dataset.std,
        tune=[s for s in settings.tune if s],
        tune_grids=settings.tune_grids.to_dict(),
        val_size=settings.val_size,
        fit_on_val=[s for s in settings.fit_on_val if s],
    )


def import_user_modules(config: ml_collections.ConfigDict) -> None:
    """Imports ``config.imports`` (user modules that register objectives/scores/datasets)."""
    for name in config.get("imports", ()) or ():
        if not name:
            continue
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise cli.UsageError(
                f"config.imports: cannot import {name!r} ({err}); put its folder on PYTHONPATH."
            ) from None


def trains(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` is a training run's (it has an objective); the config of a
    model evaluated without its run (``experiments.configs.eval_presets.get_config``:
    a PyTorch file) has no training fields to complete or check."""
    return "objective" in config


def complete_config(config: ml_collections.ConfigDict) -> None:
    """Fills the fields implied by the registries, in place.

    - ``objective.hparams`` (a training run's, :func:`trains`): the objective's
      registered defaults, updated by the in-distribution dataset spec's values for
      that objective, updated by what the config already holds (the user's overrides);
    - ``eval.score_hparams``: every registered score's defaults, updated likewise.
    """
    import_user_modules(config)
    hparams = _objective_hparams(config) if trains(config) else None
    with _config_field("eval.score_hparams"):
        scores = merge_score_hparams(config.eval.score_hparams.to_dict())
    grids = config.eval.tune_grids.to_dict() if "tune_grids" in config.eval else {}
    with config.unlocked():
        if hparams is not None:
            config.objective.hparams = ml_collections.ConfigDict(hparams)
        config.eval.score_hparams = _score_hparams_node(scores)
        # One node per score, so --config.eval.tune_grids.<score>.<hp>=... finds its parent.
        config.eval.tune_grids = ml_collections.ConfigDict(
            {name: grids.get(name, {}) for name in scores}
        )


def _objective_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The objective's hyperparameters: registered defaults < the dataset spec's < given."""
    objective = get_objective(config.objective.name)
    spec = D.get_dataset_spec(config.data.dataset)
    # Hyperparameters named mean/std are the in-distribution normalization (ACET/CEDA
    # make their noise in pixel space).
    norm = {k: v for k, v in (("mean", spec.mean), ("std", spec.std)) if k in objective.defaults}
    given = {
        **norm,
        **spec.objective_hparams.get(objective.name, {}),
        **config.objective.hparams.to_dict(),
    }
    with _config_field("objective.hparams"):
        return resolve_objective_hparams(objective.name, given)


def _score_hparams_node(hparams: dict[str, dict]) -> ml_collections.ConfigDict:
    """``{score: {hparam: value}}`` as a ConfigDict whose fields take CLI overrides."""
    out = ml_collections.ConfigDict()
    for name, values in hparams.items():
        node = ml_collections.ConfigDict()
        for key, value in values.items():
            if value is None:  # an unset budget: typed placeholder so it can be overridden
                value = ml_collections.config_dict.placeholder(int)
            elif isinstance(value, list):
                value = tuple(value)
            node[key] = value
        out[name] = node
    return out


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks values that would fail late or silently, before any data is loaded (the
    OOD sets and the report's settings: :func:`resolve`); the training fields only in
    a training run's config (:func:`trains`)."""
    d = config.data
    checks = _training_checks(config) if trains(config) else []
    checks += [
        (d.train_limit >= 0, f"config.data.train_limit must be >= 0, got {d.train_limit}"),
        (d.test_limit >= 0, f"config.data.test_limit must be >= 0, got {d.test_limit}"),
        (
            d.eval_batch_size >= 1,
            f"config.data.eval_batch_size must be >= 1, got {d.eval_batch_size}",
        ),
        (config.seed >= 0, f"config.seed must be >= 0, got {config.seed}"),
        (
            config.model.name in MODEL_NAMES,
            f"config.model.name: unknown model {config.model.name!r}; known: "
            + ", ".join(MODEL_NAMES),
        ),
    ]
    if trains(config):
        checks += _optim_checks(config.optim)
    for ok, message in checks:
        if not ok:
            raise cli.UsageError(message + ".")
    scores = [s for s in config.eval.scores if s]
    if config.eval.ood and scores:
        with _config_field("eval.scores"):
            check_score_names(scores)


def _training_checks(config: ml_collections.ConfigDict) -> list[tuple[bool, str]]:
    """``(ok, message)`` per training value (the loop's, the outlier batch's)."""
    t, ratio = config.train, config.data.outliers.ratio
    return [
        (t.batch_size >= 1, f"config.train.batch_size must be >= 1, got {t.batch_size}"),
        (t.epochs > 0 or t.num_steps > 0, f"config.train.epochs must be > 0, got {t.epochs}"),
        (t.num_steps >= 0, f"config.train.num_steps must be >= 0, got {t.num_steps}"),
        (ratio >= 1, f"config.data.outliers.ratio must be >= 1, got {ratio}"),
        (
            t.checkpoint_every >= 0,
            f"config.train.checkpoint_every must be >= 0, got {t.checkpoint_every}",
        ),
        (t.log_every >= 1, f"config.train.log_every must be >= 1, got {t.log_every}"),
        (
            t.profile_steps >= 0,
            f"config.train.profile_steps must be >= 0, got {t.profile_steps}",
        ),
    ]


def _check_tuning(config: ml_collections.ConfigDict, ood_sets: list[str]) -> None:
    """The validation settings, before training: the search's OOD set."""
    settings = config.eval
    if any(settings.tune):
        if settings.tune_ood in ood_sets:
            raise cli.UsageError(
                f"config.eval.tune_ood: {settings.tune_ood!r} is one of the OOD test sets "
                "(config.eval.ood_sets); hyperparameters are never chosen on a test set: "
                "name another validation set, e.g. tinyimagenet_train:train."
            )
        with _config_field("eval.tune_ood"):
            check_ood_set_names([settings.tune_ood])


def _optim_checks(o: ml_collections.ConfigDict) -> list[tuple[bool, str]]:
    """``(ok, message)`` per optimizer value, naming the flag (NaN fails every comparison)."""
    finite = {k: math.isfinite(o[k]) for k in ("lr", "weight_decay", "final_lr", "decay_factor")}
    return [
        (finite["lr"] and o.lr > 0, f"config.optim.lr must be a positive number, got {o.lr}"),
        (0 <= o.momentum < 1, f"config.optim.momentum must be in [0, 1), got {o.momentum}"),
        (
            finite["weight_decay"] and o.weight_decay >= 0,
            f"config.optim.weight_decay must be >= 0, got {o.weight_decay}",
        ),
        (
            finite["final_lr"] and o.final_lr >= 0,
            f"config.optim.final_lr must be >= 0, got {o.final_lr}",
        ),
        (
            finite["decay_factor"] and o.decay_factor > 0,
            f"config.optim.decay_factor must be > 0, got {o.decay_factor}",
        ),
        (
            o.warmup_epochs >= 0,
            f"config.optim.warmup_epochs must be >= 0, got {o.warmup_epochs}",
        ),
        (
            0 < o.peak_fraction < 1,
            f"config.optim.peak_fraction must be in (0, 1), got {o.peak_fraction}",
        ),
        (
            o.schedule in SCHEDULES,
            f"config.optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}",
        ),
    ]


def ood_set_names(config: ml_collections.ConfigDict) -> list[str]:
    """The OOD sets of a run: ``config.eval.ood_sets``, else the dataset's default suite
    for its source (:meth:`ood_jax.data.DatasetSpec.default_ood_sets`: from tfds only
    when the data comes from tfds)."""
    spec = D.get_dataset_spec(config.data.dataset)
    names = [n for n in config.eval.ood_sets if n] or list(
        spec.default_ood_sets(config.data.source)
    )
    if not names:
        raise cli.UsageError(
            f"config.eval.ood_sets: none given and {spec.name!r} has no default OOD suite; "
            "name the sets, e.g. --config.eval.ood_sets=svhn,gaussian."
        )
    return names


@contextlib.contextmanager
def _config_field(field: str) -> Iterator[None]:
    """Reports the library's ValueError about a config value as a user error naming it."""
    try:
        yield
    except cli.UsageError:
        raise
    except ValueError as err:
        raise cli.UsageError(f"config.{field}: {err}") from None


def eval_batch_size(config: ml_collections.ConfigDict, mesh) -> int:
    """The one eval batch size (training's test pass and the report): a multiple of the
    device count, last batch padded and masked."""
    size = config.data.eval_batch_size
    devices = mesh.devices.size
    return max(size - size % devices, devices)
