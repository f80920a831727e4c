"""The stages of :func:`~ood_jax.evaluate.run_evaluation`, each a plain function.

1. :func:`select_ood_sets` and :func:`compute_outputs`: the OOD sets within their
   budget (plus the adversarial-noise set), then one forward pass per dataset ->
   cached :class:`~ood_jax.evaluate.forward.ModelOutputs`;
2. :func:`~ood_jax.evaluate.scoring.fit_scores`: fitted statistics from the
   training outputs;
3. :func:`compute_scores`: every chosen score on every dataset, as a
   :class:`ScoreTable`;
4. :func:`evaluate_protocols`: OOD metrics under each protocol;
5. :func:`summarize_confidence` (accuracy, calibration, MMC) and :func:`diagnose`
   (the diagnostics of :mod:`ood_jax.evaluate.diagnostics`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
from flax import nnx

from ood_jax import data as D
from ood_jax import metrics as M
from ood_jax.evaluate import diagnostics, plots
from ood_jax.evaluate.adversarial import NAME as ADVERSARIAL_NAME
from ood_jax.evaluate.adversarial import FloatImages, adversarial_noise
from ood_jax.evaluate.forward import ForwardPass, ModelOutputs
from ood_jax.evaluate.protocol import dataset_seeds, evaluate_ood
from ood_jax.evaluate.scoring import score_activations, score_images, score_outputs
from ood_jax.evaluate.spec import EvalSpec
from ood_jax.scores.registry import Head, get_score

ECE_BINS = 15

Batches = Callable[[D.ImageDataset | FloatImages], Iterator[dict[str, np.ndarray]]]
ScoreGroup = tuple[Mapping[str, np.ndarray], Mapping[str, Mapping[str, np.ndarray]]]


def head_weights(model: nnx.Module, *, required: bool = True) -> Head | None:
    """``Head(kernel [D, K], bias [K] or None)`` of ``model.head`` as NumPy arrays.

    Without a head (no ``model.head`` with a ``kernel``): a ValueError, or None when
    ``required`` is False (a user's model that cannot serve the detectors that need it).
    """
    head = getattr(model, "head", None)
    if head is None or not hasattr(head, "kernel"):
        if not required:
            return None
        raise ValueError(
            "model: expected the final linear layer as `model.head` (an nnx.Linear with "
            "`kernel` [D, K]); adapt a model without one with "
            "ood_jax.evaluate.as_classifier(model, head=...)."
        )
    kernel = np.asarray(head.kernel[...], np.float32)
    bias = getattr(head, "bias", None)
    return Head(kernel, None if bias is None else np.asarray(bias[...], np.float32))


def check_id_test(id_test: D.ImageDataset) -> None:
    """Raises a ValueError unless ``id_test`` is a labelled ImageDataset."""
    if not isinstance(id_test, D.ImageDataset):
        raise ValueError(f"id_test: expected an ood_jax.data.ImageDataset, got {type(id_test)}.")
    if (id_test.labels < 0).any():
        raise ValueError(
            f"id_test ({id_test.name!r}): the in-distribution test set must be labelled "
            "(accuracy and calibration need labels)."
        )


def check_datasets(
    spec: EvalSpec,
    id_test: D.ImageDataset,
    ood_sets: Mapping[str, D.ImageDataset],
    train: D.ImageDataset | None,
    val_ood: D.ImageDataset | None = None,
) -> None:
    """Raises a ValueError naming the argument when the datasets cannot serve ``spec``."""
    check_id_test(id_test)
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
    if spec.adversarial_noise and ADVERSARIAL_NAME in ood_sets:
        raise ValueError(f"ood_sets: {ADVERSARIAL_NAME!r} is made by the evaluation itself.")
    if spec.fitted_scores and train is None:
        raise ValueError(
            f"train: scores {spec.fitted_scores} are fitted on the in-distribution training "
            "set; pass train= or drop them from scores."
        )
    if spec.uses_val and train is None:
        raise ValueError(
            "train: the ID validation split is held out from the in-distribution training "
            "set (tune, fit_on_val); pass train=."
        )
    _check_val_ood(spec, id_test, ood_sets, train, val_ood)


def _check_val_ood(spec: EvalSpec, id_test, ood_sets, train, val_ood) -> None:
    """The OOD validation set: given exactly when tuning, and none of the test sets."""
    if bool(spec.tune) != (val_ood is not None):
        raise ValueError(
            "val_ood: pass the OOD validation set when tuning scores (spec.tune), and only then."
        )
    if val_ood is None:
        return
    if not isinstance(val_ood, D.ImageDataset):
        raise ValueError(f"val_ood: expected an ood_jax.data.ImageDataset, got {type(val_ood)}.")
    test_sets = {id_test.name: id_test, **ood_sets}
    names = set(test_sets) | {ds.name for ds in test_sets.values()}
    same = [ds for ds in test_sets.values() if _same_images(ds, val_ood)]
    if val_ood.name in names or same:
        raise ValueError(
            f"val_ood: {val_ood.name!r} is one of the report's test sets; hyperparameters are "
            "never chosen on a test set: tune on another set (e.g. tinyimagenet_train:train) "
            "or drop it from the OOD test sets."
        )
    if train is not None and val_ood.name == train.name:
        raise ValueError(
            f"val_ood: named {val_ood.name!r} like the training set, whose held-out images "
            "are the ID side of the validation pair; rename it."
        )


def _same_images(a: D.ImageDataset, b: D.ImageDataset) -> bool:
    return a.images.shape == b.images.shape and np.array_equal(a.images, b.images)


def batch_maker(spec: EvalSpec, num_shards: int) -> Batches:
    """``batches(dataset)``: normalized, padded batches of ``spec.batch_size`` images."""

    def batches(ds):
        if isinstance(ds, FloatImages):
            return ds.batches(-(-spec.batch_size // num_shards) * num_shards)
        return D.eval_batches(
            ds,
            batch_size=spec.batch_size,
            process_index=0,
            process_count=1,
            mean=spec.mean,
            std=spec.std,
        )

    return batches


def select_ood_sets(
    spec: EvalSpec,
    ood_sets: Mapping[str, D.ImageDataset],
    forward: ForwardPass,
    say: Callable[[str], None],
) -> dict[str, D.ImageDataset | FloatImages]:
    """Each OOD set within ``spec.max_ood`` (seeded by its name), plus the attacked noise."""
    chosen: dict[str, D.ImageDataset | FloatImages] = {
        name: D.random_subset(ds, spec.max_ood, seed=dataset_seeds(spec.seed, name))
        for name, ds in ood_sets.items()
    }
    if spec.adversarial_noise:
        say(f"attacking {spec.adversarial_noise} noise images ({spec.attack_steps}-step PGD)")
        chosen[ADVERSARIAL_NAME] = adversarial_noise(
            forward, spec.adversarial_noise, seed=spec.seed, **spec.attack_options()
        )
    return chosen


def compute_outputs(
    forward: ForwardPass,
    datasets: Mapping[str, D.ImageDataset | FloatImages],
    *,
    batches: Batches,
) -> dict[str, ModelOutputs]:
    """``{name: ModelOutputs}``, one forward pass per dataset."""
    return {name: forward(batches(ds)) for name, ds in datasets.items()}


@dataclasses.dataclass(frozen=True)
class ScoreTable:
    """Every result key's per-example scores on every dataset.

    Attributes:
      id_name: the in-distribution test set's name.
      by_set: ``{dataset: {result key: float32 [N]}}`` (``msp_T1000`` is a key of
        the registered score ``msp``).
      groups: ``(id_scores, ood_scores)`` of scores computed on the same examples;
        a budgeted image score on subsets is its own group.
      image_examples: ``{image score: {dataset: images scored}}``.
      display: ``{result key: display name}``.
    """

    id_name: str
    by_set: dict[str, dict[str, np.ndarray]]
    groups: list[ScoreGroup]
    image_examples: dict[str, dict[str, int]]
    display: dict[str, str]

    @property
    def id_scores(self) -> dict[str, np.ndarray]:
        """``{result key: scores}`` of the in-distribution test set."""
        return self.by_set[self.id_name]

    @property
    def ood_scores(self) -> dict[str, dict[str, np.ndarray]]:
        """``{OOD set: {result key: scores}}``."""
        return {name: keys for name, keys in self.by_set.items() if name != self.id_name}


def compute_scores(
    spec: EvalSpec,
    forward: ForwardPass,
    datasets: Mapping[str, D.ImageDataset | FloatImages],
    outputs: Mapping[str, ModelOutputs],
    *,
    head: Head,
    fitted: Mapping[str, object],
    batches: Batches,
) -> ScoreTable:
    """Stage 3: the scores from the cached outputs and, for image scores, the images.

    ``datasets`` (and ``outputs``) start with the in-distribution test set.
    """
    id_name, *ood_names = datasets
    scored = score_outputs(spec.score_hparams, outputs, head=head, fitted=fitted)
    activations = score_activations(
        spec.score_hparams, forward, datasets, batches=batches, fitted=fitted
    )
    scored = {name: {**scored[name], **activations[name]} for name in datasets}
    image_scores, image_examples = score_images(
        spec.score_hparams,
        forward,
        datasets,
        batches=batches,
        std=spec.std,
        seed=spec.seed,
        fitted=fitted,
    )
    groups: list[ScoreGroup] = [(scored[id_name], {name: scored[name] for name in ood_names})]
    for key in image_examples:
        groups.append(
            (
                {key: image_scores[id_name][key]},
                {name: {key: image_scores[name][key]} for name in ood_names},
            )
        )
    by_set = {name: {**scored[name], **image_scores[name]} for name in datasets}
    display = {
        key: get_score(registered_score(key, spec.scores)).display_for(key)
        for key in by_set[id_name]
    }
    return ScoreTable(id_name, by_set, groups, image_examples, display)


def without_non_finite(
    table: ScoreTable, names: Sequence[str]
) -> tuple[ScoreTable, dict[str, str]]:
    """``table`` without the registered scores (of ``names``) that gave a NaN or an
    infinity on some example, and ``{dropped score: why}`` (where, how many).

    Metrics are undefined for such scores. A score outside its premises can do it on
    a few inputs: ASH-S and SCALE multiply by ``exp(s1 / s2)``, which overflows where
    leaky-ReLU features (negative values) make the kept sum ``s2`` tiny. All of a
    score's result keys go together (``odin``'s sweep, say), so that every score in
    the report has every key it asked for."""
    bad: dict[str, list[str]] = {}
    for set_name, set_scores in table.by_set.items():
        for key, values in set_scores.items():
            count = int(np.count_nonzero(~np.isfinite(np.asarray(values))))
            if count:
                where = f"{key!r} on {count} of {np.size(values)} {set_name!r} examples"
                bad.setdefault(registered_score(key, names), []).append(where)
    if not bad:
        return table, {}

    def keep(scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in scores.items() if registered_score(k, names) not in bad}

    groups = [(keep(ids), {n: keep(o) for n, o in oods.items()}) for ids, oods in table.groups]
    kept = dataclasses.replace(
        table,
        by_set={name: keep(scores) for name, scores in table.by_set.items()},
        groups=[group for group in groups if group[0]],
        image_examples={k: v for k, v in table.image_examples.items() if k not in bad},
        display={k: v for k, v in table.display.items() if registered_score(k, names) not in bad},
    )
    why = {
        name: f"gave NaN or infinite scores ({'; '.join(where)}), so its metrics are undefined"
        for name, where in bad.items()
    }
    return kept, why


def registered_score(key: str, names: Sequence[str]) -> str:
    """The registered score a result key belongs to (``msp_T1000`` -> ``msp``)."""
    if key in names:
        return key
    return max((n for n in names if key.startswith(f"{n}_")), key=len)


def evaluate_protocols(groups: Sequence[ScoreGroup], spec: EvalSpec, *, num_id: int) -> dict:
    """Stage 4: ``{protocol: evaluate_ood result}`` for ``spec``'s protocols, merged over groups.

    Scores computed on the same examples form one group (``(id_scores,
    ood_scores)``); a budgeted image score on subsets is its own group, with its
    draws recorded under ``extra_draws[score]`` when they differ. ``num_id``: the
    in-distribution test set's size (``spec.num_ood`` defaults to a fifth of it).
    """
    num_ood = max(num_id // 5, 1) if spec.num_ood is None else spec.num_ood
    results = {}
    for protocol in spec.protocols:
        parts = [
            evaluate_ood(
                ids,
                oods,
                protocol=protocol,
                num_ood=num_ood,
                num_draws=spec.num_draws,
                seed=spec.seed,
                convention=spec.convention,
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
        results[protocol] = merged
    return results


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """The maximum softmax probability of each row (float64), the model's confidence."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).max(axis=-1)


def classification_summary(outputs: ModelOutputs, *, confidence: np.ndarray | None = None) -> dict:
    """Accuracy, ECE (15 bins), reliability bins and mean logit norm of labelled outputs.

    ``confidence``: :func:`max_softmax` of ``outputs.logits`` when already computed.
    """
    confidence = max_softmax(outputs.logits) if confidence is None else confidence
    correct = (np.argmax(outputs.logits, axis=-1) == outputs.labels).astype(np.float64)
    bins = plots.reliability_bins(confidence, correct, num_bins=ECE_BINS)
    return {
        "accuracy": M.accuracy(outputs.logits, outputs.labels),
        "ece": M.expected_calibration_error(outputs.logits, outputs.labels, num_bins=ECE_BINS),
        "num_bins": ECE_BINS,
        "reliability": {name: values.tolist() for name, values in bins.items()},
        "mean_logit_norm": float(np.linalg.norm(outputs.logits, axis=-1).mean()),
    }


def summarize_confidence(
    outputs: Mapping[str, ModelOutputs], id_name: str
) -> tuple[np.ndarray, dict]:
    """``(the ID set's max softmax probabilities, {"classification", "mmc"})``.

    The softmax of each set is computed once: the ID set's serves accuracy and
    calibration, every set's the mean maximum confidence (MMC, as the ACET paper
    reports it).
    """
    confidence = {name: max_softmax(out.logits) for name, out in outputs.items()}
    summary = {
        "classification": classification_summary(outputs[id_name], confidence=confidence[id_name]),
        "mmc": {name: float(values.mean()) for name, values in confidence.items()},
    }
    return confidence[id_name], summary


def diagnose(
    outputs: Mapping[str, ModelOutputs],
    train_outputs: ModelOutputs | None,
    head: Head | None,
    metrics_log_dir: str | os.PathLike | None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Stage 5: ``(per-example feature geometry per set, the diagnostics section)``.

    The geometry and the weights need the head and the features, the Mahalanobis split
    the features: a model without them gets empty entries (``{}``, None).
    """
    has_features = all(out.features.shape[1] > 0 for out in outputs.values())
    geometry = {}
    if head is not None and has_features:
        geometry = {
            name: diagnostics.feature_geometry(out.logits, out.features, head.kernel)
            for name, out in outputs.items()
        }
    split = {}
    if train_outputs is not None and has_features:
        # Where each set's features fall relative to the class means, in the metric of
        # the Mahalanobis score (raw and L2-normalized features): see the report's
        # density section.
        sets = {"train": train_outputs.features, **{n: out.features for n, out in outputs.items()}}
        for variant, normalize in (("raw", False), ("l2", True)):
            parts = diagnostics.mahalanobis_split(
                train_outputs.features, train_outputs.labels, sets, normalize=normalize
            )
            split[variant] = {
                name: {
                    part: diagnostics.summarize(values)
                    for part, values in per_part.items()
                    if part != "nearest"
                }
                for name, per_part in parts.items()
            }
    log = diagnostics.read_metrics_log(os.fspath(metrics_log_dir)) if metrics_log_dir else []
    section = {
        "weights": None if head is None else diagnostics.weight_diagnostics(head.kernel, head.bias),
        "features": {
            name: {quantity: diagnostics.summarize(values) for quantity, values in fields.items()}
            for name, fields in geometry.items()
        },
        "logit_norm_curve": diagnostics.logit_norm_curve(log),
        "mahalanobis_split": split,
    }
    return geometry, section
