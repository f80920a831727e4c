"""The density scores (Mahalanobis, GMM) on the study's models, and where their
squared distance comes from (the directions of large and of small variance)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments.methods import get as get_method
from experiments.study.report.runs import (
    PROTOCOL,
    format_cell,
    id_set,
    mean_std,
    real_sets,
    set_metric,
)

DENSITY = ("mahalanobis", "mahalanobis_l2", "gmm", "gmm_l2")


def density_evidence(main: Mapping[str, list[dict]]) -> list[list[str]]:
    """Rows: method, AUROC of each density score (plain and L2), and where OOD falls."""
    rows = []
    for method, entries in main.items():
        res = [e["results"] for e in entries]
        scores = res[0]["ood"][PROTOCOL]["metrics"]
        sets = real_sets(scores["msp"])
        cells = []
        for score in DENSITY:
            if score in scores:
                cells.append(
                    format_cell(mean_std([set_metric(r, score, sets, "auroc") for r in res]))
                )
            else:
                cells.append("–")
        id_norm = mean_std(
            [r["diagnostics"]["features"][id_set(r)]["feature_norm"]["q50"] for r in res]
        )
        ood_norm = mean_std(
            [
                np.mean([r["diagnostics"]["features"][s]["feature_norm"]["q50"] for s in sets])
                for r in res
            ]
        )
        rows.append(
            [
                get_method(method).label,
                *cells,
                format_cell(id_norm, 1, 2),
                format_cell(ood_norm, 1, 2),
            ]
        )
    return rows


def density_summary(main: Mapping[str, list[dict]]) -> list[str]:
    """Sentences computed from the density evidence (no number is typed in by hand)."""
    lines = []
    for method, entries in main.items():
        res = [e["results"] for e in entries]
        scores = res[0]["ood"][PROTOCOL]["metrics"]
        if not all(k in scores for k in ("mahalanobis", "mahalanobis_l2")):
            continue
        sets = real_sets(scores["msp"])
        plain = mean_std([set_metric(r, "mahalanobis", sets, "auroc") for r in res])
        unit = mean_std([set_metric(r, "mahalanobis_l2", sets, "auroc") for r in res])
        feats = [r["diagnostics"]["features"] for r in res]
        smaller = sum(
            f[s]["feature_norm"]["q50"] < f[id_set(r)]["feature_norm"]["q50"]
            for f, r in zip(feats, res, strict=True)
            for s in sets
            if s in f
        )
        total = sum(s in f for f in feats for s in sets)
        lines.append(
            f"- {get_method(method).label}: Mahalanobis AUROC {format_cell(plain)} on the raw "
            f"features, {format_cell(unit)} on L2-normalized ones; the median ‖z‖ of a real "
            f"OOD set is below the ID median in {smaller} of {total} (run, set) pairs."
        )
    return lines


def _split_medians(results: Mapping, variant: str, part: str, sets: Sequence[str]):
    """(ID test median, mean over ``sets`` of the OOD medians) of a distance part, or None."""
    split = results["diagnostics"].get("mahalanobis_split", {}).get(variant)
    if not split or any(s not in split for s in sets):
        return None
    return (
        split[id_set(results)][part]["q50"],
        float(np.mean([split[s][part]["q50"] for s in sets])),
    )


def density_split(main: Mapping[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Per method, ID test vs real-OOD medians of each part of the squared distance
    (mean ± std over the seeds that recorded it)."""
    out = {}
    for method, entries in main.items():
        res = [e["results"] for e in entries]
        sets = real_sets(res[0]["ood"][PROTOCOL]["metrics"]["msp"])
        row = {}
        for variant in ("raw", "l2"):
            for part in ("total", "top", "rest"):
                pairs = [_split_medians(r, variant, part, sets) for r in res]
                pairs = [p for p in pairs if p is not None]
                row[f"{variant}/{part}"] = (
                    mean_std([p[0] for p in pairs]),
                    mean_std([p[1] for p in pairs]),
                )
        feats = [r["diagnostics"]["features"] for r in res]
        row["norm"] = (
            mean_std(
                [f[id_set(r)]["feature_norm"]["q50"] for f, r in zip(feats, res, strict=True)]
            ),
            mean_std([np.mean([f[s]["feature_norm"]["q50"] for s in sets]) for f in feats]),
        )
        if row["raw/total"][0]["n"]:
            out[method] = row
    return out


def density_split_rows(split: Mapping[str, dict]) -> list[list[str]]:
    """Table rows of :func:`density_split`: ``ID vs OOD`` per variant and part."""

    def pair(cell):
        return f"{format_cell(cell[0], 1, 0)} vs {format_cell(cell[1], 1, 0)}"

    return [
        [get_method(m).label]
        + [pair(row[f"{v}/{p}"]) for v in ("raw", "l2") for p in ("total", "top", "rest")]
        for m, row in split.items()
    ]


def density_split_summary(split: Mapping[str, dict]) -> list[str]:
    """Sentences computed from the split (which part of the distance separates OOD)."""
    lines = []
    for method, row in split.items():
        (id_rest, ood_rest), (id_top, ood_top) = row["raw/rest"], row["raw/top"]
        (id_total, _), (l2_id_rest, l2_ood_rest) = row["raw/total"], row["l2/rest"]
        share = id_rest["mean"] / id_total["mean"]
        lines.append(
            f"- {get_method(method).label}: on the raw features the low-variance directions "
            f"carry {100 * share:.0f}% of an ID test image's squared distance; there real "
            f"OOD images sit at {ood_rest['mean']:.0f} against ID's {id_rest['mean']:.0f} "
            f"(ratio {ood_rest['mean'] / id_rest['mean']:.2f}), while along the K - 1 "
            f"largest-variance directions they sit at {ood_top['mean']:.1f} against "
            f"{id_top['mean']:.1f} (ratio {ood_top['mean'] / id_top['mean']:.2f}). On "
            f"L2-normalized features the low-variance part is {l2_ood_rest['mean']:.0f} "
            f"against {l2_id_rest['mean']:.0f} (ratio "
            f"{l2_ood_rest['mean'] / l2_id_rest['mean']:.2f})."
        )
    pattern = [
        m
        for m, row in split.items()
        if row["raw/rest"][1]["mean"] <= 1.05 * row["raw/rest"][0]["mean"]
        and row["raw/top"][1]["mean"] > 1.1 * row["raw/top"][0]["mean"]
        and row["l2/rest"][1]["mean"] > 1.2 * row["l2/rest"][0]["mean"]
        and row["norm"][1]["mean"] < row["norm"][0]["mean"]
    ]
    if pattern:
        names = ", ".join(get_method(m).label for m in pattern)
        lines += [
            "",
            f"Reading ({names}): OOD features do leave the class clusters, but along the "
            "few directions of large variance, which whitening discounts; in the many "
            "directions of small variance, which make up most of the distance, they stray "
            "no further than ID test features, which are longer (the ‖z‖ columns above: a "
            "shorter feature strays less in absolute terms). The raw-feature distance "
            "therefore hardly tells them apart. L2 normalization removes the length, and "
            "there the OOD offsets exceed ID's.",
        ]
    return lines
