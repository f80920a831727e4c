"""The study's report: ``results.md``, ``results.json`` and ``plots/*.png``, one
function per section of ``results.md``."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.methods import get as get_method
from experiments.study.report.claims import MIN_MARGIN, claims
from experiments.study.report.density import (
    density_evidence,
    density_split,
    density_split_rows,
    density_split_summary,
    density_summary,
)
from experiments.study.report.figures import write_plots
from experiments.study.report.runs import (
    ADVERSARIAL,
    FAR,
    NEAR,
    REAL,
    SYNTHETIC,
    by_method,
    format_cell,
    load_runs,
    lr_of,
    summarize,
    sweep_runs,
)
from experiments.study.report.tables import (
    logit_shift_rows,
    main_table,
    near_far_table,
    openood_rows,
    openood_table,
    per_set_tables,
    sweep_table,
)
from ood_jax.evaluate.report import markdown_table, write_json


def write(
    root: str,
    report_dir: str,
    runs: Sequence[Any],
    *,
    complete: bool,
    command: str = "python -m experiments.study --workdir runs/study",
) -> dict:
    """Writes the study's report; returns the ``results.json`` dict."""
    loaded = load_runs(root, runs)
    missing = [r.name for r in runs if r.name not in loaded]
    main = by_method(loaded)
    rows = {m: summarize(es, get_method(m).headline_score) for m, es in main.items()}
    found = claims(main, sweep_runs(loaded))
    num_classes = (
        next(iter(loaded.values()))["results"]["diagnostics"]["weights"]["num_classes"]
        if loaded
        else 10
    )
    written = write_plots(main, rows, report_dir, num_classes)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    openood = openood_rows(main)
    split = density_split(main)
    header = _header(command, now, len(loaded), len(runs), missing, complete)
    lines = [
        *header,
        *_main_section(main, rows, openood),
        *_set_sections(rows),
        *_claims_section(found),
        *_sweep_section(loaded, main),
        *_density_section(main, split),
        *_logit_shift_section(main),
        *["", "## Plots", ""],
        *[f"![{p}]({p})" for p in written],
    ]
    summary = {
        "command": command,
        "written": now,
        "runs": sorted(loaded),
        "missing": missing,
        "complete": complete and not missing,
        "rows": rows,
        "claims": found,
        "density_split": split,
        "openood_convention": openood,
        "plots": written,
    }
    write_json(summary, os.path.join(report_dir, "results.json"))
    with open(os.path.join(report_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary


def _header(
    command: str, now: str, reported: int, planned: int, missing: Sequence[str], complete: bool
) -> list[str]:
    """The title and what the report covers: command, runs, protocol, sets."""
    return [
        "# Reproduction study at CPU scale: CIFAR-10 (JPEG), ResNet-9 (width 16)",
        "",
        f"- command: `{command}`; written {now} on {platform.machine()} "
        f"({os.cpu_count()} cores), Python {platform.python_version()}",
        f"- runs reported: {reported} of {planned}"
        + (f"; not finished yet: {', '.join(missing)}" if missing else "")
        + ("" if complete else " (the study is still running: rerun the command to continue)"),
        "- protocol: the papers' (2,000 OOD images per draw from the full sets, 10 draws; "
        "sets of at most 2,000 images used whole, once), Hendrycks convention (ID positive), "
        "every score on the same examples; numbers in %, mean ± std over seeds of each run's "
        "average over the sets.",
        "- real sets: "
        + ", ".join(REAL)
        + "; synthetic: "
        + ", ".join(SYNTHETIC)
        + f"; the adversarial-noise set ({ADVERSARIAL}) is in the per-set tables.",
        "- † trained with Tiny ImageNet outliers: the TinyImageNet sets are near-auxiliary "
        "for them (their real-set numbers are not comparable with the others').",
    ]


def _main_section(
    main: Mapping[str, list[dict]], rows: Mapping[str, dict], openood: Mapping[str, dict]
) -> list[str]:
    """The main table, the learning rates, CE's energy score and the OpenOOD convention."""
    lines = ["", "## Main table", "", *main_table(rows)]
    other_lr = _lr_notes(main)
    if other_lr:
        lines += ["", other_lr]
    if "ce" in main:
        ce_energy = summarize(main["ce"], "energy")
        lines += [
            "",
            f"Cross-entropy with the energy score: real FPR95 "
            f"{format_cell(ce_energy['real/fpr95'])}, AUROC "
            f"{format_cell(ce_energy['real/auroc'])}.",
        ]
    if openood:
        lines += [
            "",
            "The same runs in the OpenOOD convention (OOD is the positive class: FPR95 is "
            "the share of ID test images flagged once 95% of the OOD images are, AUPR "
            "the trapezoid area), recomputed from the saved scores on the same draws:",
            "",
            *openood_table(openood),
        ]
    return lines


def _lr_notes(main: Mapping[str, list[dict]]) -> str:
    """A sentence naming the from-scratch methods trained at another peak lr than CE."""
    if "ce" not in main:
        return ""
    ce_lr = lr_of(main["ce"][0])
    other = {
        m: lr_of(es[0])
        for m, es in main.items()
        if not get_method(m).near_auxiliary and m != "ce" and lr_of(es[0]) != ce_lr
    }
    if not other:
        return ""
    names = ", ".join(f"{get_method(m).label} at {lr:g}" for m, lr in other.items())
    return (
        f"Peak learning rate {ce_lr:g} for the from-scratch methods except {names} "
        "(see the sweeps)."
    )


def _set_sections(rows: Mapping[str, dict]) -> list[str]:
    """The per-set tables and OpenOOD's near / far grouping."""
    return [
        "",
        "## Per set",
        *per_set_tables(rows),
        "",
        "## Near / far (OpenOOD's grouping)",
        "",
        "Near: " + ", ".join(NEAR) + "; far: " + ", ".join(FAR) + ".",
        "",
        *near_far_table(rows),
    ]


def _claims_section(found: Sequence[Mapping[str, str]]) -> list[str]:
    """Each paper's claim and its verdict here."""
    return [
        "",
        "## The papers' claims, as measured here",
        "",
        f'A comparison "holds" when the difference exceeds both the seeds\' combined '
        f"standard deviations and {100 * MIN_MARGIN:.0f} point.",
        "",
        *markdown_table(
            ["paper", "claim", "here", "evidence"],
            [[c["paper"], c["claim"], f"**{c['verdict']}**", c["evidence"]] for c in found],
        ),
    ]


def _sweep_section(loaded: Mapping[str, dict], main: Mapping[str, list[dict]]) -> list[str]:
    """The schedule, temperature and learning-rate sweeps."""
    return [
        "",
        "## Sweeps: schedule, temperature, learning rate",
        "",
        "Seed 0 unless marked; MSP on the real sets, MMC (%) on low-pass uniform noise "
        "(CEDA and ACET's training noise). The LogitNorm "
        "rows check whether it needs a longer schedule or another temperature to reach CE's "
        "accuracy; the lr rows are CEDA at the peak lr of the other from-scratch methods "
        "(the main CEDA and ACET runs use the authors' lower one) and CE at CEDA and "
        "ACET's lr, the baseline of their claims.",
        "",
        *sweep_table(loaded, main),
    ]


def _density_section(main: Mapping[str, list[dict]], split: Mapping[str, dict]) -> list[str]:
    """The density scores' AUROC and, where recorded, where their distance comes from."""
    header = ["method", "Mahalanobis", "Mahalanobis (L2)", "GMM", "GMM (L2)"]
    header += ["ID ‖z‖", "OOD ‖z‖"]
    lines = [
        "",
        "## Density scores (Mahalanobis, GMM) on these models",
        "",
        "AUROC (%) over the real sets of the class-conditional density scores on the raw "
        "features and on L2-normalized features, and the median feature norm of ID test "
        "and real OOD images (mean over the sets):",
        "",
        *markdown_table(header, density_evidence(main)),
        "",
        *density_summary(main),
    ]
    if split:
        parts = [f"{v} {p}" for v in ("raw", "L2") for p in ("total", "top", "rest")]
        lines += [
            "",
            "Where the distance comes from. Whitening by the tied covariance divides each "
            "direction's squared offset from the nearest class mean by that direction's "
            "variance, so the directions of least variance weigh most. Median squared "
            "distance of ID test vs real OOD images (mean over the sets), in total, along "
            "the K - 1 directions of largest variance (top) and along the others (rest), "
            "on raw and on L2-normalized features:",
            "",
            *markdown_table(["method", *parts], density_split_rows(split)),
            "",
            *density_split_summary(split),
        ]
    return lines


def _logit_shift_section(main: Mapping[str, list[dict]]) -> list[str]:
    """How the logit shift every class shares separates energy and max-logit from MSP."""
    return [
        "",
        "## The logit shift every class shares",
        "",
        "The mean of a model's logits over the classes shifts every logit alike: softmax "
        "(MSP) ignores it, energy and max-logit do not. Median mean logit of ID test and "
        "real OOD inputs, and the AUROC (%) over the real sets of MSP, energy and max-logit:",
        "",
        *markdown_table(
            ["method", "ID mean logit", "OOD mean logit", "MSP", "energy", "max-logit"],
            logit_shift_rows(main),
        ),
    ]
