"""``run_evaluation``: a model, an ``EvalSpec`` and datasets in; the numbers and report out.

The stages (:mod:`ood_jax.evaluate.stages`), called in order: outputs (one forward
pass per dataset) -> fits (the fitted scores' statistics, after the optional search of
:mod:`ood_jax.evaluate.tuning` on a validation pair) -> scores -> protocols ->
report (:func:`write_report`: ``results.json``, ``results.md``, ``scores.npz`` and
PNG plots, written atomically, all or nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ood_jax import data as D
from ood_jax.evaluate import plots, report
from ood_jax.evaluate.adapters import (
    MODEL_NEEDS,
    as_classifier,
    capabilities,
    check_head,
    describe,
    servable_scores,
)
from ood_jax.evaluate.datasets import load_ood_sets
from ood_jax.evaluate.forward import ForwardPass, ModelOutputs
from ood_jax.evaluate.spec import EvalSpec
from ood_jax.evaluate.stages import (
    ECE_BINS,
    ScoreTable,
    batch_maker,
    check_datasets,
    check_id_test,
    compute_outputs,
    compute_scores,
    diagnose,
    evaluate_protocols,
    head_weights,
    select_ood_sets,
    summarize_confidence,
    without_non_finite,
)
from ood_jax.evaluate.tuning import Fits, fit_and_tune, tuned_display


@contextlib.contextmanager
def _stopwatch(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


# Eleven parameters: the spec holds every setting; each dataset role and output is its own.
def run_evaluation(
    model: Any,
    spec: EvalSpec,
    *,
    id_test: D.ImageDataset,
    ood_sets: Mapping[str, D.ImageDataset],
    train: D.ImageDataset | None = None,
    val_ood: D.ImageDataset | None = None,
    mesh: jax.sharding.Mesh | None = None,
    out_dir: str | os.PathLike | None = None,
    metrics_log_dir: str | os.PathLike | None = None,
    metadata: Mapping | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Evaluates ``model`` as ``spec`` says; returns the ``results.json`` dict.

    ``model``: an ood_jax model, or any model :func:`~ood_jax.evaluate.as_classifier`
    adapts (an NNX module is adapted as is; adapt a linen module or a function, or
    name a head, yourself first). Each of ``spec``'s scores that the model cannot
    serve (``Score.needs``: features, head, intermediates, dropout) is skipped with a
    warning and listed in the results' ``skipped_scores``. ``id_test`` labelled;
    ``ood_sets`` name -> non-empty dataset; ``train`` the in-distribution training set
    (required by ``"fitted"`` scores, and the ID validation images when ``spec.tune``
    or ``spec.fit_on_val``); ``val_ood`` the OOD validation set of ``spec.tune`` (none
    of the ``ood_sets``); ``mesh`` with a ``"data"`` axis (default: all devices);
    ``out_dir``: write the report there, atomically; ``metrics_log_dir``: a training
    workdir whose ``metrics.jsonl`` gives the logit-norm curve; ``metadata`` is
    recorded in the results (``checkpoint``, ``model``, ``command``, ...);
    ``progress`` is called with a message before each stage (e.g. ``print``).
    """
    say = progress or (lambda message: None)
    model = as_classifier(model)
    check_id_test(id_test)
    caps = capabilities(model, id_test.images.shape[1:], id_test.num_classes)
    spec, skipped = _servable_spec(spec, caps, model)
    check_datasets(spec, id_test, ood_sets, train, val_ood)
    timings: dict[str, float] = {}
    head = head_weights(model, required=False)
    forward = ForwardPass(model, mesh=mesh)
    batches = batch_maker(spec, forward.num_shards)
    with _stopwatch(timings, "attack_s") if spec.adversarial_noise else contextlib.nullcontext():
        ood_sets = select_ood_sets(spec, ood_sets, forward, say)
    datasets = {id_test.name: id_test, **ood_sets}
    with _stopwatch(timings, "forward_s"):
        say(f"forward pass over {len(datasets)} datasets")
        outputs = compute_outputs(forward, datasets, batches=batches)
    check_head(model, outputs[id_test.name].logits, outputs[id_test.name].features)
    fits = Fits(spec)
    if spec.fitted_scores or spec.uses_val:
        with _stopwatch(timings, "fit_s"):
            fits = fit_and_tune(spec, train, val_ood, forward, batches=batches, head=head, say=say)
    with _stopwatch(timings, "score_s"):
        say(f"scoring ({', '.join(spec.scores)})")
        scores = compute_scores(
            fits.spec, forward, datasets, outputs, head=head, fitted=fits.fitted, batches=batches
        )
    scores, undefined = without_non_finite(scores, spec.scores)
    if undefined:
        spec, fits = _drop_scores(spec, fits, undefined, scores)
        skipped = {**skipped, **undefined}
    with _stopwatch(timings, "metrics_s"):
        say(f"metrics ({', '.join(spec.protocols)} protocol)")
        ood_results = evaluate_protocols(scores.groups, spec, num_id=len(id_test))
    id_confidence, calibration = summarize_confidence(outputs, id_test.name)
    geometry, diagnosed = diagnose(outputs, fits.train_outputs, head, metrics_log_dir)
    results = {
        "checkpoint": {},
        "model": {"name": type(model).__name__, "description": describe(model)},
        **dict(metadata or {}),
        "model_capabilities": sorted(caps),
        "skipped_scores": {**dict((metadata or {}).get("skipped_scores") or {}), **skipped},
        "spec": spec.to_dict(),
        "data": _describe_data(spec, id_test, ood_sets, fits),
        "scores": list(scores.id_scores),
        "score_display": tuned_display(scores.display, fits.tuning, spec.scores),
        "score_hparams": fits.spec.score_hparams,
        "tuning": fits.tuning or None,
        "protocol_options": spec.protocol_options(),
        "image_score_examples": scores.image_examples or None,
        **calibration,
        "ood": ood_results,
        "diagnostics": diagnosed,
        "timings": timings,
    }
    if out_dir is not None:
        results["report_dir"] = os.path.abspath(os.fspath(out_dir))
        say(f"writing the report to {results['report_dir']}")
        write_report(
            os.fspath(out_dir),
            results,
            spec=spec,
            scores=scores,
            geometry=geometry,
            id_outputs=outputs[id_test.name],
            id_confidence=id_confidence,
        )
    return results


#: What a user's model receives (``evaluate_model(inputs=...)``): the evaluation's
#: ``(mean, std)``, images being ``(pixels / 255 - mean) / std``.
INPUTS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "pixels": ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)),  # 0..255, as stored
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # 0..1
}


def evaluate_model(
    model: Any,
    variables: Any = None,
    *,
    id_test: D.ImageDataset | str,
    ood_sets: Mapping[str, D.ImageDataset] | Sequence[str],
    id_train: D.ImageDataset | str | None = None,
    scores: Sequence[str] | None = None,
    head: Any = None,
    apply_kwargs: Mapping | None = None,
    inputs: str | tuple[Sequence[float], Sequence[float]] = "pixels",
    name: str | None = None,
    out_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> dict:
    """The whole evaluation of any JAX classifier in one call; returns ``results.json``'s dict.

    ``model``, ``variables``, ``head``, ``apply_kwargs``, ``name``: as
    :func:`~ood_jax.evaluate.as_classifier` (an NNX module, a linen module with its
    variables, a function; ``head`` names the final linear layer or gives its
    weights). Every score in ``scores`` (default: every registered one) that the
    model can serve is computed; each other one is skipped with a one-line warning
    naming what it needs, and listed in the results' ``skipped_scores`` (so are the
    fitted scores when no ``id_train`` is given).

    Args:
      id_test: the labelled in-distribution test set, or a dataset name
        (``"cifar10"``, ``"cifar10_jpeg"``: its test split, ``ood_jax.data.load_dataset``).
      ood_sets: ``{name: ImageDataset}``, or names for ``load_ood_sets`` (offline
        sets, synthetic noise).
      id_train: the in-distribution training set (or a name: its train split), for
        the fitted scores (Mahalanobis, KNN, ...).
      inputs: what the model receives, float32 NHWC: ``"pixels"`` (default) the
        pixel values as the dataset stores them, 0 to 255, so that the model's own
        preprocessing applies; ``"unit"`` them divided by 255; or ``(mean, std)``
        per channel in [0, 1] units, for ``(pixels / 255 - mean) / std``.
      out_dir: write the report (``results.md``, ``results.json``, plots) there.
      data_dir: the offline data folder for names (default ``$OOD_JAX_DATA_DIR``).
      progress: called with a message before each stage (e.g. ``print``).
      **options: :class:`EvalSpec` fields (``protocols``, ``convention``,
        ``max_train``, ``max_ood``, ``batch_size``, ``score_hparams``,
        ``adversarial_noise``, ...).
    """
    if isinstance(inputs, str):
        if inputs not in INPUTS:
            raise ValueError(
                f"inputs: expected one of {list(INPUTS)} or (mean, std), got {inputs!r}."
            )
        mean, std = INPUTS[inputs]
    else:
        mean, std = inputs
    for field in ("mean", "std", "scores"):
        if field in options:
            raise ValueError(f"{field}: give it as evaluate_model's own argument, not an option.")
    if isinstance(id_test, str):
        id_test = D.load_dataset(id_test, "test", data_dir=data_dir)
    if isinstance(id_train, str):
        id_train = D.load_dataset(id_train, "train", data_dir=data_dir)
    if not isinstance(ood_sets, Mapping):
        ood_sets = load_ood_sets(list(ood_sets), data_dir=data_dir, id_test=id_test)
    adapted = as_classifier(model, variables, head=head, apply_kwargs=apply_kwargs, name=name)
    spec = EvalSpec(scores=scores, mean=mean, std=std, **options)
    skipped: dict[str, str] = {}
    if id_train is None:
        every = frozenset(MODEL_NEEDS)
        spec, skipped = _servable_spec(spec, every, adapted, has_train=False)
    metadata = {
        "model": {
            "name": getattr(adapted, "label", None) or type(adapted).__name__,
            "description": describe(adapted),
            "inputs": inputs if isinstance(inputs, str) else {"mean": mean, "std": std},
        },
        "checkpoint": {},
        "skipped_scores": skipped,
    }
    return run_evaluation(
        adapted,
        spec,
        id_test=id_test,
        ood_sets=ood_sets,
        train=id_train,
        out_dir=out_dir,
        metadata=metadata,
        progress=progress,
    )


def _servable_spec(
    spec: EvalSpec, caps: frozenset, model, *, has_train: bool = True
) -> tuple[EvalSpec, dict[str, str]]:
    """``spec`` without the scores the model cannot serve, and ``{skipped: why}``; each
    skipped one warned about on one line."""
    kept, skipped = servable_scores(spec.scores, caps, has_train=has_train)
    for name, why in skipped.items():
        warnings.warn(f"scores: skipping {name!r}: it {why}.", stacklevel=_caller_level())
    if not kept:
        raise ValueError(
            f"scores: the model ({describe(model)}) can serve none of {list(spec.scores)}: "
            + "; ".join(f"{n} {why}" for n, why in skipped.items())
        )
    return (spec.with_scores(kept) if skipped else spec), skipped


def _drop_scores(
    spec: EvalSpec, fits: Fits, undefined: Mapping[str, str], scores: ScoreTable
) -> tuple[EvalSpec, Fits]:
    """``spec`` and ``fits`` without the scores of ``undefined`` (each warned about on
    one line); an error naming them all when none is left."""
    kept = [name for name in spec.scores if name not in undefined]
    if not kept or not scores.groups:
        raise ValueError(
            "scores: every score gave NaN or infinite values, metrics are undefined: "
            + "; ".join(f"{n} {why}" for n, why in undefined.items())
            + ". Drop those examples, or check the model's outputs."
        )
    for name, why in undefined.items():
        warnings.warn(f"scores: skipping {name!r}: it {why}.", stacklevel=_caller_level())
    tuning = {name: record for name, record in fits.tuning.items() if name not in undefined}
    fits = dataclasses.replace(fits, spec=fits.spec.with_scores(kept), tuning=tuning)
    return spec.with_scores(kept), fits


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside ood_jax (the user's call)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _describe_data(spec: EvalSpec, id_test, ood_sets, fits: Fits) -> dict:
    """The ``data`` entry of ``results.json``: every dataset as evaluated."""

    def describe(ds) -> dict | None:
        if ds is None:
            return None
        return {"name": ds.name, "num_examples": len(ds), "source": ds.source or "arrays"}

    return {
        "id": describe(id_test),
        "ood": {name: describe(ds) for name, ds in ood_sets.items()},
        "train": describe(fits.train_used),
        "val_id": describe(fits.val_id),
        "val_ood": describe(fits.val_ood),
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
    }


SCORES_FILE = "scores.npz"


def _save_scores(path: str, scores: ScoreTable, geometry, id_outputs: ModelOutputs) -> None:
    """Every example's scores next to the report (float32), for plots and studies that
    compare runs: ``id/<score>``, ``ood/<set>/<score>``, ``geometry/<set>/<quantity>``
    (``feature_norm``, ``cos_pred``, ...) and ``id/labels``, ``id/predictions``."""
    arrays = {f"id/{key}": np.asarray(v, np.float32) for key, v in scores.id_scores.items()}
    for name, per_score in scores.ood_scores.items():
        arrays.update(
            {f"ood/{name}/{key}": np.asarray(v, np.float32) for key, v in per_score.items()}
        )
    for name, fields in geometry.items():
        where = "id" if name == scores.id_name else name
        for field, values in fields.items():
            arrays[f"geometry/{where}/{field}"] = np.asarray(values, np.float32)
    arrays["id/labels"] = np.asarray(id_outputs.labels, np.int32)
    arrays["id/predictions"] = np.argmax(id_outputs.logits, axis=-1).astype(np.int32)
    np.savez_compressed(path, **arrays)


def write_report(
    out_dir: str,
    results: dict,
    *,
    spec: EvalSpec,
    scores: ScoreTable,
    geometry: Mapping[str, Mapping[str, np.ndarray]],
    id_outputs: ModelOutputs,
    id_confidence: np.ndarray,
) -> None:
    """The report, written into a temporary directory renamed to ``out_dir``.

    ``id_confidence``: the in-distribution test set's maximum softmax probabilities.
    """
    with report.atomic_directory(out_dir) as tmp:
        written: list[str] = []
        if spec.plots:
            os.makedirs(os.path.join(tmp, "plots"))

            def path(name: str) -> str:
                written.append(f"plots/{name}")
                return os.path.join(tmp, "plots", name)

            _plot(results, spec, scores, geometry, id_outputs, id_confidence, path)
        _save_scores(os.path.join(tmp, SCORES_FILE), scores, geometry, id_outputs)
        results["plots"] = written
        results["complete"] = True
        report.write_json(results, os.path.join(tmp, "results.json"))
        with open(os.path.join(tmp, "results.md"), "w") as f:
            f.write(report.markdown_report(results))


def _plot(results, spec, scores, geometry, id_outputs, id_confidence, path) -> None:
    """Writes the report's PNGs to ``path(file name)``."""
    id_scores, ood_scores, id_name = scores.id_scores, scores.ood_scores, scores.id_name
    plot_scores = list(id_scores) if spec.plot_scores is None else list(spec.plot_scores)
    unknown = [key for key in plot_scores if key not in id_scores]
    if unknown:
        raise ValueError(f"plot_scores: {unknown} are not among the scores {list(id_scores)}.")
    first = next(iter(results["ood"].values()))["metrics"]
    for key in plot_scores:
        per_set = {name: ood_scores[name][key] for name in ood_scores}
        label = results["score_display"].get(key, key)
        plots.score_histograms(
            id_scores[key], per_set, path(f"hist_{key}.png"), score_name=label, id_name=id_name
        )
        aurocs = {name: first[key][name]["auroc"]["mean"] for name in ood_scores}
        plots.roc_curves(
            id_scores[key], per_set, path(f"roc_{key}.png"), score_name=label, aurocs=aurocs
        )
    plots.reliability_diagram(
        id_confidence,
        np.argmax(id_outputs.logits, axis=-1) == id_outputs.labels,
        path("reliability.png"),
        ece=results["classification"]["ece"],
        num_bins=ECE_BINS,
    )
    ood_geometry = {name: fields for name, fields in geometry.items() if name != id_name}
    titles = {"feature_norm": "Feature norm ||z||", "cos_pred": "cos(z, w_pred)"}
    for field, title in titles.items() if geometry else ():
        plots.distribution_plot(
            geometry[id_name][field],
            {name: fields[field] for name, fields in ood_geometry.items()},
            path(f"{field}.png"),
            title=f"{title}: ID vs OOD",
            id_name=id_name,
        )
    curves = results["diagnostics"]["logit_norm_curve"]
    if curves:
        plots.logit_norm_plot(curves, path("logit_norm.png"))
