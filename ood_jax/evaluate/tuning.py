"""Choosing detectors' hyperparameters on a validation pair, never on a test set.

OpenOOD v1.5's automatic parameter search (``APS_mode``,
``openood/evaluation_api/evaluator.py`` ``hyperparam_search``): for every combination
of a detector's grid, score the ID validation images and the OOD validation images,
and keep the combination of best AUROC (the first one on a tie, as OpenOOD's
``auroc > max_auroc``). The test sets are then scored at that combination only.

The validation pair:

- ID: ``val_size`` images of the ID *training* set, drawn with a seed and held out
  from every fit (:func:`holdout_split`). The ID test set stays whole, so the test
  numbers remain comparable to untuned runs and to the papers; the network has seen
  these images in training, which makes them look more in-distribution than unseen
  ID images (see ``docs/detectors.md``).
- OOD: a named set that is none of the report's OOD test sets (checked by
  :func:`~ood_jax.evaluate.stages.check_datasets`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping

import numpy as np

from ood_jax import data as D
from ood_jax import metrics as M
from ood_jax.evaluate.forward import ForwardPass, ModelOutputs
from ood_jax.evaluate.protocol import dataset_seeds
from ood_jax.evaluate.scoring import fit_captured, fit_scores
from ood_jax.evaluate.spec import EvalSpec
from ood_jax.evaluate.stages import Batches, compute_outputs, compute_scores, registered_score
from ood_jax.scores.registry import Head, get_score

# Tags the seed of the held-out draw, so it differs from the max_train subset's.
_HOLDOUT_TAG = 24


def holdout_split(
    train: D.ImageDataset, size: int, *, seed: int
) -> tuple[D.ImageDataset, D.ImageDataset]:
    """``(the rest, a seeded random held-out subset of size images)`` of ``train``.

    Both keep dataset order; the held-out subset is ``train``'s name with ``source``
    saying what it is. At least one image is left for the fits.
    """
    if size >= len(train):
        raise ValueError(
            f"val_size: {size} held-out images leave none of the {len(train)} training "
            "images for the fits; choose a smaller val_size."
        )
    held = np.zeros(len(train), bool)
    held[np.random.default_rng([seed, _HOLDOUT_TAG]).choice(len(train), size, replace=False)] = True

    def part(mask: np.ndarray, what: str) -> D.ImageDataset:
        return D.ImageDataset(
            train.images[mask],
            train.labels[mask],
            name=train.name,
            num_classes=train.num_classes,
            source=f"{train.source} ({what}, seed {seed})",
        )

    return part(~held, f"without the {size} held out"), part(held, f"{size} held out")


@dataclasses.dataclass(frozen=True)
class TrainSet:
    """The training images the fits see and their forward pass."""

    images: D.ImageDataset
    outputs: ModelOutputs

    def fit(self, hparams: Mapping[str, Mapping], forward: ForwardPass, batches) -> dict:
        """``{score: params}`` of the fitted scores among ``hparams``: from the cached
        outputs, or streamed over one capturing pass (Gram, MDSEns)."""
        fitted = fit_scores(hparams, self.outputs)
        fitted.update(fit_captured(hparams, forward, lambda: batches(self.images)))
        return fitted


def _combinations(grid: Mapping[str, tuple], sweep: str | None) -> list[dict]:
    """The grid's combinations of the hyperparameters other than ``sweep``, in order."""
    names = [k for k in grid if k != sweep]
    values = itertools.product(*(grid[k] for k in names))
    return [dict(zip(names, combo, strict=True)) for combo in values]


def tune_scores(
    spec: EvalSpec,
    forward: ForwardPass,
    val_sets: Mapping[str, D.ImageDataset],
    val_outputs: Mapping[str, ModelOutputs],
    *,
    train: TrainSet | None,
    head: Head,
    batches: Batches,
) -> tuple[EvalSpec, dict]:
    """``(the spec of the test pass, {score: search record})`` for ``spec.tune``.

    ``val_sets``: ``{ID validation name: images, OOD validation name: images}`` in
    that order, ``val_outputs`` their forward passes; ``train``: the fits' training
    set (None when no tuned score is fitted). The test spec holds each tuned score's
    chosen hyperparameters (a swept one as a single value) and tunes nothing more.
    Each record: ``display``, ``grid``, ``candidates`` (``[{"hparams", "auroc"}]`` in grid
    order), ``chosen``, ``val_auroc`` and ``key``, the result key of the test pass.
    """
    hparams = {name: dict(hp) for name, hp in spec.score_hparams.items()}
    records = {}
    for name in spec.tune:
        score, grid = get_score(name), spec.tune_grids[name]
        sweep = score.sweep if score.sweep in grid else None
        candidates = []
        for combo in _combinations(grid, sweep):
            hp = {**hparams[name], **combo}
            if sweep is not None:
                hp[sweep] = tuple(float(v) for v in grid[sweep])
            aurocs = _validation_aurocs(
                spec, name, hp, forward, val_sets, val_outputs, train, head, batches
            )
            for value in hp[sweep] if sweep is not None else (None,):
                chosen = {**combo, **({} if sweep is None else {sweep: value})}
                candidates.append({"hparams": chosen, "auroc": aurocs[score.key(value)]})
        aurocs = np.nan_to_num([c["auroc"] for c in candidates], nan=-np.inf)
        if not np.any(np.isfinite(aurocs)):
            raise ValueError(
                f"tune: every candidate of {name!r} ({len(candidates)}) gave NaN or infinite "
                "scores on the validation pair, so none can be chosen; leave it out of tune "
                "(--tune), or evaluate it at fixed settings."
            )
        best = candidates[int(np.argmax(aurocs))]
        hparams[name].update(best["hparams"])
        if sweep is not None:
            hparams[name][sweep] = (float(best["hparams"][sweep]),)
        records[name] = {
            "display": score.display,
            "grid": {k: list(v) for k, v in grid.items()},
            "candidates": candidates,
            "chosen": best["hparams"],
            "val_auroc": best["auroc"],
            "key": score.key(hparams[name][score.sweep][0] if score.sweep else None),
        }
    test_spec = dataclasses.replace(spec, score_hparams=hparams, tune=(), tune_grids=None)
    return test_spec, records


def _validation_aurocs(
    spec, name, hp, forward, val_sets, val_outputs, train, head, batches
) -> dict[str, float]:
    """``{result key: validation AUROC}`` of score ``name`` at ``hp`` (one swept call).

    Takes the evaluation's own stages on the validation pair (a one-score spec), so a
    candidate is scored exactly as the test sets are.
    """
    one = dataclasses.replace(
        spec, scores=(name,), score_hparams={name: hp}, tune=(), tune_grids=None, fit_on_val=()
    )
    fitted = train.fit(one.score_hparams, forward, batches) if one.fitted_scores else {}
    table = compute_scores(
        one, forward, val_sets, val_outputs, head=head, fitted=fitted, batches=batches
    )
    (ood_name,) = table.ood_scores
    aurocs = {}
    for key, ids in table.id_scores.items():
        oods = table.ood_scores[ood_name][key]
        finite = np.all(np.isfinite(ids)) and np.all(np.isfinite(oods))
        # A candidate with NaN or infinite scores has no AUROC: never chosen.
        aurocs[key] = (
            M.ood_metrics(ids, oods, convention=spec.convention)["auroc"] if finite else np.nan
        )
    return aurocs


@dataclasses.dataclass(frozen=True)
class Fits:
    """What the fit stage gives the scores and the report.

    Attributes:
      spec: the spec of the test pass (tuned hyperparameters chosen).
      fitted: ``{fitted score: params}``.
      train_used: the training images the fits saw (None: no fitted score).
      train_outputs: their forward pass.
      val_id, val_ood: the validation pair (None when not used).
      tuning: ``{tuned score: search record}`` (see :func:`tune_scores`).
    """

    spec: EvalSpec
    fitted: dict = dataclasses.field(default_factory=dict)
    train_used: D.ImageDataset | None = None
    train_outputs: ModelOutputs | None = None
    val_id: D.ImageDataset | None = None
    val_ood: D.ImageDataset | None = None
    tuning: dict = dataclasses.field(default_factory=dict)


def fit_and_tune(
    spec: EvalSpec,
    train: D.ImageDataset,
    val_ood: D.ImageDataset | None,
    forward: ForwardPass,
    *,
    batches: Batches,
    head: Head,
    say,
) -> Fits:
    """Stage 2: hold out the ID validation split, tune ``spec.tune``, then fit.

    The fits see a seeded subset of at most ``spec.max_train`` of the training images
    not held out; ``spec.fit_on_val`` scores are fitted on the held-out split instead.
    """
    fit_set, val_id = (train, None)
    if spec.uses_val:
        fit_set, val_id = holdout_split(train, spec.val_size, seed=spec.seed)
    train = None
    on_train = [n for n in spec.fitted_scores if n not in spec.fit_on_val]
    if on_train:
        train_used = D.random_subset(fit_set, spec.max_train, seed=spec.seed)
        say(f"forward pass over {len(train_used)} training images for the fits")
        train = TrainSet(train_used, forward(batches(train_used)))
    val_sets: dict[str, D.ImageDataset] = {}
    if val_id is not None:
        val_sets[val_id.name] = val_id
    test_spec, tuning = spec, {}
    if spec.tune:
        seed = dataset_seeds(spec.seed, val_ood.name)
        val_sets[val_ood.name] = D.random_subset(val_ood, spec.val_size, seed=seed)
    val_outputs = compute_outputs(forward, val_sets, batches=batches)
    if spec.tune:
        say(f"tuning {', '.join(spec.tune)} on {' vs '.join(val_sets)}")
        test_spec, tuning = tune_scores(
            spec,
            forward,
            val_sets,
            val_outputs,
            train=train,
            head=head,
            batches=batches,
        )
    hparams, fitted = test_spec.score_hparams, {}
    if train is not None:
        say(f"fitting {', '.join(on_train)}")
        fitted = train.fit({n: hparams[n] for n in on_train}, forward, batches)
    if spec.fit_on_val:
        on_val = {n: hparams[n] for n in spec.fit_on_val}
        fitted.update(fit_scores(on_val, val_outputs[val_id.name]))
    return Fits(
        test_spec,
        fitted,
        train_used=None if train is None else train.images,
        train_outputs=None if train is None else train.outputs,
        val_id=val_id,
        val_ood=val_sets.get(val_ood.name) if val_ood is not None else None,
        tuning=tuning,
    )


def tuned_display(display: Mapping[str, str], tuning: Mapping[str, dict], names) -> dict[str, str]:
    """``display`` with ``(tuned)`` after the result keys of the tuned scores."""
    return {
        key: f"{label} (tuned)" if registered_score(key, names) in tuning else label
        for key, label in display.items()
    }
