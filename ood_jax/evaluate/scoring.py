"""Stages 2 and 3 of the evaluation: fitted statistics, then scores.

Every score comes from the registry (:mod:`ood_jax.scores.registry`) and is
computed by the stage of its kind; each stage takes the scores of its kind among
those it is given and passes over the others:

- :func:`fit_scores`: the statistics of the scores fitted on the training set's
  cached outputs (:func:`fitted_on_outputs`; host, float64 where it matters), and
  :func:`fit_captured`: those streamed over a capturing pass (:func:`fitted_on_captures`);
- :func:`score_outputs`: the array scores (:class:`~ood_jax.scores.ArrayScore`, a
  :class:`~ood_jax.scores.FittedScore` too) from the cached logits and features of
  all datasets at once (one jitted call per score; a swept hyperparameter such as
  the temperature of MSP and energy is vmapped);
- :func:`score_images`: the image scores (:class:`~ood_jax.scores.ImageScore`: ODIN,
  MC dropout) from the images through the model, on seeded subsets when a
  ``max_examples`` budget is set; a stochastic one is skipped on a model without
  dropout (:func:`runs_on`);
- :func:`score_activations`: the activation scores
  (:class:`~ood_jax.scores.ActivationScore`: ASH and SCALE on the feature map,
  RankFeat) in one more forward pass per dataset that captures the intermediates
  they name; skipped (no pass) when none is chosen.

Hyperparameters are resolved once by :func:`ood_jax.scores.resolve_hparams`
(``{score: {name: value}}``) and passed to every stage.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import jax
import numpy as np

from ood_jax import data as D
from ood_jax.evaluate.forward import ForwardPass, ModelOutputs
from ood_jax.evaluate.protocol import dataset_seeds
from ood_jax.scores.registry import (
    ActivationScore,
    ArrayScore,
    FittedScore,
    Head,
    ImageScore,
    ModelScore,
    Score,
    compute,
    get_score,
)


def fitted_on_captures(score: Score) -> bool:
    """Whether ``score`` is fitted by :func:`fit_captured`: a fitted
    :class:`~ood_jax.scores.ModelScore` with captures (Gram, MDSEns)."""
    return isinstance(score, ModelScore) and score.fitted and bool(score.captures)


def fitted_on_outputs(score: Score) -> bool:
    """Whether ``score`` is fitted by :func:`fit_scores` on the training outputs: a
    :class:`~ood_jax.scores.FittedScore`, or a fitted image score without captures."""
    return score.fitted and not fitted_on_captures(score)


def runs_on(score: Score, forward: ForwardPass) -> bool:
    """Whether the model of ``forward`` can compute ``score``: not for a stochastic
    image score on a model without dropout (:func:`score_images` skips it)."""
    return not (isinstance(score, ImageScore) and score.stochastic) or forward.has_dropout()


def fit_scores(hparams: Mapping[str, Mapping], train: ModelOutputs) -> dict[str, object]:
    """``{score: fitted params}`` for the scores among ``hparams``' keys fitted on the
    training outputs (:func:`fitted_on_outputs`)."""
    names = [n for n in hparams if fitted_on_outputs(get_score(n))]
    if names and (train.labels < 0).any():
        raise ValueError(
            "train: fitted scores need labelled training outputs, found label -1; "
            "pass the in-distribution training set."
        )
    return {
        n: get_score(n).fit(train.logits, train.features, train.labels, **hparams[n]) for n in names
    }


def fit_captured(
    hparams: Mapping[str, Mapping], forward: ForwardPass, batches: Callable[[], object]
) -> dict[str, object]:
    """``{score: fitted params}`` for the fitted scores with captures among ``hparams``.

    Each streams over one capturing pass of the training set (``batches()`` yields
    its labelled batches): ``fit(((fit_features(out), labels) per batch), **hparams)``.
    """
    fitted = {}
    for name, hp in hparams.items():
        score = get_score(name)
        if not fitted_on_captures(score):
            continue

        def features(out, to_logits, score=score, hp=hp):
            return score.fit_features(out, **hp)

        stream = forward.iter_captured(features, score.captures, batches())
        fitted[name] = score.fit(_labelled(stream, name), **hp)
    return fitted


def _labelled(stream, name: str):
    for values, labels in stream:
        if (labels < 0).any():
            raise ValueError(
                f"train: {name!r} is fitted on labelled training batches, found label -1; "
                "pass the in-distribution training set."
            )
        yield values, labels


def score_outputs(
    hparams: Mapping[str, Mapping],
    outputs: Mapping[str, ModelOutputs],
    *,
    head: Head,
    fitted: Mapping[str, object] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{dataset: {result key: float32 [N]}}`` for the array scores in ``hparams``.

    The datasets' cached outputs are concatenated so every score is one call.
    """
    fitted = {} if fitted is None else fitted
    datasets = list(outputs)
    splits = np.cumsum([len(outputs[name]) for name in datasets])[:-1]
    logits = jax.numpy.asarray(np.concatenate([outputs[name].logits for name in datasets]))
    features = jax.numpy.asarray(np.concatenate([outputs[name].features for name in datasets]))
    flat: dict[str, np.ndarray] = {}
    for name, hp in hparams.items():
        score = get_score(name)
        if not isinstance(score, ArrayScore):
            continue
        if isinstance(score, FittedScore) and name not in fitted:
            raise ValueError(
                f"scores: {name!r} needs fitted statistics; pass the training outputs to "
                "fit_scores first."
            )
        flat.update(compute(score, hp, logits, features, head, fitted.get(name)))
    result: dict[str, dict[str, np.ndarray]] = {name: {} for name in datasets}
    for key, values in flat.items():
        for dataset, part in zip(datasets, np.split(values, splits), strict=True):
            result[dataset][key] = part
    return result


def score_images(
    hparams: Mapping[str, Mapping],
    forward: ForwardPass,
    datasets: Mapping[str, D.ImageDataset],
    *,
    batches: Callable[[D.ImageDataset], object],
    std,
    seed: int,
    fitted: Mapping[str, object] | None = None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, int]]]:
    """The image scores among ``hparams``: ``({dataset: {key: [n]}}, sizes)``.

    ``sizes[score][dataset]`` is the number of images scored (a seeded subset of
    ``max_examples`` images when that budget is set, drawn with
    :func:`dataset_seeds`). ``batches(dataset)`` yields padded, normalized batches.
    ``fitted``: the params of the fitted ones (:func:`fit_scores`, :func:`fit_captured`).
    """
    scores: dict[str, dict[str, np.ndarray]] = {name: {} for name in datasets}
    sizes: dict[str, dict[str, int]] = {}
    for name, hp in hparams.items():
        score = get_score(name)
        if not isinstance(score, ImageScore):
            continue
        if not runs_on(score, forward):
            warnings.warn(
                f"scores: skipping {name!r}: the model has no dropout layer with rate > 0 "
                "(build it with dropout, e.g. the WRN-40-2 preset or "
                "model.options.dropout_rate=0.3, to score it).",
                stacklevel=2,
            )
            continue
        run = _image_runner(name, hp, forward, std, _params(fitted, score))
        sizes[name] = {}
        for dataset, ds in datasets.items():
            if isinstance(ds, D.ImageDataset):
                subset = D.random_subset(
                    ds, hp.get("max_examples"), seed=dataset_seeds(seed, dataset)
                )
            else:  # FloatImages (i.i.d. attacked noise): its first images
                subset = ds.head(hp.get("max_examples"))
            scores[dataset][name] = run(batches(subset)).astype(np.float32)
            sizes[name][dataset] = len(subset)
    return scores, sizes


def _params(fitted, score) -> tuple:
    """``(params,)`` of a fitted score (an error when missing), ``()`` for the others."""
    if not score.fitted:
        return ()
    if fitted is None or score.name not in fitted:
        raise ValueError(
            f"scores: {score.name!r} needs fitted statistics; fit it on the training set "
            "first (fit_scores / fit_captured)."
        )
    return (fitted[score.name],)


def _image_runner(name: str, hparams: Mapping, forward: ForwardPass, std, lead: tuple) -> Callable:
    """``run(batches) -> [N]`` of one image score (its dropout passes if stochastic;
    ``lead``: its fitted params, which then get ``apply_out`` instead of ``apply_logits``)."""
    score, kwargs = get_score(name), dict(hparams)
    if lead:

        def fitted_fn(apply_out, images):
            return score.fn(*lead, apply_out, images, std, **kwargs)

        return lambda batches: forward.map_batches(fitted_fn, batches, capture=score.captures)
    if score.stochastic:

        def stochastic(apply_dropout, images, key):
            return score.fn(apply_dropout, images, std, key, **kwargs)

        return lambda batches: forward.map_stochastic(stochastic, batches, seed=kwargs["seed"])
    fn = image_score_fn(name, hparams, std=std)
    return lambda batches: forward.map_batches(fn, batches)


def image_score_fn(name: str, hparams: Mapping, *, std) -> Callable:
    """``fn(apply_logits, images) -> [B]`` of an image score ``name`` that is
    neither fitted nor stochastic (ODIN): what :func:`score_images` maps over a dataset
    with :meth:`ForwardPass.map_batches`."""
    score, kwargs = get_score(name), dict(hparams)

    def fn(apply_logits, images):
        return score.fn(apply_logits, images, std, **kwargs)

    return fn


def score_activations(
    hparams: Mapping[str, Mapping],
    forward: ForwardPass,
    datasets: Mapping[str, object],
    *,
    batches: Callable[[object], object],
    fitted: Mapping[str, object] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{dataset: {result key: float32 [N]}}`` of the activation scores in ``hparams``.

    All of them share one forward pass per dataset capturing the union of their
    intermediates; a swept hyperparameter is vmapped inside it. No pass when none is
    chosen. ``fitted``: the params of the fitted ones (:func:`fit_captured`).
    """
    chosen = [get_score(n) for n in hparams if isinstance(get_score(n), ActivationScore)]
    if not chosen:
        return {name: {} for name in datasets}
    capture = tuple(sorted({c for score in chosen for c in score.captures}))
    fn = _batch_scores(chosen, hparams, {score.name: _params(fitted, score) for score in chosen})
    return {
        name: {
            k: v.astype(np.float32)
            for k, v in forward.map_captured(fn, capture, batches(ds)).items()
        }
        for name, ds in datasets.items()
    }


def _batch_scores(chosen, hparams, leads) -> Callable:
    """``fn(out, to_logits) -> {result key: [B]}`` for every chosen activation score
    (``leads[name]``: ``(params,)`` of a fitted one, else ``()``)."""

    def fn(out, to_logits):
        result = {}
        for score in chosen:
            hp, lead = hparams[score.name], leads[score.name]
            fixed = {k: v for k, v in hp.items() if k != score.sweep}
            if score.sweep is None:
                result[score.name] = score.fn(*lead, out, to_logits, **fixed)
                continue
            values = tuple(hp[score.sweep])
            swept = jax.vmap(
                lambda v, s=score, f=fixed, p=lead: s.fn(*p, out, to_logits, **f, **{s.sweep: v})
            )(jax.numpy.asarray(values, jax.numpy.float32))
            result.update({score.key(v): swept[i] for i, v in enumerate(values)})
        return result

    return fn
