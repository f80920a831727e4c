"""``run_evaluation``: a model, an ``EvalSpec`` and datasets in; the numbers and report out.

The stages (:mod:`ood_jax.evaluate.stages`), called in order: outputs (one forward
pass per dataset) -> fits (the fitted scores' statistics) -> scores -> protocols ->
report (:func:`write_report`: ``results.json``, ``results.md``, ``scores.npz`` and
PNG plots, written atomically, all or nothing).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx

from ood_jax import data as D
from ood_jax.evaluate import plots, report
from ood_jax.evaluate.forward import ForwardPass, ModelOutputs
from ood_jax.evaluate.scoring import fit_captured, fit_scores
from ood_jax.evaluate.spec import EvalSpec
from ood_jax.evaluate.stages import (
    ECE_BINS,
    ScoreTable,
    batch_maker,
    check_datasets,
    compute_outputs,
    compute_scores,
    diagnose,
    evaluate_protocols,
    head_weights,
    select_ood_sets,
    summarize_confidence,
)


@contextlib.contextmanager
def _stopwatch(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


def run_evaluation(
    model: nnx.Module,
    spec: EvalSpec,
    *,
    id_test: D.ImageDataset,
    ood_sets: Mapping[str, D.ImageDataset],
    train: D.ImageDataset | None = None,
    mesh: jax.sharding.Mesh | None = None,
    out_dir: str | os.PathLike | None = None,
    metrics_log_dir: str | os.PathLike | None = None,
    metadata: Mapping | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Evaluates ``model`` as ``spec`` says; returns the ``results.json`` dict.

    ``model(images) -> (logits, features)`` with ``model.head`` its final linear
    layer (switched to eval mode); ``id_test`` labelled; ``ood_sets`` name ->
    non-empty dataset; ``train`` the in-distribution training set (required by
    ``"fitted"`` scores); ``mesh`` with a ``"data"`` axis (default: all devices);
    ``out_dir``: write the report there, atomically; ``metrics_log_dir``: a training
    workdir whose ``metrics.jsonl`` gives the logit-norm curve; ``metadata`` is
    recorded in the results (``checkpoint``, ``model``, ``command``, ...);
    ``progress`` is called with a message before each stage (e.g. ``print``).
    """
    say = progress or (lambda message: None)
    check_datasets(spec, id_test, ood_sets, train)
    timings: dict[str, float] = {}
    head = head_weights(model)
    forward = ForwardPass(model, mesh=mesh)
    batches = batch_maker(spec, forward.num_shards)
    with _stopwatch(timings, "attack_s") if spec.adversarial_noise else contextlib.nullcontext():
        ood_sets = select_ood_sets(spec, ood_sets, forward, say)
    datasets = {id_test.name: id_test, **ood_sets}
    with _stopwatch(timings, "forward_s"):
        say(f"forward pass over {len(datasets)} datasets")
        outputs = compute_outputs(forward, datasets, batches=batches)
    train_used, train_outputs, fitted = None, None, {}
    if spec.fitted_scores:
        with _stopwatch(timings, "fit_s"):
            train_used = D.random_subset(train, spec.max_train, seed=spec.seed)
            say(f"fitting {', '.join(spec.fitted_scores)} on {len(train_used)} training images")
            train_outputs = forward(batches(train_used))
            fitted = fit_scores(spec.score_hparams, train_outputs)
            fitted.update(fit_captured(spec.score_hparams, forward, lambda: batches(train_used)))
    with _stopwatch(timings, "score_s"):
        say(f"scoring ({', '.join(spec.scores)})")
        scores = compute_scores(
            spec, forward, datasets, outputs, head=head, fitted=fitted, batches=batches
        )
    with _stopwatch(timings, "metrics_s"):
        say(f"metrics ({', '.join(spec.protocols)} protocol)")
        ood_results = evaluate_protocols(scores.groups, spec, num_id=len(id_test))
    id_confidence, calibration = summarize_confidence(outputs, id_test.name)
    geometry, diagnosed = diagnose(outputs, train_outputs, head, metrics_log_dir)
    results = {
        "checkpoint": {},
        "model": {},
        **dict(metadata or {}),
        "spec": spec.to_dict(),
        "data": _describe_data(spec, id_test, ood_sets, train_used),
        "scores": list(scores.id_scores),
        "score_display": scores.display,
        "score_hparams": spec.score_hparams,
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


def _describe_data(spec: EvalSpec, id_test, ood_sets, train) -> dict:
    """The ``data`` entry of ``results.json``: every dataset as evaluated."""

    def describe(ds) -> dict:
        return {"name": ds.name, "num_examples": len(ds), "source": ds.source or "arrays"}

    return {
        "id": describe(id_test),
        "ood": {name: describe(ds) for name, ds in ood_sets.items()},
        "train": None if train is None else describe(train),
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
    for field, title in (("feature_norm", "Feature norm ||z||"), ("cos_pred", "cos(z, w_pred)")):
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
