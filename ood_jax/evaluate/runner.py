"""``run_evaluation``: a model and datasets in, every number and the report out.

The stages, each a plain function testable alone:

1. :func:`compute_outputs`: one forward pass per dataset (ID test set, every
   OOD set, and the training set when a fitted score needs it) -> cached
   :class:`ModelOutputs`;
2. :func:`~ood_jax.evaluate.scoring.fit_scores`: fitted statistics from the
   training outputs;
3. :func:`~ood_jax.evaluate.scoring.score_outputs` and
   :func:`~ood_jax.evaluate.scoring.score_images`: every registered score;
4. :func:`evaluate_protocols`: OOD metrics under each protocol;
5. :func:`classification_summary` and the diagnostics
   (:mod:`ood_jax.evaluate.diagnostics`);
6. :func:`write_report`: ``results.json``, ``results.md`` and PNG plots,
   written atomically (all or nothing).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flax import nnx

from ood_jax import data as D
from ood_jax import metrics as M
from ood_jax.evaluate import diagnostics, plots, report
from ood_jax.evaluate.adversarial import NAME as ADVERSARIAL_NAME
from ood_jax.evaluate.adversarial import FloatImages
from ood_jax.evaluate.adversarial import adversarial_noise as make_adversarial_noise
from ood_jax.evaluate.forward import ForwardPass, ModelOutputs
from ood_jax.evaluate.protocol import PROTOCOLS, evaluate_ood, set_seed
from ood_jax.evaluate.scoring import fit_scores, score_images, score_outputs
from ood_jax.scores.registry import Head, available_scores, check_score_names, get_score
from ood_jax.scores.registry import resolve_hparams as resolve_score_hparams

ECE_BINS = 15


def head_weights(model: nnx.Module) -> Head:
    """``Head(kernel [D, K], bias [K] or None)`` of ``model.head`` as NumPy arrays."""
    head = getattr(model, "head", None)
    if head is None or not hasattr(head, "kernel"):
        raise ValueError(
            "model: expected the final linear layer as `model.head` (an nnx.Linear with "
            "`kernel` [D, K]); see docs/architecture.md."
        )
    kernel = np.asarray(head.kernel[...], np.float32)
    bias = getattr(head, "bias", None)
    return Head(kernel, None if bias is None else np.asarray(bias[...], np.float32))


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


def compute_outputs(
    forward: ForwardPass,
    datasets: Mapping[str, D.ImageDataset],
    *,
    batches: Callable[[D.ImageDataset], object],
) -> dict[str, ModelOutputs]:
    """Stage 1: ``{name: ModelOutputs}``, one forward pass per dataset."""
    return {name: forward(batches(ds)) for name, ds in datasets.items()}


def classification_summary(outputs: ModelOutputs) -> dict:
    """Accuracy, ECE (15 bins), reliability bins and mean logit norm of labelled outputs."""
    confidence = np.max(_softmax(outputs.logits), axis=-1)
    correct = (np.argmax(outputs.logits, axis=-1) == outputs.labels).astype(np.float64)
    bins = plots.reliability_bins(confidence, correct, num_bins=ECE_BINS)
    return {
        "accuracy": M.accuracy(outputs.logits, outputs.labels),
        "ece": M.expected_calibration_error(outputs.logits, outputs.labels, num_bins=ECE_BINS),
        "num_bins": ECE_BINS,
        "reliability": {k: v.tolist() for k, v in bins.items()},
        "mean_logit_norm": float(np.linalg.norm(outputs.logits, axis=-1).mean()),
    }


def evaluate_protocols(
    groups: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, Mapping[str, np.ndarray]]]],
    *,
    protocols: Sequence[str],
    num_ood: int,
    num_draws: int,
    seed: int,
    convention: str,
) -> dict:
    """Stage 4: ``{protocol: evaluate_ood result}`` merged over score groups.

    Scores computed on the same examples form one group (``(id_scores,
    ood_scores)``); a budgeted image score on subsets is its own group, with its
    draws recorded under ``extra_draws[score]`` when they differ.
    """
    out = {}
    for p in protocols:
        parts = [
            evaluate_ood(
                ids,
                oods,
                protocol=p,
                num_ood=num_ood,
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
                for key in extra["metrics"]:
                    merged.setdefault("extra_draws", {})[key] = extra["draws"]
        out[p] = merged
    return out


def run_evaluation(
    model: nnx.Module,
    *,
    id_test: D.ImageDataset,
    ood_sets: Mapping[str, D.ImageDataset],
    train: D.ImageDataset | None = None,
    scores: Sequence[str] | None = None,
    score_hparams: Mapping[str, Mapping] | None = None,
    protocols: Sequence[str] = PROTOCOLS,
    convention: str = "hendrycks",
    num_ood: int | None = None,
    num_draws: int = 10,
    seed: int = 0,
    max_train: int | None = None,
    max_ood: int | None = None,
    batch_size: int = 256,
    mean: Sequence[float] = D.CIFAR10_MEAN,
    std: Sequence[float] = D.CIFAR10_STD,
    mesh=None,
    out_dir: str | os.PathLike | None = None,
    metrics_log_dir: str | os.PathLike | None = None,
    metadata: Mapping | None = None,
    make_plots: bool = True,
    plot_scores: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    adversarial_noise: int = 0,
    attack_steps: int = 40,
    attack_eps: float = 0.3,
) -> dict:
    """Evaluates ``model`` as the papers do; returns the ``results.json`` dict.

    Args:
      model: NNX classifier, ``model(images) -> (logits, features)``, with
        ``model.head`` its final linear layer. Switched to eval mode.
      id_test: labelled in-distribution test set (e.g. CIFAR-10 test).
      ood_sets: OOD set name -> dataset (each non-empty).
      train: in-distribution training set; required by the ``"fitted"`` scores.
      scores: registered score names (default: every registered score).
      score_hparams: ``{score: {hyperparameter: value}}`` overriding the registered
        defaults, e.g. ``{"msp": {"temperature": (1, 1000)}, "odin": {"max_examples":
        1000}}``; a swept hyperparameter given as a sequence is vmapped.
      protocols: any of ``"papers"`` (``num_ood`` OOD examples per draw,
        ``num_draws`` draws) and ``"full"``.
      convention: ``"hendrycks"`` (default) or ``"openood"``.
      num_ood, num_draws, seed: the papers' protocol (default ``N_id // 5``, 10, 0);
        every draw is seeded by ``seed`` and the set's name.
      max_train: fit the fitted scores on a seeded random subset of at most this
        many training images (None = all), e.g. to keep a CPU run short.
      max_ood: evaluate each OOD set on a seeded random subset of at most this
        many images (None = all; recorded in the set's ``source``).
      batch_size: forward-pass batch size (padded to a multiple of the devices).
      mean, std: the in-distribution set's normalization (the model's input space).
      mesh: device mesh with a ``"data"`` axis (default: all devices).
      out_dir: if given, write ``results.json``, ``results.md`` and ``plots/*.png``
        there, atomically.
      metrics_log_dir: a training workdir whose ``metrics.jsonl`` gives the
        logit-norm-over-training curve.
      metadata: recorded under ``results`` (e.g. ``checkpoint``, ``model``,
        ``config``, ``command``).
      make_plots: write PNG plots with the report.
      plot_scores: score keys that get a histogram and a ROC plot (default: all).
      progress: called with a short message before each stage (e.g. ``print``).
      adversarial_noise: add the ACET paper's adversarial-noise OOD set of this many
        uniform-noise images attacked against ``model`` (``attack_steps``-step
        L-infinity PGD of radius ``attack_eps`` in [0, 1] pixels, maximizing
        confidence); 0 = none.

    Returns:
      The results dict (see ``results.json``).
    """
    say = progress or (lambda message: None)
    names = check_score_names(available_scores() if scores is None else scores)
    hparams = resolve_score_hparams(names, score_hparams)
    if not protocols:
        raise ValueError(f"protocols: choose at least one of {PROTOCOLS}.")
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"protocols: {p!r} is not one of {PROTOCOLS}.")
    _check_datasets(id_test, ood_sets)
    fitted_names = [n for n in names if get_score(n).consumes == "fitted"]
    if fitted_names and train is None:
        raise ValueError(
            f"train: scores {fitted_names} are fitted on the in-distribution training set; "
            "pass train= or drop them from scores."
        )
    ood_sets = {k: D.random_subset(v, max_ood, seed=set_seed(seed, k)) for k, v in ood_sets.items()}
    timings: dict[str, float] = {}
    head = head_weights(model)
    forward = ForwardPass(model, mesh=mesh)

    def batches(ds):
        if isinstance(ds, FloatImages):
            return ds.batches(-(-batch_size // forward.num_shards) * forward.num_shards)
        return D.eval_batches(
            ds, batch_size=batch_size, process_index=0, process_count=1, mean=mean, std=std
        )

    if adversarial_noise:
        if ADVERSARIAL_NAME in ood_sets:
            raise ValueError(f"ood_sets: {ADVERSARIAL_NAME!r} is made by the evaluation itself.")
        t0 = time.perf_counter()
        say(f"attacking {adversarial_noise} noise images ({attack_steps}-step PGD)")
        ood_sets = {
            **ood_sets,
            ADVERSARIAL_NAME: make_adversarial_noise(
                forward,
                adversarial_noise,
                seed=seed,
                mean=mean,
                std=std,
                eps=attack_eps,
                steps=attack_steps,
                batch_size=batch_size,
            ),
        }
        timings["attack_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"forward pass over {1 + len(ood_sets)} datasets")
    outputs = compute_outputs(forward, {id_test.name: id_test, **ood_sets}, batches=batches)
    timings["forward_s"] = time.perf_counter() - t0
    train_used, fitted, train_outputs = None, {}, None
    if fitted_names:
        t0 = time.perf_counter()
        train_used = D.random_subset(train, max_train, seed=seed)
        say(f"fitting {', '.join(fitted_names)} on {len(train_used)} training images")
        train_outputs = compute_outputs(forward, {"train": train_used}, batches=batches)["train"]
        fitted = fit_scores(hparams, train_outputs)
        timings["fit_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    say(f"scoring ({', '.join(names)})")
    scored = score_outputs(hparams, outputs, head=head, fitted=fitted)
    image_scores, image_sizes = score_images(
        hparams,
        forward,
        {id_test.name: id_test, **ood_sets},
        batches=batches,
        std=std,
        seed=seed,
    )
    timings["score_s"] = time.perf_counter() - t0

    ood_names = list(ood_sets)
    groups = [(scored[id_test.name], {n: scored[n] for n in ood_names})]
    for name in image_sizes:
        groups.append(
            (
                {name: image_scores[id_test.name][name]},
                {n: {name: image_scores[n][name]} for n in ood_names},
            )
        )
    t0 = time.perf_counter()
    say(f"metrics ({', '.join(protocols)} protocol)")
    ood_results = evaluate_protocols(
        groups,
        protocols=protocols,
        num_ood=max(len(id_test) // 5, 1) if num_ood is None else num_ood,
        num_draws=num_draws,
        seed=seed,
        convention=convention,
    )
    timings["metrics_s"] = time.perf_counter() - t0
    id_scores = {**scored[id_test.name], **image_scores[id_test.name]}
    ood_scores = {n: {**scored[n], **image_scores[n]} for n in ood_names}
    display = {key: get_score(_base(key, names)).display_for(key) for key in id_scores}

    geometry = {
        name: diagnostics.feature_geometry(out.logits, out.features, head.kernel)
        for name, out in outputs.items()
    }
    split = {}
    if train_outputs is not None:
        # Where each set's features fall relative to the class means, in the metric of
        # the Mahalanobis score (raw and L2-normalized features): see the report's
        # density section.
        sets = {"train": train_outputs.features, **{n: o.features for n, o in outputs.items()}}
        for variant, normalize in (("raw", False), ("l2", True)):
            parts = diagnostics.mahalanobis_split(
                train_outputs.features, train_outputs.labels, sets, normalize=normalize
            )
            split[variant] = {
                name: {k: diagnostics.summarize(v) for k, v in p.items() if k != "nearest"}
                for name, p in parts.items()
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
            "normalization": {"mean": list(mean), "std": list(std)},
        },
        "scores": list(id_scores),
        "score_display": display,
        "score_hparams": hparams,
        "protocol_options": {
            "num_ood": num_ood,
            "num_draws": num_draws,
            "seed": seed,
            "convention": convention,
            "max_train": max_train,
            "max_ood": max_ood,
            "adversarial_noise": adversarial_noise,
            "attack_steps": attack_steps if adversarial_noise else None,
            "attack_eps": attack_eps if adversarial_noise else None,
        },
        "image_score_examples": image_sizes or None,
        "classification": classification_summary(outputs[id_test.name]),
        # Mean maximum softmax confidence per set, as the ACET paper reports it.
        "mmc": {
            name: float(np.max(_softmax(out.logits), axis=-1).mean())
            for name, out in outputs.items()
        },
        "ood": ood_results,
        "diagnostics": {
            "weights": diagnostics.weight_diagnostics(head.kernel, head.bias),
            "features": {
                name: {k: diagnostics.summarize(v) for k, v in g.items()}
                for name, g in geometry.items()
            },
            "logit_norm_curve": curves,
            "mahalanobis_split": split,
        },
        "timings": timings,
    }
    results.setdefault("checkpoint", {})
    results.setdefault("model", {})
    if out_dir is not None:
        results["report_dir"] = os.path.abspath(os.fspath(out_dir))
        say(f"writing the report to {results['report_dir']}")
        write_report(
            os.fspath(out_dir),
            results,
            id_scores=id_scores,
            ood_scores=ood_scores,
            geometry=geometry,
            id_name=id_test.name,
            id_outputs=outputs[id_test.name],
            make_plots=make_plots,
            plot_scores=list(id_scores) if plot_scores is None else list(plot_scores),
        )
    return results


SCORES_FILE = "scores.npz"


def _save_scores(path, *, id_scores, ood_scores, geometry, id_name, id_outputs) -> None:
    """Every example's scores next to the report (float32), for plots and studies that
    compare runs: ``id/<score>``, ``ood/<set>/<score>``, ``geometry/<set>/<quantity>``
    (``feature_norm``, ``cos_pred``, ...) and ``id/labels``, ``id/predictions``."""
    arrays = {f"id/{k}": np.asarray(v, np.float32) for k, v in id_scores.items()}
    for name, per_score in ood_scores.items():
        arrays.update({f"ood/{name}/{k}": np.asarray(v, np.float32) for k, v in per_score.items()})
    for name, fields in geometry.items():
        where = "id" if name == id_name else name
        for k, v in fields.items():
            arrays[f"geometry/{where}/{k}"] = np.asarray(v, np.float32)
    arrays["id/labels"] = np.asarray(id_outputs.labels, np.int32)
    arrays["id/predictions"] = np.argmax(id_outputs.logits, axis=-1).astype(np.int32)
    np.savez_compressed(path, **arrays)


def _base(key: str, names: Sequence[str]) -> str:
    """The registered score a result key belongs to (``msp_T1000`` -> ``msp``)."""
    if key in names:
        return key
    return max((n for n in names if key.startswith(f"{n}_")), key=len)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def write_report(
    out_dir: str,
    results: dict,
    *,
    id_scores: Mapping[str, np.ndarray],
    ood_scores: Mapping[str, Mapping[str, np.ndarray]],
    geometry: Mapping[str, Mapping[str, np.ndarray]],
    id_name: str,
    id_outputs: ModelOutputs,
    make_plots: bool = True,
    plot_scores: Sequence[str] | None = None,
) -> None:
    """Stage 6: the report, written into a temporary directory renamed to ``out_dir``."""
    plot_scores = list(id_scores) if plot_scores is None else list(plot_scores)
    confidence = np.max(_softmax(id_outputs.logits), axis=-1)
    correct = np.argmax(id_outputs.logits, axis=-1) == id_outputs.labels
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
                label = results["score_display"].get(key, key)
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
        _save_scores(
            os.path.join(tmp, SCORES_FILE),
            id_scores=id_scores,
            ood_scores=ood_scores,
            geometry=geometry,
            id_name=id_name,
            id_outputs=id_outputs,
        )
        results["plots"] = written
        results["complete"] = True
        report.write_json(results, os.path.join(tmp, "results.json"))
        with open(os.path.join(tmp, "results.md"), "w") as f:
            f.write(report.markdown_report(results))
