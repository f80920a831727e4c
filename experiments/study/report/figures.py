"""The study report's PNG plots: logit norms during training, feature norms, each
method's own score, and the mean max confidence per set."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from experiments.methods import get as get_method
from experiments.study.report.runs import (
    ADVERSARIAL,
    AUTHORS_NOISE,
    OTHER_NOISE,
    REAL,
    load_scores,
    real_sets,
)
from ood_jax.evaluate import plots as P


def write_plots(
    main: Mapping[str, list[dict]], rows: Mapping[str, dict], report_dir: str, num_classes: int
) -> list[str]:
    """Draws every plot that has data into ``report_dir/plots``; returns their paths
    relative to ``report_dir``."""
    os.makedirs(os.path.join(report_dir, "plots"), exist_ok=True)
    written = []
    for name, draw in (
        ("logit_norm_ce_vs_logitnorm.png", lambda p: plot_logit_norm(main, p)),
        ("feature_norm_ce_vs_l2.png", lambda p: plot_feature_norms(main, p)),
        ("scores_per_method.png", lambda p: plot_score_histograms(main, p)),
        ("mmc_per_method.png", lambda p: plot_mmc(rows, p, num_classes)),
    ):
        if draw(os.path.join(report_dir, "plots", name)):
            written.append(f"plots/{name}")
    return written


def _saved_sets(saved, key: str) -> list[str]:
    """OOD set names with ``ood/<set>/<key>`` (or ``geometry/<set>/<key>``) in ``saved``."""
    names = []
    for k in saved.files:
        parts = k.split("/")
        if len(parts) == 3 and parts[0] in ("ood", "geometry") and parts[2] == key:
            if parts[1] != "id":
                names.append(parts[1])
    return list(dict.fromkeys(names))


def plot_logit_norm(main: Mapping[str, list[dict]], path: str) -> bool:
    """CE's and LogitNorm's logit norm per epoch, one line per seed; False if no run
    logged it (nothing written)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    drawn = False
    for method, color in (("ce", "tab:blue"), ("logitnorm", "tab:orange")):
        for i, e in enumerate(main.get(method, [])):
            recs = [r for r in e["metrics"] if "logit_norm" in r]
            if recs:
                ax.plot(
                    [r["epoch"] for r in recs],
                    [r["logit_norm"] for r in recs],
                    color=color,
                    alpha=0.8,
                    label=get_method(method).label if i == 0 else None,
                    marker="o",
                )
                drawn = True
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean logit norm ||f(x)|| (training batches)")
    ax.set_yscale("log")
    ax.set_title("Logit norm during training (one line per seed)")
    ax.legend(loc="upper right", framealpha=0.7)
    if drawn:
        P.save_figure(fig, path)
    return drawn


def plot_feature_norms(main: Mapping[str, list[dict]], path: str) -> bool:
    """Feature-norm histograms of CE's and L2's first seed, ID vs the real OOD sets."""
    methods = [m for m in ("ce", "l2norm") if m in main and main[m][0]["scores_path"]]
    if not methods:
        return False
    fig = Figure(figsize=(5 * len(methods), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(methods)))
    for ax, method in zip(axes, methods, strict=True):
        saved = load_scores(main[method][0])
        groups = {"ID test": saved["geometry/id/feature_norm"]}
        sets = real_sets(_saved_sets(saved, "feature_norm"))
        groups.update({s: saved[f"geometry/{s}/feature_norm"] for s in sets})
        edges = P.robust_edges(*groups.values())
        for name, values in groups.items():
            shown, _ = P.clipped(values, edges)
            ax.hist(shown, bins=edges, density=True, histtype="step", linewidth=1.5, label=name)
        ax.set_xlabel("feature norm ||z||")
        ax.set_ylabel("density")
        ax.set_title(f"{get_method(method).label} (seed {main[method][0]['run'].seed})", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    P.save_figure(fig, path)
    return True


def plot_score_histograms(main: Mapping[str, list[dict]], path: str) -> bool:
    """Each method's own score (first seed), ID vs the real OOD sets pooled."""
    methods = [m for m in main if main[m][0]["scores_path"]]
    if not methods:
        return False
    fig, axes = P.figure_grid(len(methods))
    for ax, method in zip(axes, methods, strict=False):
        score = get_method(method).headline_score
        saved = load_scores(main[method][0])
        id_values = saved[f"id/{score}"]
        sets = real_sets(_saved_sets(saved, score))
        ood = np.concatenate([saved[f"ood/{s}/{score}"] for s in sets])
        edges = P.robust_edges(id_values, ood)
        ood_label = "real OOD sets" if sets == [x for x in REAL if x in sets] else "OOD sets"
        for name, values in (("ID test", id_values), (ood_label, ood)):
            shown, _ = P.clipped(values, edges)
            ax.hist(shown, bins=edges, density=True, alpha=0.5, histtype="stepfilled", label=name)
        ax.set_xlabel(f"{score} (higher = more in-distribution)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.set_title(f"{get_method(method).label}", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.suptitle("Each method's own score: ID vs the real OOD sets (seed 0)", fontsize=10)
    P.save_figure(fig, path)
    return True


def plot_mmc(rows: Mapping[str, dict], path: str, num_classes: int) -> bool:
    """Mean max softmax confidence per method on the ID test set and the noise sets."""
    sets = [
        s
        for s in ("id", *AUTHORS_NOISE, *OTHER_NOISE, ADVERSARIAL)
        if any(s in r["mmc"] for r in rows.values())
    ]
    if not rows or not sets:
        return False
    fig = Figure(figsize=(10, 4))
    ax = fig.subplots()
    width = 0.8 / len(rows)
    for i, (method, row) in enumerate(rows.items()):
        x = np.arange(len(sets)) + i * width
        means = [100 * row["mmc"][s]["mean"] if s in row["mmc"] else np.nan for s in sets]
        stds = [100 * row["mmc"][s]["std"] if s in row["mmc"] else 0 for s in sets]
        ax.bar(x, means, width, yerr=stds, label=get_method(method).label, capsize=2)
    ax.axhline(100 / num_classes, color="black", linestyle="--", linewidth=1, label="1/K")
    ax.set_xticks(np.arange(len(sets)) + 0.4 - width / 2)
    ax.set_xticklabels(["ID test" if s == "id" else s for s in sets], fontsize=8)
    ax.set_ylabel("mean max softmax confidence (%)")
    ax.set_ylim(0, 105)
    ax.set_title("MMC per method (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    P.save_figure(fig, path)
    return True
