"""``run_evaluation``: a model and datasets in, every number and the report out.

Steps (each a plain function of the previous step's arrays):

1. one forward pass per dataset (:class:`ForwardPass`): ID test set, every
   OOD set, and the training set when a fitted score needs it;
2. test accuracy, ECE (15 bins) and reliability bins from the ID logits;
3. all scores from the cached outputs (:func:`score_outputs`), ODIN from
   images (:meth:`ForwardPass.map_batches`);
4. OOD metrics under each protocol (:func:`evaluate_ood`);
5. diagnostics (:mod:`ood_jax.evaluate.diagnostics`);
6. if ``out_dir`` is given: ``results.json``, ``results.md`` and PNG plots,
   written atomically (all or nothing).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
from flax import nnx

from ood_jax import data as D
from ood_jax import metrics as M
from ood_jax.evaluate import diagnostics, plots, report
from ood_jax.evaluate.forward import ForwardPass, ModelOutputs
from ood_jax.evaluate.protocol import PROTOCOLS, evaluate_ood
from ood_jax.evaluate.sweep import (
    FITTED_SCORES,
    ScoreSettings,
    check_score_names,
    display_name,
    fit_scores,
    make_odin_fn,
    score_outputs,
)

#: Scores computed when the caller does not choose: every score of ood_jax.scores.
DEFAULT_SCORES: tuple[str, ...] = (
    "msp",
    "max_logit",
    "energy",
    "neg_entropy",
    "feature_norm",
    "odin",
    "gradnorm",
    "mahalanobis",
    "knn",
    "gmm",
    "react",
)
ECE_BINS = 15


def head_weights(model: nnx.Module) -> tuple[np.ndarray, np.ndarray | None]:
    """``(kernel [D, K], bias [K] or None)`` of ``model.head`` as NumPy arrays."""
    head = getattr(model, "head", None)
    if head is None or not hasattr(head, "kernel"):
        raise ValueError(
            "model: expected the final linear layer as `model.head` (an nnx.Linear with "
            "`kernel` [D, K]); see docs/architecture.md."
        )
    kernel = np.asarray(head.kernel[...], np.float32)
    bias = getattr(head, "bias", None)
    return kernel, None if bias is None else np.asarray(bias[...], np.float32)


def _check_datasets(id_test: D.ImageDataset, ood_sets: Mapping[str, D.ImageDataset]) -> None:
    if not isinstance(id_test, D.ImageDataset):
        raise ValueError(f"id_test: expected an ood_jax.data.ImageDataset, got {type(id_test)}.")
    if (id_test.labels < 0).any():
        raise ValueError(
            f"id_test ({id_test.name!r}): the in-distribution test set must be labelled "
            "(accuracy and calibration need labels)."
        )
    if not ood_sets:
        raise ValueError("ood_sets: no OOD sets given; pass at least one (name -> ImageDataset).")
    if id_test.name in ood_sets:
        raise ValueError(
            f"ood_sets: an OOD set has the same name as the in-distribution test set "
            f"({id_test.name!r}); rename it so the report can tell them apart."
        )
    for name, ds in ood_sets.items():
        if not isinstance(ds, D.ImageDataset) or len(ds) == 0:
            raise ValueError(f"ood_sets[{name!r}]: expected a non-empty ImageDataset, got {ds!r}.")


def _describe(ds: D.ImageDataset) -> dict:
    return {"name": ds.name, "num_examples": len(ds), "source": ds.source or "arrays"}


def run_evaluation(
    model: nnx.Module,
    *,
    id_test: D.ImageDataset,
    ood_sets: Mapping[str, D.ImageDataset],
    train: D.ImageDataset | None = None,
    scores: Sequence[str] = DEFAULT_SCORES,
    protocols: Sequence[str] = PROTOCOLS,
    convention: str = "hendrycks",
    settings: ScoreSettings | None = None,
    num_ood: int | None = None,
    num_draws: int = 10,
    seed: int = 0,
    max_train: int | None = None,
    max_ood: int | None = None,
    batch_size: int = 256,
    mesh=None,
    out_dir: str | os.PathLike | None = None,
    metrics_log_dir: str | os.PathLike | None = None,
    metadata: Mapping | None = None,
    make_plots: bool = True,
    plot_scores: Sequence[str] | None = None,
) -> dict:
    """Evaluates ``model`` as the papers do; returns the ``results.json`` dict.

    Args:
      model: NNX classifier, ``model(images) -> (logits, features)``, with
        ``model.head`` its final linear layer. Switched to eval mode.
      id_test: labelled in-distribution test set (e.g. CIFAR-10 test).
      ood_sets: OOD set name -> dataset (each non-empty).
      train: in-distribution training set; required by the fitted scores
        (Mahalanobis, KNN, GMM, ReAct).
      scores: names from ``ood_jax.evaluate.SCORE_NAMES``.
      protocols: any of ``"papers"`` (2,000 OOD examples per draw, 10 draws)
        and ``"full"``.
      convention: ``"hendrycks"`` (default) or ``"openood"``.
      settings: score hyperparameters (temperature sweep, ODIN's T and eps, ...).
      num_ood, num_draws, seed: the papers' protocol (default ``N_id // 5``, 10, 0).
      max_train: fit the fitted scores on a seeded random subset of at most this
        many training images (None = all), e.g. to keep a CPU run short.
      max_ood: evaluate each OOD set on a seeded random subset of at most this
        many images (None = all; recorded in the set's ``source``). The papers'
        protocol then draws from that subset, the full-set protocol uses all of it.
      batch_size: forward-pass batch size (padded to a multiple of the devices).
      mesh: device mesh with a ``"data"`` axis (default: all devices).
      out_dir: if given, write ``results.json``, ``results.md`` and ``plots/*.png``
        there, atomically.
      metrics_log_dir: a training workdir whose ``metrics.jsonl`` gives the
        logit-norm-over-training curve.
      metadata: recorded under ``results`` (e.g. ``checkpoint``, ``model``,
        ``config``, ``command``).
      make_plots: write PNG plots with the report.
      plot_scores: score keys that get a histogram and a ROC plot (default: all).

    Returns:
      The results dict (see ``results.json``): classification, OOD metrics per
      protocol, diagnostics, data sources, settings, seeds and timings.
    """
    settings = ScoreSettings() if settings is None else settings
    names = check_score_names(scores)
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"protocols: {p!r} is not one of {PROTOCOLS}.")
    if not protocols:
        raise ValueError(f"protocols: choose at least one of {PROTOCOLS}.")
    _check_datasets(id_test, ood_sets)
    ood_sets = {k: D.random_subset(v, max_ood, seed=seed) for k, v in ood_sets.items()}
    needs_train = any(n in FITTED_SCORES for n in names)
    if needs_train and train is None:
        raise ValueError(
            f"train: scores {[n for n in names if n in FITTED_SCORES]} are fitted on the "
            "in-distribution training set; pass train= or drop them from scores."
        )
    timings: dict[str, float] = {}
    kernel, bias = head_weights(model)
    forward = ForwardPass(model, mesh=mesh)

    def batches(ds: D.ImageDataset):
        return D.eval_batches(ds, batch_size=batch_size, process_index=0, process_count=1)

    t0 = time.perf_counter()
    datasets = {"id": id_test, **{f"ood/{k}": v for k, v in ood_sets.items()}}
    outputs: dict[str, ModelOutputs] = {key: forward(batches(ds)) for key, ds in datasets.items()}
    timings["forward_s"] = time.perf_counter() - t0
    train_used = None
    fitted: dict = {}
    if needs_train:
        t0 = time.perf_counter()
        train_used = D.random_subset(train, max_train, seed=seed)
        train_outputs = forward(batches(train_used))
        timings["forward_train_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fitted = fit_scores(names, train_outputs, settings=settings)
        timings["fit_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scored = score_outputs(
        names, outputs, head_kernel=kernel, head_bias=bias, settings=settings, fitted=fitted
    )
    timings["score_s"] = time.perf_counter() - t0
    # ODIN needs a gradient pass over images; on a CPU it may run on seeded subsets of
    # every dataset (settings.odin_max_examples), so it is kept apart from the cache.
    odin: dict[str, np.ndarray] = {}
    odin_sizes: dict[str, int] = {}
    if "odin" in names:
        t0 = time.perf_counter()
        odin_fn = make_odin_fn(settings)
        for key, ds in datasets.items():
            subset = D.random_subset(ds, settings.odin_max_examples, seed=seed)
            odin[key] = forward.map_batches(odin_fn, batches(subset))
            odin_sizes[key] = len(subset)
        timings["odin_s"] = time.perf_counter() - t0

    id_out = outputs["id"]
    confidence = np.max(_softmax(id_out.logits), axis=-1)
    correct = np.argmax(id_out.logits, axis=-1) == id_out.labels
    bins = plots.reliability_bins(confidence, correct.astype(np.float64), num_bins=ECE_BINS)
    classification = {
        "accuracy": M.accuracy(id_out.logits, id_out.labels),
        "ece": M.expected_calibration_error(id_out.logits, id_out.labels, num_bins=ECE_BINS),
        "num_bins": ECE_BINS,
        "reliability": {k: v.tolist() for k, v in bins.items()},
        "mean_logit_norm": float(np.linalg.norm(id_out.logits, axis=-1).mean()),
    }

    ood_names = [k[len("ood/") :] for k in datasets if k != "id"]
    groups = [(scored["id"], {n: scored[f"ood/{n}"] for n in ood_names})]
    if odin:
        groups.append(({"odin": odin["id"]}, {n: {"odin": odin[f"ood/{n}"]} for n in ood_names}))
    t0 = time.perf_counter()
    ood_results = {}
    for p in protocols:
        # Same seeds and draw size for every group, so unsubsampled ODIN gets the
        # very draws it would get scored together with the cached scores.
        parts = [
            evaluate_ood(
                ids,
                oods,
                protocol=p,
                num_ood=max(len(id_test) // 5, 1) if num_ood is None else num_ood,
                num_draws=num_draws,
                seed=seed,
                convention=convention,
            )
            for ids, oods in groups
            if ids
        ]
        merged = parts[0]
        for extra in parts[1:]:
            merged["metrics"].update(extra["metrics"])
            if extra["draws"] != merged["draws"]:
                merged["odin_draws"] = extra["draws"]
        ood_results[p] = merged
    timings["metrics_s"] = time.perf_counter() - t0
    id_scores = {**scored["id"], **({"odin": odin["id"]} if odin else {})}
    ood_scores = {
        n: {**scored[f"ood/{n}"], **({"odin": odin[f"ood/{n}"]} if odin else {})} for n in ood_names
    }

    geometry = {
        key[len("ood/") :] if key != "id" else id_test.name: diagnostics.feature_geometry(
            out.logits, out.features, kernel
        )
        for key, out in outputs.items()
    }
    curves = diagnostics.logit_norm_curve(
        diagnostics.read_metrics_log(os.fspath(metrics_log_dir)) if metrics_log_dir else []
    )
    results = {
        **dict(metadata or {}),
        "data": {
            "id": _describe(id_test),
            "ood": {k: _describe(v) for k, v in ood_sets.items()},
            "train": None if train_used is None else _describe(train_used),
        },
        "scores": list(id_scores),
        "settings": dataclasses.asdict(settings),
        "protocol_options": {
            "num_ood": num_ood,
            "num_draws": num_draws,
            "seed": seed,
            "convention": convention,
            "max_train": max_train,
            "max_ood": max_ood,
        },
        "odin_examples": odin_sizes or None,
        "classification": classification,
        "ood": ood_results,
        "diagnostics": {
            "weights": diagnostics.weight_diagnostics(kernel, bias),
            "features": {
                name: {k: diagnostics.summarize(v) for k, v in g.items()}
                for name, g in geometry.items()
            },
            "logit_norm_curve": curves,
        },
        "timings": timings,
    }
    results.setdefault("checkpoint", {})
    results.setdefault("model", {})
    if out_dir is not None:
        results["report_dir"] = os.path.abspath(os.fspath(out_dir))
        _write_report(
            os.fspath(out_dir),
            results,
            id_scores=id_scores,
            ood_scores=ood_scores,
            geometry=geometry,
            id_name=id_test.name,
            confidence=confidence,
            correct=correct,
            make_plots=make_plots,
            plot_scores=list(id_scores) if plot_scores is None else list(plot_scores),
        )
    return results


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _write_report(
    out_dir: str,
    results: dict,
    *,
    id_scores: Mapping[str, np.ndarray],
    ood_scores: Mapping[str, Mapping[str, np.ndarray]],
    geometry: Mapping[str, Mapping[str, np.ndarray]],
    id_name: str,
    confidence: np.ndarray,
    correct: np.ndarray,
    make_plots: bool,
    plot_scores: Sequence[str],
) -> None:
    """Writes the report into a temporary directory, renamed to ``out_dir`` at the end."""
    with report.atomic_directory(out_dir) as tmp:
        written: list[str] = []
        if make_plots:
            os.makedirs(os.path.join(tmp, "plots"))

            def path(name: str) -> str:
                written.append(f"plots/{name}")
                return os.path.join(tmp, "plots", name)

            first = next(iter(results["ood"].values()))["metrics"]
            unknown = [k for k in plot_scores if k not in id_scores]
            if unknown:
                raise ValueError(
                    f"plot_scores: {unknown} are not among the scores {list(id_scores)}."
                )
            for key in plot_scores:
                values = id_scores[key]
                per_set = {s: ood_scores[s][key] for s in ood_scores}
                label = display_name(key)
                plots.score_histograms(
                    values, per_set, path(f"hist_{key}.png"), score_name=label, id_name=id_name
                )
                aurocs = {s: first[key][s]["auroc"]["mean"] for s in ood_scores}
                plots.roc_curves(
                    values, per_set, path(f"roc_{key}.png"), score_name=label, aurocs=aurocs
                )
            plots.reliability_diagram(
                confidence,
                correct,
                path("reliability.png"),
                ece=results["classification"]["ece"],
                num_bins=ECE_BINS,
            )
            id_geom = geometry[id_name]
            ood_geom = {k: v for k, v in geometry.items() if k != id_name}
            for field, title in (
                ("feature_norm", "Feature norm ||z||"),
                ("cos_pred", "cos(z, w_pred)"),
            ):
                plots.distribution_plot(
                    id_geom[field],
                    {k: v[field] for k, v in ood_geom.items()},
                    path(f"{field}.png"),
                    title=f"{title}: ID vs OOD",
                    id_name=id_name,
                )
            curves = results["diagnostics"]["logit_norm_curve"]
            if curves:
                plots.logit_norm_plot(curves, path("logit_norm.png"))
        results["plots"] = written
        results["complete"] = True
        report.write_json(results, os.path.join(tmp, "results.json"))
        with open(os.path.join(tmp, "results.md"), "w") as f:
            f.write(report.markdown_report(results))
