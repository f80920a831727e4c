"""The regime study's report: do the papers' claims hold once CE is overconfident?

``write(root, report_dir, runs)`` reads the planned runs (:func:`experiments.study.regime.plan`;
CE seed 0 is the pilot) under ``root`` and writes ``report.md``, ``report.json`` and
``plots/regime_over_training.png`` into ``report_dir``:

1. the regime: the rule (:data:`~experiments.study.regime.RULE`) and each run's final
   regime record against it; per measured epoch, CE against LogitNorm (both
   temperatures), L2 and CE with L2's architecture (``regime.jsonl``, from ``measure``;
   the training log's batch averages in the figure too);
2. the main table: per run name, accuracy, ECE and, over the real OOD sets, FPR95 and
   AUROC of MSP, energy, the feature norm and the method's own score;
3. the papers' claims with their verdicts (:mod:`~experiments.study.report.claims`).

A run counts as finished once it has ``eval/results.json``; a run's regime records and
training log are read whether or not it has, so the regime section grows while the
study runs. Numbers are means ± population std over the seeds that have them.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from experiments.methods import get as get_method
from experiments.study.plan import Run
from experiments.study.regime import FINETUNED, RULE, RUNS, meets_rule, read_regime
from experiments.study.report.claims import (
    FINETUNE_PAPERS,
    MIN_MARGIN,
    ece_claim,
    finetune_claim,
    l2norm_claim,
    logitnorm_claim,
    pearce_claims,
)
from experiments.study.report.runs import REAL, format_cell, load_runs, mean_std, summarize
from ood_jax.evaluate import plots as P
from ood_jax.evaluate.report import markdown_table, write_json
from ood_jax.train.logging import METRICS_FILE, read_metrics

# Each run name of the plan (RUNS, then FINETUNED) as the report names it.
LABELS = {
    "ce": "CE",
    "logitnorm": "LogitNorm (tau 0.04)",
    "logitnorm_tau0.01": "LogitNorm (tau 0.01)",
    "l2norm": "L2 feature norm",
    "ce_l2arch": "CE, L2's architecture",
    "energy_ft": "Energy FT",
    "oe": "Outlier exposure (FT)",
}
# Compared over training: the from-scratch runs (the fine-tuned ones start at CE's end).
SCRATCH = tuple(RUNS)
COLORS = {
    "ce": "tab:blue",
    "logitnorm": "tab:orange",
    "logitnorm_tau0.01": "tab:red",
    "l2norm": "tab:green",
    "ce_l2arch": "tab:purple",
}
# The scores of the main table besides each method's own.
SCORES = (("msp", "MSP"), ("energy", "energy"), ("feature_norm", "‖z‖"))
# Per measured epoch: (key of a regime record, title, scale, digits). The confidence gap
# is test MSP minus test accuracy (positive: overconfident).
EPOCH_METRICS = (
    ("train_clean_accuracy", "Clean train accuracy (%)", 100.0, 1),
    ("train_clean_loss", "Clean train loss", 1.0, 3),
    ("train_clean_logit_norm", "Mean logit norm on the clean train images", 1.0, 2),
    ("test_ece", "Test ECE (%)", 100.0, 1),
    ("confidence_gap", "Test mean MSP minus test accuracy (points)", 100.0, 1),
)
# The training log's per-epoch averages over the augmented batches (the figure's dashes).
LOG_METRICS = ("logit_norm", "train_accuracy")
# Most rows of a per-epoch table (every k-th measured epoch, and the last).
MAX_EPOCH_ROWS = 20
LOGITNORM_PAPER = "LogitNorm (Wei et al. 2022)"


def name_of(run: Run) -> str:
    """A run's name in the report: its folder's first part; the pilot is CE seed 0."""
    return "ce" if run.group == "pilot" else run.name.split("/")[0]


def by_name(loaded: Mapping[str, dict]) -> dict[str, list[dict]]:
    """The loaded runs per run name (in :data:`LABELS`' order), in seed order."""
    out: dict[str, list[dict]] = {}
    for entry in loaded.values():
        out.setdefault(name_of(entry["run"]), []).append(entry)
    return {n: sorted(out[n], key=lambda e: e["run"].seed) for n in LABELS if n in out}


def load_curves(root: str, runs: Sequence[Run]) -> dict[str, dict]:
    """``{run name: {"run", "regime", "log"}}`` of the planned runs with regime records
    or a training log, finished or not."""
    out = {}
    for run in runs:
        workdir = os.path.join(root, run.name)
        has_log = os.path.exists(os.path.join(workdir, METRICS_FILE))
        curve = {"regime": read_regime(workdir), "log": read_metrics(workdir) if has_log else []}
        if curve["regime"] or curve["log"]:
            out[run.name] = {"run": run, **curve}
    return out


def rule_rows(runs: Sequence[Run], curves: Mapping[str, dict]) -> dict[str, dict]:
    """Each planned run's last regime record, the last epoch of its training log, and
    whether it meets the rule: None if not measured, or measured only part of the way
    (the last record's step before the log's)."""
    out = {}
    for run in runs:
        curve = curves.get(run.name, {"regime": [], "log": []})
        final = curve["regime"][-1] if curve["regime"] else None
        last = max(curve["log"], key=lambda r: r.get("step", 0), default=None)
        partial = final is not None and last is not None and final["step"] < last["step"]
        out[run.name] = {
            "final": final,
            "trained_epochs": None if last is None else last.get("epoch"),
            "meets_rule": None if final is None or partial else meets_rule(final),
            "fine_tunes": run.init_from,
        }
    return out


def _value(record: Mapping[str, Any], key: str) -> float | None:
    if key == "confidence_gap":
        if "test_msp" not in record or "test_accuracy" not in record:
            return None
        return record["test_msp"] - record["test_accuracy"]
    return record.get(key)


def epoch_cells(series: Sequence[Sequence[Mapping]], key: str) -> dict[float, dict]:
    """``{epoch: mean_std cell}`` of ``key`` over the runs of ``series`` (each a list of
    records with an ``epoch``) that have it at that epoch; a run's last record of an
    epoch counts."""
    values: dict[float, list[float]] = {}
    for records in series:
        per_epoch = {round(r["epoch"], 2): _value(r, key) for r in records if "epoch" in r}
        for epoch, v in per_epoch.items():
            if v is not None:
                values.setdefault(epoch, []).append(v)
    return {e: mean_std(values[e]) for e in sorted(values)}


def per_epoch(curves: Mapping[str, dict]) -> dict[str, dict[str, dict[float, dict]]]:
    """Per from-scratch run name with any: each :data:`EPOCH_METRICS` key over its
    seeds' regime records, and ``log/<key>`` of :data:`LOG_METRICS` over their logs."""
    out = {}
    for name in SCRATCH:
        mine = [c for c in curves.values() if name_of(c["run"]) == name]
        cells = {k: epoch_cells([c["regime"] for c in mine], k) for k, *_ in EPOCH_METRICS}
        cells |= {f"log/{k}": epoch_cells([c["log"] for c in mine], k) for k in LOG_METRICS}
        if any(cells.values()):
            out[name] = cells
    return out


def table_rows(groups: Mapping[str, Sequence[dict]]) -> dict[str, dict[str, Any]]:
    """The main table's numbers per run name: seeds, accuracy, ECE, and real-set FPR95
    and AUROC of each of :data:`SCORES` and the method's own score."""
    rows = {}
    for name, entries in groups.items():
        own = get_method(entries[0]["run"].method).headline_score
        row: dict[str, Any] = {"method": entries[0]["run"].method, "score": own}
        for score in dict.fromkeys((*(s for s, _ in SCORES), own)):
            summary = summarize(entries, score)
            row.update({k: summary[k] for k in ("seeds", "accuracy", "ece")})
            row[f"{score}/fpr95"] = summary["real/fpr95"]
            row[f"{score}/auroc"] = summary["real/auroc"]
        rows[name] = row
    return rows


def regime_claims(groups: Mapping[str, Sequence[dict]]) -> list[dict]:
    """Each claim on the regime study's runs; "not measured" (naming the runs not
    finished) where a side has none."""
    ce = groups.get("ce", [])
    found = []
    for name in ("logitnorm", "logitnorm_tau0.01"):
        ln, label = groups.get(name, []), LABELS[name]
        found.append((logitnorm_claim(ce, ln, name=label), ("ce", name)))
        found.append((ece_claim(ce, ln, name=label, paper=LOGITNORM_PAPER), ("ce", name)))
    l2 = l2norm_claim(
        groups.get("ce_l2arch", []), groups.get("l2norm", []), baseline="same-architecture CE"
    )
    found.append((l2, ("ce_l2arch", "l2norm")))
    for (method, paper), baseline in zip(FINETUNE_PAPERS, ("energy", "msp"), strict=True):
        tuned = finetune_claim(ce, groups.get(method, []), method, paper, baseline_score=baseline)
        found.append((tuned, ("ce", method)))
    labelled = {LABELS[n]: es for n, es in groups.items()}
    found += [(c, tuple(LABELS)) for c in pearce_claims(labelled)]
    out = []
    for claim, needed in found:
        absent = [n for n in needed if n not in groups]
        if claim["verdict"] == "not measured" and absent:
            note = f" (not finished: {', '.join(absent)})"
            claim = {**claim, "evidence": claim["evidence"] + note}
        out.append(claim)
    return out


def plot_over_training(per: Mapping[str, Mapping[str, dict]], path: str) -> bool:
    """Logit norm, clean train accuracy, test ECE and the confidence gap over training,
    mean over seeds per run name; False if nothing was measured or logged."""
    panels = (
        ("train_clean_logit_norm", "log/logit_norm", "mean logit norm ||f(x)||", 1.0),
        ("train_clean_accuracy", "log/train_accuracy", "train accuracy (%)", 100.0),
        ("test_ece", None, "test ECE (%)", 100.0),
        ("confidence_gap", None, "test MSP - test accuracy (points)", 100.0),
    )
    if not any(c for cells in per.values() for c in cells.values()):
        return False
    fig = Figure(figsize=(11, 7.5))
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, log_key, ylabel, scale) in zip(axes, panels, strict=True):
        for name, cells in per.items():
            for k, style in ((key, "-"), (log_key, "--")):
                if k and cells[k]:
                    epochs = list(cells[k])
                    means = [scale * c["mean"] for c in cells[k].values()]
                    label = LABELS[name] if style == "-" or not cells[key] else None
                    ax.plot(epochs, means, style, color=COLORS[name], label=label, marker=".")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
    axes[0].set_yscale("log")
    axes[0].set_title("Logit norm (solid: clean train images; dashed: batches)", fontsize=9)
    axes[1].axhline(100 * RULE["train_clean_accuracy_min"], color="black", linestyle=":")
    axes[1].set_title("Train accuracy (dotted: the rule's minimum)", fontsize=9)
    axes[2].axhline(100 * RULE["test_ece_min"], color="black", linestyle=":")
    axes[2].set_title("Test ECE, 15 bins (dotted: the rule's minimum)", fontsize=9)
    axes[3].axhline(0.0, color="black", linestyle=":")
    axes[3].set_title("Confidence gap (above 0: overconfident)", fontsize=9)
    axes[0].legend(fontsize=7, framealpha=0.7)
    fig.suptitle("The regime over training (mean over seeds)", fontsize=10)
    P.save_figure(fig, path)
    return True


def write(
    root: str,
    report_dir: str,
    runs: Sequence[Run],
    *,
    command: str = "python -m experiments.study.regime report",
) -> dict:
    """Writes the regime study's report from the runs under ``root``; returns the
    ``report.json`` dict."""
    loaded = load_runs(root, runs)
    groups = by_name(loaded)
    curves = load_curves(root, runs)
    per = per_epoch(curves)
    os.makedirs(os.path.join(report_dir, "plots"), exist_ok=True)
    plots = ["plots/regime_over_training.png"]
    if not plot_over_training(per, os.path.join(report_dir, plots[0])):
        plots = []
    summary = {
        "command": command,
        "written": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "rule": RULE,
        "runs": sorted(loaded),
        "missing": [r.name for r in runs if r.name not in loaded],
        "regime": rule_rows(runs, curves),
        "per_epoch": {
            n: {k: [{"epoch": e, **c} for e, c in cells.items()] for k, cells in keyed.items()}
            for n, keyed in per.items()
        },
        "rows": table_rows(groups),
        "claims": regime_claims(groups),
        "plots": plots,
    }
    lines = [
        *_header(summary, len(runs)),
        *_regime_section(summary["regime"], per, plots),
        *_main_section(summary["rows"]),
        *_claims_section(summary["claims"]),
    ]
    write_json(summary, os.path.join(report_dir, "report.json"))
    with open(os.path.join(report_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary


def _header(summary: Mapping[str, Any], planned: int) -> list[str]:
    missing = summary["missing"]
    return [
        "# The regime study: the papers' claims once CE is overconfident",
        "",
        f"- command: `{summary['command']}`; written {summary['written']}",
        f"- runs reported (with an OOD report): {len(summary['runs'])} of {planned}"
        + (f"; not finished: {', '.join(missing)}" if missing else ""),
        "- numbers in %, mean ± std over the seeds of each run name (CE seed 0 is the "
        "pilot); OOD: the papers' protocol, ID positive, the mean over the real sets ("
        + ", ".join(REAL)
        + ") of each run's per-set means",
        "- † trained with Tiny ImageNet outliers: the Tiny ImageNet sets are near-auxiliary "
        "for them.",
    ]


def _epoch_rows(epochs: Sequence[float]) -> list[float]:
    """At most :data:`MAX_EPOCH_ROWS` + 1 of ``epochs``, evenly, the last kept."""
    step = max(1, -(-len(epochs) // MAX_EPOCH_ROWS))
    shown = list(epochs[::step])
    return shown + [e for e in epochs[-1:] if e not in shown]


def _over_training_note(names: Sequence[str]) -> str:
    if not names:
        return "No from-scratch run has been measured yet."
    return (
        "Per measured epoch, mean ± std over the seeds measured at that epoch (clean: the "
        "un-augmented training images `measure` reads, not the augmented batches of the "
        "training log)."
    )


def _rule_cell(row: Mapping[str, Any]) -> str:
    verdict = "**yes**" if row["meets_rule"] else "no"
    if row["fine_tunes"]:
        # The rule says when CE is overconfident; a fine-tune's start is the CE run above.
        return f"{verdict} (a fine-tune of {row['fine_tunes']}: the rule is CE's)"
    return verdict


def _regime_section(
    rule: Mapping[str, dict], per: Mapping[str, Mapping[str, dict]], plots: Sequence[str]
) -> list[str]:
    """The rule, each run's last record against it, and the per-epoch tables."""
    body, unmeasured = [], []
    for name, row in rule.items():
        r = row["final"]
        if r is None:
            unmeasured.append(name)
            continue
        trained = row["trained_epochs"]
        partial = row["meets_rule"] is None
        body.append(
            [
                name,
                f"{r['epoch']:g}" + (f" of {trained:g}" if partial else ""),
                f"{100 * r['train_clean_accuracy']:.1f}",
                f"{100 * r['test_ece']:.1f}",
                f"{100 * r['test_msp']:.1f} / {100 * r['test_accuracy']:.1f}",
                "not yet measured to the end" if partial else _rule_cell(row),
            ]
        )
    header = ["run", "epoch", "clean train acc", "test ECE", "test MSP / acc", "meets the rule"]
    lines = ["", "## The regime", "", f"The rule (fixed before the main runs): {RULE['text']}"]
    lines += ["", "Each run's last measured checkpoint:", ""]
    lines += markdown_table(header, body) if body else ["None measured yet."]
    if unmeasured:
        lines += [
            "",
            f"Not measured yet: {', '.join(unmeasured)} (`python -m experiments.study.regime "
            "measure --workdir <study root>/<run>` once the run has finished).",
        ]
    names = [n for n in per if any(per[n][k] for k, *_ in EPOCH_METRICS)]
    lines += ["", "### Over training", "", _over_training_note(names)]
    for key, title, scale, digits in EPOCH_METRICS:
        epochs = sorted({e for n in names for e in per[n][key]})
        rows = [
            [f"{e:g}"]
            + [format_cell(per[n][key].get(e, mean_std([])), scale, digits) for n in names]
            for e in _epoch_rows(epochs)
        ]
        if rows:
            header = ["epoch", *(LABELS[n] for n in names)]
            lines += ["", f"{title}:", "", *markdown_table(header, rows)]
    for path in plots:
        lines += ["", f"![{path}]({path})"]
    return lines


def _main_section(rows: Mapping[str, dict]) -> list[str]:
    header = ["run (own score)", "seeds", "accuracy", "ECE"]
    header += [f"{t} {m}" for _, t in (*SCORES, ("", "own")) for m in ("FPR95↓", "AUROC↑")]
    body = []
    for name, row in rows.items():
        mark = " †" if get_method(row["method"]).near_auxiliary else ""
        body.append(
            [f"{LABELS[name]} ({row['score']}){mark}", str(len(row["seeds"]))]
            + [format_cell(row["accuracy"]), format_cell(row["ece"])]
            + [
                format_cell(row[f"{s}/{m}"])
                for s in (*(s for s, _ in SCORES), row["score"])
                for m in ("fpr95", "auroc")
            ]
        )
    note = (
        "Per run name, over the real sets: FPR95 and AUROC of MSP, energy, the feature "
        "norm ‖z‖ and the method's own score (its paper's; in brackets)."
    )
    return ["", "## Main table", "", note, "", *markdown_table(header, body)]


def _claims_section(found: Sequence[Mapping[str, str]]) -> list[str]:
    return [
        "",
        "## The papers' claims, as measured here",
        "",
        'A comparison "holds" when the difference exceeds both the seeds\' combined '
        f"standard deviations and {100 * MIN_MARGIN:.0f} point; the fine-tuned runs "
        f"({', '.join(FINETUNED)}) are read on textures, the one real set that is not "
        "near-auxiliary for them.",
        "",
        *markdown_table(
            ["paper", "claim", "here", "evidence"],
            [[c["paper"], c["claim"], f"**{c['verdict']}**", c["evidence"]] for c in found],
        ),
    ]
