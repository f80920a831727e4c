"""The two evaluation protocols: the papers' (sub-sampled draws) and full sets.

Papers' protocol (Hendrycks et al.'s Outlier Exposure code, reused by the
energy and LogitNorm repositories): each OOD set is sub-sampled to
``num_ood`` examples (2,000 = ``len(CIFAR test) // 5``) against the full
in-distribution test set, the metrics are computed per draw, and the mean and
standard deviation over ``num_draws`` (10) draws are reported. Draw ``d`` of the OOD
set called ``name`` uses ``numpy.random.default_rng([seed, crc32(name), d])``
(:func:`dataset_seeds`): keyed by the name, so the draws do not depend on which other
sets are evaluated or in what order. The seeds are recorded in the results so
every draw can be repeated. All scores of one draw share the same OOD indices.

A set with at most ``num_ood`` examples is used whole, in one draw (its
``draws[set]["num_draws"]`` is 1 and the report says so): drawing it ten times
would give ten copies of the same subset and a standard deviation of 0 that
looks measured.

Full-set protocol: every OOD example once (one draw, standard deviation 0).

The average row is the mean over OOD sets of the per-set means, as the papers
print it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from ood_jax import metrics as M

PROTOCOLS: tuple[str, ...] = ("papers", "full")
METRIC_NAMES: tuple[str, ...] = ("fpr95", "auroc", "aupr_in", "aupr_out")


def dataset_seeds(seed: int, name: str) -> list[int]:
    """Seed sequence of anything drawn per dataset: ``[seed, crc32(name)]``.

    Keyed by the set's name (not its position), so a checkpoint gets the same
    draws whatever the order or number of sets requested.
    """
    return [int(seed), zlib.crc32(name.encode())]


def draw_indices(num_total: int, num_draw: int, *, seed: Sequence[int]) -> np.ndarray:
    """Sorted indices of a draw of ``min(num_draw, num_total)`` examples without replacement."""
    rng = np.random.default_rng(list(seed))
    size = min(num_draw, num_total)
    return np.sort(rng.choice(num_total, size=size, replace=False))


def evaluate_ood(
    id_scores: Mapping[str, np.ndarray],
    ood_scores: Mapping[str, Mapping[str, np.ndarray]],
    *,
    protocol: str = "papers",
    num_ood: int | None = None,
    num_draws: int = 10,
    seed: int = 0,
    convention: str = "hendrycks",
) -> dict:
    """OOD metrics per score, per OOD set and averaged over sets.

    Args:
      id_scores: score key -> in-distribution test scores ``[N_id]``.
      ood_scores: OOD set name -> score key -> scores ``[N_set]`` (same keys).
      protocol: ``"papers"`` (draws of ``num_ood`` OOD examples, mean/std over
        ``num_draws``) or ``"full"`` (all OOD examples once).
      num_ood: examples per draw; default ``N_id // 5`` (2,000 for CIFAR).
      num_draws: draws per OOD set for ``"papers"``.
      seed: base seed of the draws.
      convention: ``"hendrycks"`` (ID positive, FPR at recall nearest 0.95) or
        ``"openood"``; passed to ``ood_jax.metrics.ood_metrics``.

    Returns:
      ``{"protocol", "convention", "num_ood", "num_draws", "seed", "draws",
      "metrics"}`` where ``draws[set] = {"seeds": [[seed, crc32(set), d], ...],
      "num_examples": n, "population": N_set, "num_draws": d_set}`` (draw ``d`` is
      ``draw_indices(N_set, n, seed=[seed, crc32(set), d])``) and
      ``metrics[score][set or "average"][metric] = {"mean", "std", "values"}``
      with metric values as fractions in [0, 1]; the average row's std is the
      mean of the per-set stds.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
    if not ood_scores:
        raise ValueError("ood_scores: no OOD sets given; pass at least one OOD set.")
    keys = list(id_scores)
    n_id = len(next(iter(id_scores.values())))
    if num_ood is None:
        num_ood = max(n_id // 5, 1)
    if num_ood < 1 or num_draws < 1:
        raise ValueError(
            f"num_ood and num_draws must be >= 1, got num_ood={num_ood}, num_draws={num_draws}."
        )
    _check_finite(id_scores, ood_scores)
    draws: dict[str, dict] = {}
    per_set: dict[str, dict[str, dict[str, list[float]]]] = {k: {} for k in keys}
    for set_name, set_scores in ood_scores.items():
        missing = [key for key in keys if key not in set_scores]
        if missing:
            raise ValueError(f"ood_scores[{set_name!r}]: missing score keys {missing}.")
        seeds, index_sets = _draws(
            set_name, len(set_scores[keys[0]]), protocol, num_ood, num_draws, seed
        )
        draws[set_name] = {
            "seeds": seeds,
            "num_examples": int(len(index_sets[0])),
            "population": int(len(set_scores[keys[0]])),
            "num_draws": len(index_sets),
        }
        for key in keys:
            per_set[key][set_name] = _metrics_per_draw(
                id_scores[key], set_scores[key], index_sets, convention
            )
    out_metrics = {key: _summary(per_set[key], list(ood_scores)) for key in keys}
    return {
        "protocol": protocol,
        "convention": convention,
        "num_ood": int(num_ood) if protocol == "papers" else None,
        "num_draws": int(num_draws) if protocol == "papers" else 1,
        "seed": int(seed),
        "draws": draws,
        "metrics": out_metrics,
    }


def _check_finite(
    id_scores: Mapping[str, np.ndarray], ood_scores: Mapping[str, Mapping[str, np.ndarray]]
) -> None:
    """Every non-finite score, named by score and set, in one error (metrics are
    undefined for them)."""
    sets = {"in-distribution": id_scores, **ood_scores}
    bad = []
    for set_name, set_scores in sets.items():
        for key, values in set_scores.items():
            values = np.asarray(values)
            if np.issubdtype(values.dtype, np.number):
                count = int(np.count_nonzero(~np.isfinite(values)))
                if count:
                    bad.append(f"{key!r} on {count} of {values.size} {set_name!r} examples")
    if bad:
        raise ValueError(
            f"NaN or infinite scores: {'; '.join(bad)}; metrics are undefined for them. "
            "Drop those scores (--scores) or those examples."
        )


def _draws(
    set_name: str, n_set: int, protocol: str, num_ood: int, num_draws: int, seed: int
) -> tuple[list, list[np.ndarray]]:
    """``(seeds, index sets)`` of one OOD set's draws under ``protocol``."""
    if n_set == 0:
        raise ValueError(
            f"ood_scores[{set_name!r}]: the OOD set is empty; drop it or fix its source."
        )
    if protocol == "full":
        return [], [np.arange(n_set)]
    if n_set <= num_ood:
        # Every draw would be the whole set: one draw, not num_draws copies of it
        # (whose standard deviation of 0 would look like a measured one).
        return [[*dataset_seeds(seed, set_name), 0]], [np.arange(n_set)]
    seeds = [[*dataset_seeds(seed, set_name), draw] for draw in range(num_draws)]
    return seeds, [draw_indices(n_set, num_ood, seed=draw_seed) for draw_seed in seeds]


def _metrics_per_draw(
    id_scores: np.ndarray, set_scores: np.ndarray, index_sets: Sequence[np.ndarray], convention: str
) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {metric: [] for metric in METRIC_NAMES}
    for idx in index_sets:
        result = M.ood_metrics(
            np.asarray(id_scores), np.asarray(set_scores)[idx], convention=convention
        )
        for metric in METRIC_NAMES:
            values[metric].append(float(result[metric]))
    return values


def _summary(per_set: Mapping[str, Mapping[str, list[float]]], names: Sequence[str]) -> dict:
    """Mean, std and values per set and metric, and the average over the sets (its std
    the mean of the per-set stds)."""
    table: dict[str, dict] = {
        set_name: {
            metric: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v}
            for metric, v in values.items()
        }
        for set_name, values in per_set.items()
    }
    table["average"] = {
        metric: {
            "mean": float(np.mean([table[name][metric]["mean"] for name in names])),
            "std": float(np.mean([table[name][metric]["std"] for name in names])),
        }
        for metric in METRIC_NAMES
    }
    return table
