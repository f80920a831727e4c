"""Every OOD score from cached outputs, vmapped over score settings.

The scores of :mod:`ood_jax.scores` (higher = more in-distribution) are
computed once for all datasets at a time: the cached logits and features of the
in-distribution test set and of every OOD set are concatenated, scored in one
jitted call per score, and split again. Settings that form a sweep (the
temperatures of MSP and energy) are evaluated with ``jax.vmap`` over the
setting, e.g. ``jax.vmap(lambda t: msp(logits, temperature=t))(temperatures)``,
not with a Python loop.

Fitted scores (Mahalanobis, KNN, class-conditional GMM, ReAct) are fitted on the
training set's cached features; GradNorm reads the head's kernel and bias.
ODIN needs input gradients, so it is the one score computed from images
(:func:`make_odin_fn`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import scores as S
from ood_jax.evaluate.forward import ModelOutputs

#: Scores computed from logits / features alone.
LOGIT_SCORES: tuple[str, ...] = ("msp", "max_logit", "energy", "neg_entropy", "feature_norm")
#: Scores fitted on the training set's features (need ``train`` outputs).
FITTED_SCORES: tuple[str, ...] = ("mahalanobis", "knn", "gmm", "react")
#: Scores that need the model: ODIN (input gradients) and GradNorm (head weights).
MODEL_SCORES: tuple[str, ...] = ("odin", "gradnorm")
SCORE_NAMES: tuple[str, ...] = LOGIT_SCORES + FITTED_SCORES + MODEL_SCORES
#: Scores swept over ``ScoreSettings.temperatures`` with ``jax.vmap``.
TEMPERATURE_SWEEP: tuple[str, ...] = ("msp", "energy")

#: Names as the papers print them, for tables and plots.
DISPLAY_NAMES: dict[str, str] = {
    "msp": "MSP",
    "max_logit": "MaxLogit",
    "energy": "Energy",
    "neg_entropy": "NegEntropy",
    "feature_norm": "FeatureNorm",
    "mahalanobis": "Mahalanobis",
    "knn": "KNN",
    "gmm": "GMM",
    "react": "ReAct",
    "odin": "ODIN",
    "gradnorm": "GradNorm",
}


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    """Hyperparameters of the scores (defaults from the papers, see REFERENCE.md).

    Attributes:
      temperatures: MSP and energy are evaluated at each (vmapped); the score
        key is ``"msp"`` at T = 1 and ``"msp_T<t>"`` otherwise.
      odin_temperature: ODIN's T (1000 in ODIN).
      odin_epsilon: ODIN's perturbation size in [0, 1] pixel units; divided by
        the per-channel std inside ``ood_jax.scores`` (normalized input space).
      gradnorm_temperature: GradNorm's T (1 in Huang et al. 2021).
      knn_k: neighbours for KNN (50 for CIFAR-10 in Sun et al. 2022).
      knn_max_train: fit KNN on at most this many training features (a random
        subset drawn with ``seed``); None = all.
      react_percentile: ReAct's clipping percentile of training activations (90).
      odin_max_examples: compute ODIN on a seeded random subset of at most this
        many images of each dataset (ID included); None = all. ODIN's gradient
        pass is the slowest step on a CPU; its metrics then use those subsets.
      seed: seed for the KNN training subset.
    """

    temperatures: tuple[float, ...] = (1.0,)
    odin_temperature: float = 1000.0
    odin_epsilon: float = 0.0014
    gradnorm_temperature: float = 1.0
    knn_k: int = 50
    knn_max_train: int | None = None
    react_percentile: float = 90.0
    odin_max_examples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        temps = tuple(float(t) for t in self.temperatures)
        if not temps or min(temps) <= 0:
            raise ValueError(
                f"temperatures: need at least one temperature, all > 0, got {self.temperatures}."
            )
        object.__setattr__(self, "temperatures", temps)
        if self.knn_k < 1:
            raise ValueError(f"knn_k must be >= 1, got {self.knn_k}.")
        if not 0 < self.react_percentile <= 100:
            raise ValueError(f"react_percentile must be in (0, 100], got {self.react_percentile}.")


def check_score_names(names: Iterable[str]) -> tuple[str, ...]:
    """Validates score names; returns them as a tuple without duplicates."""
    names = tuple(dict.fromkeys(names))
    unknown = [n for n in names if n not in SCORE_NAMES]
    if unknown or not names:
        raise ValueError(
            f"scores: unknown or empty {unknown or list(names)}; "
            f"choose from {', '.join(SCORE_NAMES)}."
        )
    return names


def score_key(name: str, temperature: float) -> str:
    """Result key of a swept score: ``"msp"`` at T = 1, ``"msp_T1000"`` otherwise."""
    return name if temperature == 1.0 else f"{name}_T{temperature:g}"


def display_name(key: str) -> str:
    """``"msp_T1000"`` -> ``"MSP (T=1000)"``."""
    name, _, temp = key.partition("_T")
    base = DISPLAY_NAMES.get(name, key)
    return f"{base} (T={temp})" if temp else base


@jax.jit
def _vmapped_msp(logits: jax.Array, temperatures: jax.Array) -> jax.Array:
    return jax.vmap(lambda t: S.msp(logits, temperature=t))(temperatures)


@jax.jit
def _vmapped_energy(logits: jax.Array, temperatures: jax.Array) -> jax.Array:
    return jax.vmap(lambda t: S.energy(logits, temperature=t))(temperatures)


_SWEPT: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "msp": _vmapped_msp,
    "energy": _vmapped_energy,
}
_PLAIN: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "max_logit": jax.jit(lambda logits, features: S.max_logit(logits)),
    "neg_entropy": jax.jit(lambda logits, features: S.neg_entropy(logits)),
    "feature_norm": jax.jit(lambda logits, features: S.feature_norm(features)),
}


def fit_scores(
    names: Sequence[str],
    train: ModelOutputs,
    *,
    settings: ScoreSettings,
) -> dict[str, object]:
    """Fits the fitted scores among ``names`` on the training set's cached outputs.

    Returns a dict score name -> fitted parameters (a pytree) for the
    Mahalanobis (class means + tied covariance, Lee et al. 2018), KNN (normalized
    training features, Sun et al. 2022), GMM (class-conditional Gaussians,
    Pearce et al. 2021) and ReAct (clip threshold, Sun et al. 2021) scores.
    """
    fitted: dict[str, object] = {}
    labels = train.labels
    if any(n in FITTED_SCORES for n in names) and (labels < 0).any():
        raise ValueError(
            "train: fitted scores need labelled training outputs, found label -1; "
            "pass the in-distribution training set."
        )
    if "mahalanobis" in names:
        fitted["mahalanobis"] = S.fit_mahalanobis(train.features, labels)
    if "gmm" in names:
        fitted["gmm"] = S.fit_gmm(train.features, labels)
    if "knn" in names:
        features = train.features
        if settings.knn_max_train is not None and len(features) > settings.knn_max_train:
            rng = np.random.default_rng(settings.seed)
            keep = np.sort(rng.choice(len(features), settings.knn_max_train, replace=False))
            features = features[keep]
        fitted["knn"] = S.fit_knn(features)
    if "react" in names:
        fitted["react"] = S.fit_react(train.features, percentile=settings.react_percentile)
    return fitted


def _fitted_score(
    name: str,
    params: object,
    features: np.ndarray,
    *,
    head_kernel: np.ndarray,
    head_bias: np.ndarray,
    settings: ScoreSettings,
) -> np.ndarray:
    if name == "mahalanobis":
        return np.asarray(S.mahalanobis_score(params, features))
    if name == "gmm":
        return np.asarray(S.gmm_score(params, features))
    if name == "knn":
        return np.asarray(S.knn_score(params, features, k=settings.knn_k))
    if name == "react":
        return np.asarray(S.react_score(params, features, head_kernel, head_bias))
    raise AssertionError(name)


def score_outputs(
    names: Sequence[str],
    outputs: Mapping[str, ModelOutputs],
    *,
    head_kernel: np.ndarray,
    head_bias: np.ndarray,
    settings: ScoreSettings,
    fitted: Mapping[str, object] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Scores every dataset's cached outputs with every non-ODIN score in ``names``.

    Args:
      names: score names (see ``SCORE_NAMES``); "odin" is skipped here (it
        needs images, see :func:`make_odin_fn`).
      outputs: dataset name -> cached outputs.
      head_kernel, head_bias: the final linear layer, ``[D, K]`` and ``[K]``.
      settings: score hyperparameters.
      fitted: from :func:`fit_scores`, required for fitted scores.

    Returns:
      ``{dataset: {score key: float32 [N_dataset]}}``; swept scores give one key
      per temperature (see :func:`score_key`).
    """
    fitted = {} if fitted is None else fitted
    datasets = list(outputs)
    sizes = [len(outputs[d]) for d in datasets]
    splits = np.cumsum(sizes)[:-1]
    # One concatenated array per input, so every score is one jitted call.
    logits = jnp.asarray(np.concatenate([outputs[d].logits for d in datasets]))
    features = jnp.asarray(np.concatenate([outputs[d].features for d in datasets]))
    temps = jnp.asarray(settings.temperatures, jnp.float32)
    flat: dict[str, np.ndarray] = {}
    for name in names:
        if name in _SWEPT:
            swept = np.asarray(_SWEPT[name](logits, temps))
            for t, values in zip(settings.temperatures, swept, strict=True):
                flat[score_key(name, t)] = values
        elif name in _PLAIN:
            flat[name] = np.asarray(_PLAIN[name](logits, features))
        elif name in FITTED_SCORES:
            if name not in fitted:
                raise ValueError(
                    f"scores: {name!r} needs fitted parameters; pass train outputs to fit_scores."
                )
            flat[name] = _fitted_score(
                name,
                fitted[name],
                np.asarray(features),
                head_kernel=head_kernel,
                head_bias=head_bias,
                settings=settings,
            )
        elif name == "gradnorm":
            flat[name] = np.asarray(
                S.gradnorm(
                    features,
                    jnp.asarray(head_kernel),
                    jnp.asarray(head_bias),
                    temperature=settings.gradnorm_temperature,
                )
            )
    result: dict[str, dict[str, np.ndarray]] = {d: {} for d in datasets}
    for key, values in flat.items():
        for d, part in zip(datasets, np.split(values.astype(np.float32), splits), strict=True):
            result[d][key] = part
    return result


def make_odin_fn(
    settings: ScoreSettings,
) -> Callable[[Callable[[jax.Array], jax.Array], jax.Array], jax.Array]:
    """``fn(apply_logits, images) -> [B]`` ODIN scores (Liang et al. 2018) for one batch.

    For :meth:`ForwardPass.map_batches`: build it once per evaluation so the
    jitted function is compiled once. Each example's input gradient is its own
    (``ood_jax.scores.odin`` takes ``jax.vmap(jax.grad(...))`` over the batch),
    so padding rows cannot leak into real ones.
    """

    def fn(apply_logits, images):
        return S.odin(
            apply_logits,
            images,
            temperature=settings.odin_temperature,
            epsilon=settings.odin_epsilon,
        )

    return fn
