"""The finished runs of the study, read from their workdirs, and their numbers per method.

A run's number for a group of sets is the mean over the sets of its per-set means
(papers' protocol); a method's cell is the mean ± standard deviation of that number
over its seeds (:func:`mean_std`). A method's name in the report, its own score and
whether its Tiny ImageNet results are near-auxiliary are its record's
(:mod:`experiments.methods`: ``label``, ``headline_score``, ``near_auxiliary``); the
methods' order is ``experiments.methods.STUDY_ORDER``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments.methods import STUDY_ORDER
from ood_jax import data as D
from ood_jax.train.logging import METRICS_FILE, read_metrics

# The study's sets: the CIFAR-10 offline suite and the synthetic sets (ood_jax.data).
REAL = D.get_dataset_spec("cifar10").default_ood_sets("local")
SYNTHETIC = D.SYNTHETIC_OOD_SETS
ADVERSARIAL = "adversarial_noise"
# The noise CEDA/ACET train on and their authors evaluate on (low-pass filtered uniform
# noise and pixel permutations), and unfiltered noise the training never shows.
AUTHORS_NOISE = ("lowpass_uniform", "permuted_pixels")
OTHER_NOISE = ("uniform", "gaussian")
# OpenOOD's split for CIFAR-10: Tiny ImageNet is near-OOD, textures and noise far-OOD.
NEAR = ("tinyimagenet_crop", "tinyimagenet_resize")
FAR = ("textures_partial", *SYNTHETIC)
METRICS = (("fpr95", "FPR95↓"), ("auroc", "AUROC↑"), ("aupr_in", "AUPR-In↑"))
PROTOCOL = "papers"


def load_runs(root: str, runs: Sequence[Any]) -> dict[str, dict]:
    """``{run name: {"run", "results", "metrics", "scores_path"}}`` of the finished runs."""
    loaded = {}
    for run in runs:
        workdir = os.path.join(root, run.name)
        path = os.path.join(workdir, "eval", "results.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            results = json.load(f)
        has_log = os.path.exists(os.path.join(workdir, METRICS_FILE))
        scores_path = os.path.join(workdir, "eval", "scores.npz")
        loaded[run.name] = {
            "run": run,
            "results": results,
            "metrics": read_metrics(workdir) if has_log else [],
            "scores_path": scores_path if os.path.exists(scores_path) else None,
        }
    return loaded


def load_scores(entry: Mapping) -> Mapping[str, np.ndarray] | None:
    """A loaded run's saved per-example scores (``eval/scores.npz``), None if not saved."""
    return np.load(entry["scores_path"]) if entry["scores_path"] else None


def real_sets(available: Iterable[str]) -> list[str]:
    """The real OOD sets among ``available``; all of ``available`` when none is real (a
    trial on synthetic sets only)."""
    available = [a for a in available if a not in (ADVERSARIAL, "average")]
    return [s for s in REAL if s in available] or list(available)


def id_set(results: Mapping) -> str:
    """The in-distribution test set's name in a run's results."""
    return results["data"]["id"]["name"]


def lr_of(entry: Mapping) -> float:
    """A loaded run's peak learning rate."""
    return float(entry["results"]["config"]["optim"]["lr"])


def epochs_of(entry: Mapping) -> int:
    """A loaded run's training epochs."""
    return int(entry["results"]["config"]["train"]["epochs"])


def set_metric(results: Mapping, score: str, sets: Sequence[str], metric: str) -> float:
    """Mean over those of ``sets`` that were evaluated of the per-set mean of ``metric``
    (papers' protocol); NaN if none was, or if the run has no metrics for ``score`` (a
    score skipped for that model)."""
    table = results["ood"][PROTOCOL]["metrics"].get(score, {})
    values = [table[s][metric]["mean"] for s in sets if s in table]
    return float(np.mean(values)) if values else float("nan")


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean, population std, count and list of the finite ``values`` (NaN if none)."""
    values = [float(v) for v in values if np.isfinite(v)]
    return {
        "mean": float(np.mean(values)) if values else float("nan"),
        "std": float(np.std(values)) if values else float("nan"),
        "n": len(values),
        "values": values,
    }


def format_cell(cell: Mapping[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    """A :func:`mean_std` cell as text: ``mean ± std`` (scaled), the mean alone for one
    value, ``–`` for none."""
    if not cell["n"]:
        return "–"
    text = f"{scale * cell['mean']:.{digits}f}"
    return f"{text} ± {scale * cell['std']:.{digits}f}" if cell["n"] > 1 else text


def by_method(loaded: Mapping[str, dict], group: str = "main") -> dict[str, list[dict]]:
    """Finished runs of ``group`` per method, in seed order."""
    out: dict[str, list[dict]] = {}
    for entry in loaded.values():
        run = entry["run"]
        if run.group == group:
            out.setdefault(run.method, []).append(entry)
    for entries in out.values():
        entries.sort(key=lambda e: e["run"].seed)
    return {m: out[m] for m in STUDY_ORDER if m in out}


def sweep_runs(loaded: Mapping[str, dict]) -> dict[str, dict]:
    """The finished sweep runs by name."""
    return {k: e for k, e in loaded.items() if e["run"].group == "sweep"}


def summarize(entries: Sequence[dict], score: str) -> dict[str, Any]:
    """Accuracy, ECE, MMC and set-group metrics of ``score`` over a method's seeds."""
    res = [e["results"] for e in entries]
    row: dict[str, Any] = {
        "seeds": [e["run"].seed for e in entries],
        "score": score,
        "accuracy": mean_std([r["classification"]["accuracy"] for r in res]),
        "ece": mean_std([r["classification"]["ece"] for r in res]),
    }
    for group, sets in (("real", REAL), ("synthetic", SYNTHETIC), ("near", NEAR), ("far", FAR)):
        for metric, _ in METRICS:
            row[f"{group}/{metric}"] = mean_std([set_metric(r, score, sets, metric) for r in res])
    for s in (*REAL, *SYNTHETIC, ADVERSARIAL):  # n = 0 where a set was not evaluated
        for metric, _ in METRICS:
            row[f"{s}/{metric}"] = mean_std([set_metric(r, score, [s], metric) for r in res])
    mmc = [{("id" if k == id_set(r) else k): v for k, v in r["mmc"].items()} for r in res]
    mmc_sets = ("id", *AUTHORS_NOISE, *OTHER_NOISE, ADVERSARIAL, *REAL)
    row["mmc"] = {s: mean_std([m[s] for m in mmc]) for s in mmc_sets if all(s in m for m in mmc)}
    return row
