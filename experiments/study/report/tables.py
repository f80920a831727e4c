"""The study report's tables, as Markdown lines (or rows): the main table, per set,
near / far, the OpenOOD convention, the sweeps and the shared logit shift."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from experiments.methods import get as get_method
from experiments.study.report.runs import (
    ADVERSARIAL,
    METRICS,
    PROTOCOL,
    REAL,
    SYNTHETIC,
    format_cell,
    id_set,
    load_scores,
    mean_std,
    real_sets,
    set_metric,
    summarize,
    sweep_runs,
)
from ood_jax.evaluate.report import markdown_table


def main_table(rows: Mapping[str, dict]) -> list[str]:
    """Each method with its own score: accuracy, ECE, real and synthetic metrics."""
    header = ["method (score)", "seeds", "accuracy", "ECE"]
    header += [f"real {h}" for _, h in METRICS] + [f"synthetic {h}" for _, h in METRICS]
    body = []
    for method, row in rows.items():
        mark = " †" if get_method(method).near_auxiliary else ""
        body.append(
            [
                f"{get_method(method).label} ({row['score']}){mark}",
                str(len(row["seeds"])),
                format_cell(row["accuracy"]),
                format_cell(row["ece"]),
            ]
            + [format_cell(row[f"real/{m}"]) for m, _ in METRICS]
            + [format_cell(row[f"synthetic/{m}"]) for m, _ in METRICS]
        )
    return markdown_table(header, body)


def per_set_tables(rows: Mapping[str, dict]) -> list[str]:
    """FPR95 and AUROC on each evaluated set, one table each."""
    lines = []
    for metric, title in (("fpr95", "FPR95↓"), ("auroc", "AUROC↑")):
        sets = [
            s
            for s in (*REAL, *SYNTHETIC, ADVERSARIAL)
            if any(r[f"{s}/{metric}"]["n"] for r in rows.values())
        ]
        body = [
            [f"{get_method(m).label} ({r['score']})"]
            + [format_cell(r[f"{s}/{metric}"]) for s in sets]
            for m, r in rows.items()
        ]
        lines += ["", f"{title} per set:", ""] + markdown_table(["method (score)", *sets], body)
    return lines


def near_far_table(rows: Mapping[str, dict]) -> list[str]:
    """FPR95 and AUROC over OpenOOD's near and far sets."""
    header = ["method (score)"] + [f"near {h}" for _, h in METRICS[:2]]
    header += [f"far {h}" for _, h in METRICS[:2]]
    body = [
        [f"{get_method(m).label} ({r['score']})"]
        + [format_cell(r[f"near/{x}"]) for x, _ in METRICS[:2]]
        + [format_cell(r[f"far/{x}"]) for x, _ in METRICS[:2]]
        for m, r in rows.items()
    ]
    return markdown_table(header, body)


def openood_rows(main: Mapping[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Each method's headline score in the OpenOOD convention (OOD positive, FPR at the
    first threshold reaching 95% OOD recall, trapezoid AUPR), recomputed from the saved
    per-example scores with the run's own draws (same seed, same examples)."""
    from ood_jax.evaluate.protocol import evaluate_ood

    out = {}
    for method, entries in main.items():
        score, per_seed = get_method(method).headline_score, []
        for e in entries:
            saved = load_scores(e)
            if saved is None or f"id/{score}" not in saved:
                continue
            options = e["results"]["protocol_options"]
            sets = [s for s in (*REAL, *SYNTHETIC) if f"ood/{s}/{score}" in saved]
            result = evaluate_ood(
                {score: saved[f"id/{score}"]},
                {s: {score: saved[f"ood/{s}/{score}"]} for s in sets},
                protocol=PROTOCOL,
                num_ood=options["num_ood"],
                num_draws=options["num_draws"],
                seed=options["seed"],
                convention="openood",
            )
            per_seed.append({"ood": {PROTOCOL: result}})
        if per_seed:
            row = {"score": score, "seeds": len(per_seed)}
            for group, sets in (("real", REAL), ("synthetic", SYNTHETIC)):
                for metric in ("fpr95", "auroc", "aupr_in", "aupr_out"):
                    row[f"{group}/{metric}"] = mean_std(
                        [set_metric(r, score, sets, metric) for r in per_seed]
                    )
            out[method] = row
    return out


def openood_table(rows: Mapping[str, dict]) -> list[str]:
    """:func:`openood_rows` as a table: FPR95, AUROC, AUPR-Out over real and synthetic."""
    metrics = (("fpr95", "FPR95↓"), ("auroc", "AUROC↑"), ("aupr_out", "AUPR-Out↑"))
    header = ["method (score)"] + [f"{g} {h}" for g in ("real", "synthetic") for _, h in metrics]
    body = [
        [f"{get_method(m).label} ({r['score']})"]
        + [format_cell(r[f"{g}/{k}"]) for g in ("real", "synthetic") for k, _ in metrics]
        for m, r in rows.items()
    ]
    return markdown_table(header, body)


def sweep_table(loaded: Mapping[str, dict], main: Mapping[str, list[dict]]) -> list[str]:
    """The main CE, LogitNorm and CEDA runs beside each sweep run: budget, tau, MSP."""
    entries = [
        (f"{m} (main, {len(main[m])} seed{'s' if len(main[m]) > 1 else ''})", main[m])
        for m in ("ce", "logitnorm", "ceda")
        if m in main
    ]
    entries += [(e["run"].name.split("/")[1], [e]) for e in sweep_runs(loaded).values()]
    body = []
    for name, es in entries:
        row = summarize(es, "msp")
        cfg = es[0]["results"]["config"]
        tau = cfg.get("objective", {}).get("hparams", {}).get("temperature", "–")
        body.append(
            [
                name,
                str(cfg["train"]["epochs"]),
                f"{cfg['optim']['lr']:g}",
                str(tau),
                format_cell(row["accuracy"]),
                format_cell(row["real/fpr95"]),
                format_cell(row["real/auroc"]),
                format_cell(row["mmc"].get("lowpass_uniform", mean_std([]))),
            ]
        )
    header = ["run", "epochs", "peak lr", "tau", "accuracy"]
    header += ["MSP real FPR95↓", "MSP real AUROC↑", "MMC low-pass noise"]
    return markdown_table(header, body)


def logit_shift_rows(main: Mapping[str, list[dict]]) -> list[list[str]]:
    """Per method: the median mean logit (the shift every class shares) of ID and real
    OOD inputs, and how energy and max-logit fare against MSP (AUROC, real sets)."""
    rows = []
    for method, entries in main.items():
        res = [e["results"] for e in entries]
        feats = [r["diagnostics"]["features"] for r in res]
        if not all("mean_logit" in f[id_set(r)] for f, r in zip(feats, res, strict=True)):
            continue
        sets = real_sets(res[0]["ood"][PROTOCOL]["metrics"]["msp"])
        id_shift = mean_std(
            [f[id_set(r)]["mean_logit"]["q50"] for f, r in zip(feats, res, strict=True)]
        )
        ood_shift = mean_std([np.mean([f[s]["mean_logit"]["q50"] for s in sets]) for f in feats])
        auroc = {
            k: mean_std([set_metric(r, k, sets, "auroc") for r in res])
            for k in ("msp", "energy", "max_logit")
        }
        rows.append(
            [get_method(method).label, format_cell(id_shift, 1, 2), format_cell(ood_shift, 1, 2)]
            + [format_cell(auroc[k]) for k in ("msp", "energy", "max_logit")]
        )
    return rows
