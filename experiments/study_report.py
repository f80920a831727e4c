"""The reproduction study's report, written from the runs' workdirs.

``write(root, report_dir, runs)`` reads each finished run's ``eval/results.json``,
``eval/scores.npz`` and ``metrics.jsonl`` and writes ``results.md``,
``results.json`` and ``plots/*.png`` into ``report_dir``. Only runs that finished
are reported; the report says which planned runs are missing.

Conventions: the papers' protocol (2,000 OOD examples per draw, ten draws; a set
no larger than that used whole) and the Hendrycks convention (ID positive); a
run's number for a group of sets is the mean over the sets of its per-set means,
and the table gives the mean ± standard deviation of that number over seeds.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ood_jax.evaluate import plots as P
from ood_jax.evaluate import report as R

REAL = ("tinyimagenet_crop", "tinyimagenet_resize", "textures_partial")
SYNTHETIC = ("gaussian", "uniform", "rademacher", "blobs", "lowpass_uniform", "permuted_pixels")
ADVERSARIAL = "adversarial_noise"
# The noise CEDA/ACET train on and their authors evaluate on (low-pass filtered uniform
# noise and pixel permutations), and unfiltered noise the training never shows.
AUTHORS_NOISE = ("lowpass_uniform", "permuted_pixels")
OTHER_NOISE = ("uniform", "gaussian")
# OpenOOD's split for CIFAR-10: Tiny ImageNet is near-OOD, textures and noise far-OOD.
NEAR = ("tinyimagenet_crop", "tinyimagenet_resize")
FAR = ("textures_partial", *SYNTHETIC)
# Methods trained with Tiny ImageNet outliers: the Tiny ImageNet test sets share
# their classes ("near-auxiliary").
NEAR_AUXILIARY_METHODS = ("oe", "energy_ft")
METHOD_NAMES = {
    "ce": "Cross-entropy",
    "logitnorm": "LogitNorm",
    "l2norm": "L2 feature norm",
    "oe": "Outlier exposure (FT)",
    "energy_ft": "Energy FT",
    "ceda": "CEDA",
    "acet": "ACET",
}
# Each method's own score (the one its paper reports).
HEADLINE = {
    "ce": "msp",
    "logitnorm": "msp",
    "l2norm": "feature_norm",
    "oe": "msp",
    "energy_ft": "energy",
    "ceda": "msp",
    "acet": "msp",
}
METRICS = (("fpr95", "FPR95↓"), ("auroc", "AUROC↑"), ("aupr_in", "AUPR-In↑"))
DENSITY = ("mahalanobis", "mahalanobis_l2", "gmm", "gmm_l2")
PROTOCOL = "papers"


# ----------------------------------------------------------------------------- loading


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
        records = []
        log = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(log):
            from ood_jax.train.logging import read_records

            records, _ = read_records(log)
        scores_path = os.path.join(workdir, "eval", "scores.npz")
        loaded[run.name] = {
            "run": run,
            "results": results,
            "metrics": records,
            "scores_path": scores_path if os.path.exists(scores_path) else None,
        }
    return loaded


def real_sets(available) -> list[str]:
    """The real OOD sets among ``available``; all of ``available`` when none is real (a
    trial on synthetic sets only)."""
    available = [a for a in available if a not in (ADVERSARIAL, "average")]
    return [s for s in REAL if s in available] or list(available)


def _saved_sets(saved, key: str) -> list[str]:
    """OOD set names with ``ood/<set>/<key>`` (or ``geometry/<set>/<key>``) in ``saved``."""
    names = []
    for k in saved.files:
        parts = k.split("/")
        if len(parts) == 3 and parts[0] in ("ood", "geometry") and parts[2] == key:
            if parts[1] != "id":
                names.append(parts[1])
    return list(dict.fromkeys(names))


def _id(results: Mapping) -> str:
    """The in-distribution test set's name in a run's results."""
    return results["data"]["id"]["name"]


def set_metric(results: Mapping, score: str, sets: Sequence[str], metric: str) -> float:
    """Mean over those of ``sets`` that were evaluated of the per-set mean of ``metric``
    (papers' protocol); NaN if none was."""
    table = results["ood"][PROTOCOL]["metrics"][score]
    values = [table[s][metric]["mean"] for s in sets if s in table]
    return float(np.mean(values)) if values else float("nan")


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values if np.isfinite(v)]
    return {
        "mean": float(np.mean(values)) if values else float("nan"),
        "std": float(np.std(values)) if values else float("nan"),
        "n": len(values),
        "values": values,
    }


def _fmt(cell: Mapping[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    if not cell["n"]:
        return "–"
    text = f"{scale * cell['mean']:.{digits}f}"
    return f"{text} ± {scale * cell['std']:.{digits}f}" if cell["n"] > 1 else text


# ----------------------------------------------------------------------------- aggregation


def by_method(loaded: Mapping[str, dict], group: str = "main") -> dict[str, list[dict]]:
    """Finished runs of ``group`` per method, in seed order."""
    out: dict[str, list[dict]] = {}
    for entry in loaded.values():
        run = entry["run"]
        if run.group == group:
            out.setdefault(run.method, []).append(entry)
    for entries in out.values():
        entries.sort(key=lambda e: e["run"].seed)
    return {m: out[m] for m in METHOD_NAMES if m in out}


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
    mmc = [{("id" if k == _id(r) else k): v for k, v in r["mmc"].items()} for r in res]
    mmc_sets = ("id", *AUTHORS_NOISE, *OTHER_NOISE, ADVERSARIAL, *REAL)
    row["mmc"] = {s: mean_std([m[s] for m in mmc]) for s in mmc_sets if all(s in m for m in mmc)}
    return row


# ----------------------------------------------------------------------------- claims


def _diff(a: Mapping, b: Mapping) -> str:
    return f"{100 * (a['mean'] - b['mean']):+.1f}"


# A claim "holds" only if the difference is larger than the seeds' combined spread
# and than this many points (fractions): with one seed the spread is 0, and a
# 0.1-point difference must not count as "better".
MIN_MARGIN = 0.01


def _separated(a: Mapping, b: Mapping) -> bool:
    """``a`` below ``b`` by more than the seeds' combined spread and ``MIN_MARGIN``."""
    margin = max(a["std"] + b["std"], MIN_MARGIN)
    return a["n"] > 0 and b["n"] > 0 and b["mean"] - a["mean"] > margin


def _verdict(*pairs: tuple[Mapping, Mapping]) -> str:
    """ "holds" if every ``(a, b)`` has ``a`` clearly below ``b``; "not measured" if a
    number is missing (a set or run not evaluated)."""
    if any(a["n"] == 0 or b["n"] == 0 for a, b in pairs):
        return "not measured"
    return "holds" if all(_separated(a, b) for a, b in pairs) else "does not hold"


def _lr(entry: Mapping) -> float:
    return float(entry["results"]["config"]["optim"]["lr"])


def _baseline_at_lr(
    main: Mapping[str, list[dict]], sweep: Mapping[str, dict], entries: Sequence[dict]
) -> tuple[str, list[dict]]:
    """The CE runs to compare ``entries`` with: the main ones, or a sweep CE run at the
    same peak lr when the main ones used another (CEDA/ACET train at a lower lr)."""
    lr = _lr(entries[0])
    if all(_lr(e) == lr for e in main["ce"]):
        return "CE", main["ce"]
    same = [e for e in sweep.values() if e["run"].method == "ce" and _lr(e) == lr]
    if same and all(
        e["results"]["config"]["train"]["epochs"]
        == entries[0]["results"]["config"]["train"]["epochs"]
        for e in same
    ):
        return f"CE at lr {lr:g} ({', '.join(e['run'].name for e in same)})", same
    return f"CE (lr {_lr(main['ce'][0]):g}; no CE run at lr {lr:g} yet)", main["ce"]


def _logitnorm_seeds(entries: Sequence[dict], ce: Mapping[str, Any]) -> str:
    """Each LogitNorm seed's accuracy and real-set MSP FPR95, and which ones reach CE's
    mean accuracy (within 2 points): the seeds the claim can be read on when the means
    of the accuracies differ (LogitNorm's accuracy varies much from seed to seed here)."""
    ce_acc, ce_fpr = ce["accuracy"]["mean"], ce["real/fpr95"]["mean"]
    parts, close = [], []
    for e in entries:
        acc = e["results"]["classification"]["accuracy"]
        fpr = set_metric(e["results"], "msp", REAL, "fpr95")
        parts.append(f"seed {e['run'].seed} {100 * acc:.1f}% / {100 * fpr:.1f}")
        if abs(acc - ce_acc) <= 0.02:
            close.append(f"seed {e['run'].seed} {100 * (fpr - ce_fpr):+.1f}")
    text = "; per seed, accuracy / MSP FPR95 over the real sets: " + ", ".join(parts)
    if close:
        text += (
            f". At CE's accuracy (within 2 points) the FPR95 differs from CE's mean by "
            f"{', '.join(close)} points"
        )
    return text


def _epochs(entry: Mapping) -> int:
    return int(entry["results"]["config"]["train"]["epochs"])


def _logitnorm_sweep(
    main: Mapping[str, list[dict]], sweep: Mapping[str, dict], ce: Mapping[str, Any]
) -> str:
    """Each finished LogitNorm sweep run (longer schedule, other temperature) beside CE
    at the same epochs and peak lr: a sweep CE run where there is one, else the main CE
    runs when their budget matches. Tells whether a longer schedule or another
    temperature brings LogitNorm to CE's accuracy, and what its FPR95 is there."""
    parts = []
    for e in sweep.values():
        if e["run"].method != "logitnorm":
            continue
        budget = (_epochs(e), _lr(e))
        same = [
            c for c in sweep.values() if c["run"].method == "ce" and (_epochs(c), _lr(c)) == budget
        ]
        if same:
            base = summarize(same, "msp")
            base_name = ", ".join(c["run"].name for c in same)
        elif all((_epochs(c), _lr(c)) == budget for c in main["ce"]):
            base, base_name = ce, "the main CE runs"
        else:
            parts.append(f"{e['run'].name}: no CE run at {budget[0]} epochs, lr {budget[1]:g}")
            continue
        acc = e["results"]["classification"]["accuracy"]
        fpr = set_metric(e["results"], "msp", REAL, "fpr95")
        b_acc, b_fpr = base["accuracy"]["mean"], base["real/fpr95"]["mean"]
        tau = e["results"]["config"].get("objective", {}).get("hparams", {}).get("temperature")
        parts.append(
            f"{e['run'].name} ({budget[0]} epochs, tau {tau}): {100 * acc:.1f}% / "
            f"{100 * fpr:.1f} vs {base_name} {100 * b_acc:.1f}% / {100 * b_fpr:.1f} "
            f"(FPR95 {100 * (fpr - b_fpr):+.1f} points"
            + (
                ", accuracy within 2 points)"
                if abs(acc - b_acc) <= 0.02
                else ", accuracy differs by more than 2 points)"
            )
        )
    if not parts:
        return ""
    return "; sweep, accuracy / MSP FPR95 over the real sets: " + "; ".join(parts)


def _id_confidence(mine: Mapping[str, Any], ce: Mapping[str, Any]) -> str:
    """MMC on the ID test images of a noise-trained method and its CE baseline, per seed:
    a model that is unsure of everything also has a low MMC on noise, so the noise
    numbers mean most where the ID MMC stays near CE's."""
    a, b = mine["mmc"]["id"], ce["mmc"]["id"]
    seeds = ", ".join(f"{100 * v:.1f}" for v in a["values"])
    return f"MMC on the ID test images {_fmt(a)} (per seed {seeds}) vs {_fmt(b)}"


def claims(
    main: Mapping[str, list[dict]],
    rows: Mapping[str, dict],
    sweep: Mapping[str, dict] | None = None,
) -> list[dict]:
    """Each paper's claim beside what was measured: holds / does not hold / not comparable.

    ``sweep``: the finished sweep runs by name; CEDA/ACET are compared with a CE run at
    their learning rate when one is there.
    """
    out = []

    def add(paper, claim, verdict, evidence):
        out.append({"paper": paper, "claim": claim, "verdict": verdict, "evidence": evidence})

    if "ce" in main and "logitnorm" in main:
        ce = summarize(main["ce"], "msp")
        ln = summarize(main["logitnorm"], "msp")
        gap = abs(ce["accuracy"]["mean"] - ln["accuracy"]["mean"])
        evidence = (
            f"MSP FPR95 over the real sets: LogitNorm {_fmt(ln['real/fpr95'])} vs CE "
            f"{_fmt(ce['real/fpr95'])} ({_diff(ln['real/fpr95'], ce['real/fpr95'])} points); "
            f"accuracy {_fmt(ln['accuracy'])} vs {_fmt(ce['accuracy'])} (gap {100 * gap:.1f})"
        )
        verdict = _verdict((ln["real/fpr95"], ce["real/fpr95"]))
        if gap > 0.02 and verdict != "not measured":
            verdict = "not comparable"
            evidence += "; the accuracies differ by more than 2 points (see the sweep)"
            evidence += _logitnorm_seeds(main["logitnorm"], ce)
        evidence += _logitnorm_sweep(main, sweep or {}, ce)
        add(
            "LogitNorm (Wei et al. 2022)",
            "LogitNorm lowers MSP's FPR95 at about CE's accuracy",
            verdict,
            evidence,
        )
    if "ce" in main and "l2norm" in main:
        ce = summarize(main["ce"], "feature_norm")
        l2 = summarize(main["l2norm"], "feature_norm")
        evidence = (
            f"feature-norm AUROC, real sets: L2 {_fmt(l2['real/auroc'])} vs CE "
            f"{_fmt(ce['real/auroc'])}; FPR95 {_fmt(l2['real/fpr95'])} vs {_fmt(ce['real/fpr95'])}"
        )
        verdict = _verdict((ce["real/auroc"], l2["real/auroc"]))
        add(
            "L2 feature normalization (Haas et al. 2023)",
            "the feature norm of an L2-trained model separates OOD far better than a CE model's",
            verdict,
            evidence,
        )
    for method, paper in (
        ("energy_ft", "Energy (Liu et al. 2020)"),
        ("oe", "Outlier exposure (Hendrycks et al. 2019)"),
    ):
        if "ce" in main and method in main:
            seeds = [e["run"].seed for e in main[method]]
            ce_entries = [e for e in main["ce"] if e["run"].seed in seeds]
            base = summarize(ce_entries, "energy")
            mine = summarize(main[method], HEADLINE[method])
            evidence = (
                f"{HEADLINE[method]} FPR95 on textures (not near-auxiliary): "
                f"{_fmt(mine['textures_partial/fpr95'])} vs the CE start's energy "
                f"{_fmt(base['textures_partial/fpr95'])}; over the real sets "
                f"{_fmt(mine['real/fpr95'])} vs {_fmt(base['real/fpr95'])} (Tiny ImageNet is "
                "near-auxiliary for the fine-tuned model)"
            )
            if HEADLINE[method] != "energy":
                own = summarize(ce_entries, HEADLINE[method])
                evidence += (
                    f"; against the CE start's own {HEADLINE[method]} (the {paper.split(' (')[0]}"
                    f" paper's baseline) on textures: {_fmt(mine['textures_partial/fpr95'])} vs "
                    f"{_fmt(own['textures_partial/fpr95'])}"
                )
            add(
                paper,
                f"{METHOD_NAMES[method]} beats the energy score of the CE model it starts from",
                _verdict((mine["textures_partial/fpr95"], base["textures_partial/fpr95"])),
                evidence,
            )
    for method in ("ceda", "acet"):
        if "ce" in main and method in main:
            base_name, base_entries = _baseline_at_lr(main, sweep or {}, main[method])
            ce, mine = summarize(base_entries, "msp"), summarize(main[method], "msp")
            k = main[method][0]["results"]["diagnostics"]["weights"]["num_classes"]
            parts, pairs = [], []
            claimed = AUTHORS_NOISE + ((ADVERSARIAL,) if method == "acet" else ())
            for s in claimed + OTHER_NOISE:
                a, b = mine["mmc"].get(s, mean_std([])), ce["mmc"].get(s, mean_std([]))
                parts.append(f"{s}: {_fmt(a)} vs {_fmt(b)}")
                if s in claimed:
                    pairs.append((a, b))
            target = " and adversarial noise" if method == "acet" else ""
            add(
                "CEDA/ACET (Hein et al. 2019)",
                f"{METHOD_NAMES[method]} lowers the mean max confidence on their noise{target} "
                f"towards 1/K = {100 / k:.0f}%",
                _verdict(*pairs),
                f"MMC (%) {METHOD_NAMES[method]} vs {base_name}: "
                + "; ".join(parts)
                + f" (the verdict uses {', '.join(claimed)}; {' and '.join(OTHER_NOISE)} are "
                "noise of another kind than the training noise); "
                + f"accuracy {_fmt(mine['accuracy'])} vs {_fmt(ce['accuracy'])}; "
                + _id_confidence(mine, ce),
            )
    if main:
        parts, near = [], []
        smaller = []
        for method, entries in main.items():
            cos = [e["results"]["diagnostics"]["weights"]["cosine"]["mean"] for e in entries]
            opt = entries[0]["results"]["diagnostics"]["weights"]["optimal_cosine"]
            parts.append(f"{METHOD_NAMES[method]} {np.mean(cos):+.3f}")
            near.append(abs(np.mean(cos) - opt) < 0.05)
            feats = [e["results"]["diagnostics"]["features"] for e in entries]
            for f, r in zip(feats, entries, strict=True):
                id_median = f[_id(r["results"])]["feature_norm"]["q50"]
                smaller += [f[s]["feature_norm"]["q50"] < id_median for s in REAL if s in f]
        add(
            "Pearce et al. (2021)",
            f"the class weight vectors' pairwise cosines approach -1/(K-1) = {opt:+.3f}",
            "holds" if all(near) else ("partly holds" if any(near) else "does not hold"),
            "mean pairwise cosine: " + ", ".join(parts),
        )
        add(
            "Pearce et al. (2021)",
            "OOD inputs have smaller feature norms ‖z‖ than ID inputs",
            "not measured"
            if not smaller
            else ("holds" if all(smaller) else f"holds for {sum(smaller)} of {len(smaller)}"),
            f"median ‖z‖ of a real OOD set below the ID median in {sum(smaller)} of "
            f"{len(smaller)} (run, set) pairs",
        )
    return out


# ----------------------------------------------------------------------------- plots


def _load_scores(entry: Mapping) -> Mapping[str, np.ndarray] | None:
    return np.load(entry["scores_path"]) if entry["scores_path"] else None


def plot_logit_norm(main: Mapping[str, list[dict]], path: str) -> bool:
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
                    label=METHOD_NAMES[method] if i == 0 else None,
                    marker="o",
                )
                drawn = True
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean logit norm ||f(x)|| (training batches)")
    ax.set_yscale("log")
    ax.set_title("Logit norm during training (one line per seed)")
    ax.legend(loc="upper right", framealpha=0.7)
    if drawn:
        P._save(fig, path)
    return drawn


def plot_feature_norms(main: Mapping[str, list[dict]], path: str) -> bool:
    methods = [m for m in ("ce", "l2norm") if m in main and main[m][0]["scores_path"]]
    if not methods:
        return False
    fig = Figure(figsize=(5 * len(methods), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(methods)))
    for ax, method in zip(axes, methods, strict=True):
        saved = _load_scores(main[method][0])
        groups = {"ID test": saved["geometry/id/feature_norm"]}
        sets = real_sets(_saved_sets(saved, "feature_norm"))
        groups.update({s: saved[f"geometry/{s}/feature_norm"] for s in sets})
        edges = P.robust_edges(*groups.values())
        for name, values in groups.items():
            shown, _ = P.clipped(values, edges)
            ax.hist(shown, bins=edges, density=True, histtype="step", linewidth=1.5, label=name)
        ax.set_xlabel("feature norm ||z||")
        ax.set_ylabel("density")
        ax.set_title(f"{METHOD_NAMES[method]} (seed {main[method][0]['run'].seed})", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    P._save(fig, path)
    return True


def plot_score_histograms(main: Mapping[str, list[dict]], path: str) -> bool:
    methods = [m for m in main if main[m][0]["scores_path"]]
    if not methods:
        return False
    fig, axes = P._grid(len(methods))
    for ax, method in zip(axes, methods, strict=False):
        score = HEADLINE[method]
        saved = _load_scores(main[method][0])
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
        ax.set_title(f"{METHOD_NAMES[method]}", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.suptitle("Each method's own score: ID vs the real OOD sets (seed 0)", fontsize=10)
    P._save(fig, path)
    return True


def plot_mmc(rows: Mapping[str, dict], path: str, num_classes: int) -> bool:
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
        ax.bar(x, means, width, yerr=stds, label=METHOD_NAMES[method], capsize=2)
    ax.axhline(100 / num_classes, color="black", linestyle="--", linewidth=1, label="1/K")
    ax.set_xticks(np.arange(len(sets)) + 0.4 - width / 2)
    ax.set_xticklabels(["ID test" if s == "id" else s for s in sets], fontsize=8)
    ax.set_ylabel("mean max softmax confidence (%)")
    ax.set_ylim(0, 105)
    ax.set_title("MMC per method (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    P._save(fig, path)
    return True


# ----------------------------------------------------------------------------- density scores


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
                cells.append(_fmt(mean_std([set_metric(r, score, sets, "auroc") for r in res])))
            else:
                cells.append("–")
        id_norm = mean_std(
            [r["diagnostics"]["features"][_id(r)]["feature_norm"]["q50"] for r in res]
        )
        ood_norm = mean_std(
            [
                np.mean([r["diagnostics"]["features"][s]["feature_norm"]["q50"] for s in sets])
                for r in res
            ]
        )
        rows.append([METHOD_NAMES[method], *cells, _fmt(id_norm, 1, 2), _fmt(ood_norm, 1, 2)])
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
            f[s]["feature_norm"]["q50"] < f[_id(r)]["feature_norm"]["q50"]
            for f, r in zip(feats, res, strict=True)
            for s in sets
            if s in f
        )
        total = sum(s in f for f in feats for s in sets)
        lines.append(
            f"- {METHOD_NAMES[method]}: Mahalanobis AUROC {_fmt(plain)} on the raw features, "
            f"{_fmt(unit)} on L2-normalized ones; the median ‖z‖ of a real OOD set is below "
            f"the ID median in {smaller} of {total} (run, set) pairs."
        )
    return lines


def _split_medians(results: Mapping, variant: str, part: str, sets: Sequence[str]):
    """(ID test median, mean over ``sets`` of the OOD medians) of a distance part, or None."""
    split = results["diagnostics"].get("mahalanobis_split", {}).get(variant)
    if not split or any(s not in split for s in sets):
        return None
    return (
        split[_id(results)][part]["q50"],
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
            mean_std([f[_id(r)]["feature_norm"]["q50"] for f, r in zip(feats, res, strict=True)]),
            mean_std([np.mean([f[s]["feature_norm"]["q50"] for s in sets]) for f in feats]),
        )
        if row["raw/total"][0]["n"]:
            out[method] = row
    return out


def density_split_rows(split: Mapping[str, dict]) -> list[list[str]]:
    def pair(cell):
        return f"{_fmt(cell[0], 1, 0)} vs {_fmt(cell[1], 1, 0)}"

    return [
        [METHOD_NAMES[m]]
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
            f"- {METHOD_NAMES[method]}: on the raw features the low-variance directions "
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
        names = ", ".join(METHOD_NAMES[m] for m in pattern)
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


def openood_rows(main: Mapping[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Each method's headline score in the OpenOOD convention (OOD positive, FPR at the
    first threshold reaching 95% OOD recall, trapezoid AUPR), recomputed from the saved
    per-example scores with the run's own draws (same seed, same examples)."""
    from ood_jax.evaluate.protocol import evaluate_ood

    out = {}
    for method, entries in main.items():
        score, per_seed = HEADLINE[method], []
        for e in entries:
            saved = _load_scores(e)
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
    metrics = (("fpr95", "FPR95↓"), ("auroc", "AUROC↑"), ("aupr_out", "AUPR-Out↑"))
    header = ["method (score)"] + [f"{g} {h}" for g in ("real", "synthetic") for _, h in metrics]
    body = [
        [f"{METHOD_NAMES[m]} ({r['score']})"]
        + [_fmt(r[f"{g}/{k}"]) for g in ("real", "synthetic") for k, _ in metrics]
        for m, r in rows.items()
    ]
    return R._table(header, body)


def logit_shift_rows(main: Mapping[str, list[dict]]) -> list[list[str]]:
    """Per method: the median mean logit (the shift every class shares) of ID and real
    OOD inputs, and how energy and max-logit fare against MSP (AUROC, real sets)."""
    rows = []
    for method, entries in main.items():
        res = [e["results"] for e in entries]
        feats = [r["diagnostics"]["features"] for r in res]
        if not all("mean_logit" in f[_id(r)] for f, r in zip(feats, res, strict=True)):
            continue
        sets = real_sets(res[0]["ood"][PROTOCOL]["metrics"]["msp"])
        id_shift = mean_std(
            [f[_id(r)]["mean_logit"]["q50"] for f, r in zip(feats, res, strict=True)]
        )
        ood_shift = mean_std([np.mean([f[s]["mean_logit"]["q50"] for s in sets]) for f in feats])
        auroc = {
            k: mean_std([set_metric(r, k, sets, "auroc") for r in res])
            for k in ("msp", "energy", "max_logit")
        }
        rows.append(
            [METHOD_NAMES[method], _fmt(id_shift, 1, 2), _fmt(ood_shift, 1, 2)]
            + [_fmt(auroc[k]) for k in ("msp", "energy", "max_logit")]
        )
    return rows


# ----------------------------------------------------------------------------- the report


def main_table(rows: Mapping[str, dict]) -> list[str]:
    header = ["method (score)", "seeds", "accuracy", "ECE"]
    header += [f"real {h}" for _, h in METRICS] + [f"synthetic {h}" for _, h in METRICS]
    body = []
    for method, row in rows.items():
        mark = " †" if method in NEAR_AUXILIARY_METHODS else ""
        body.append(
            [
                f"{METHOD_NAMES[method]} ({row['score']}){mark}",
                str(len(row["seeds"])),
                _fmt(row["accuracy"]),
                _fmt(row["ece"]),
            ]
            + [_fmt(row[f"real/{m}"]) for m, _ in METRICS]
            + [_fmt(row[f"synthetic/{m}"]) for m, _ in METRICS]
        )
    return R._table(header, body)


def per_set_tables(rows: Mapping[str, dict]) -> list[str]:
    lines = []
    for metric, title in (("fpr95", "FPR95↓"), ("auroc", "AUROC↑")):
        sets = [
            s
            for s in (*REAL, *SYNTHETIC, ADVERSARIAL)
            if any(r[f"{s}/{metric}"]["n"] for r in rows.values())
        ]
        body = [
            [f"{METHOD_NAMES[m]} ({r['score']})"] + [_fmt(r[f"{s}/{metric}"]) for s in sets]
            for m, r in rows.items()
        ]
        lines += ["", f"{title} per set:", ""] + R._table(["method (score)", *sets], body)
    return lines


def near_far_table(rows: Mapping[str, dict]) -> list[str]:
    header = ["method (score)"] + [f"near {h}" for _, h in METRICS[:2]]
    header += [f"far {h}" for _, h in METRICS[:2]]
    body = [
        [f"{METHOD_NAMES[m]} ({r['score']})"]
        + [_fmt(r[f"near/{x}"]) for x, _ in METRICS[:2]]
        + [_fmt(r[f"far/{x}"]) for x, _ in METRICS[:2]]
        for m, r in rows.items()
    ]
    return R._table(header, body)


def sweep_table(loaded: Mapping[str, dict], main: Mapping[str, list[dict]]) -> list[str]:
    entries = [
        (f"{m} (main, {len(main[m])} seed{'s' if len(main[m]) > 1 else ''})", main[m])
        for m in ("ce", "logitnorm", "ceda")
        if m in main
    ]
    entries += [(e["run"].name.split("/")[1], [e]) for e in _sweep(loaded).values()]
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
                _fmt(row["accuracy"]),
                _fmt(row["real/fpr95"]),
                _fmt(row["real/auroc"]),
                _fmt(row["mmc"].get("lowpass_uniform", mean_std([]))),
            ]
        )
    return R._table(
        [
            "run",
            "epochs",
            "peak lr",
            "tau",
            "accuracy",
            "MSP real FPR95↓",
            "MSP real AUROC↑",
            "MMC low-pass noise",
        ],
        body,
    )


def _lr_notes(main: Mapping[str, list[dict]]) -> str:
    """A sentence naming the from-scratch methods trained at another peak lr than CE."""
    if "ce" not in main:
        return ""
    ce_lr = _lr(main["ce"][0])
    other = {
        m: _lr(es[0])
        for m, es in main.items()
        if m not in NEAR_AUXILIARY_METHODS and m != "ce" and _lr(es[0]) != ce_lr
    }
    if not other:
        return ""
    names = ", ".join(f"{METHOD_NAMES[m]} at {lr:g}" for m, lr in other.items())
    return (
        f"Peak learning rate {ce_lr:g} for the from-scratch methods except {names} "
        "(see the sweeps)."
    )


def _sweep(loaded: Mapping[str, dict]) -> dict[str, dict]:
    return {k: e for k, e in loaded.items() if e["run"].group == "sweep"}


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
    rows = {m: summarize(es, HEADLINE[m]) for m, es in main.items()}
    ce_rows = {f"{m}:energy": summarize(es, "energy") for m, es in main.items() if m == "ce"}
    found = claims(main, rows, _sweep(loaded))
    os.makedirs(os.path.join(report_dir, "plots"), exist_ok=True)
    num_classes = (
        next(iter(loaded.values()))["results"]["diagnostics"]["weights"]["num_classes"]
        if loaded
        else 10
    )
    written = []
    for name, fn in (
        ("logit_norm_ce_vs_logitnorm.png", lambda p: plot_logit_norm(main, p)),
        ("feature_norm_ce_vs_l2.png", lambda p: plot_feature_norms(main, p)),
        ("scores_per_method.png", lambda p: plot_score_histograms(main, p)),
        ("mmc_per_method.png", lambda p: plot_mmc(rows, p, num_classes)),
    ):
        if fn(os.path.join(report_dir, "plots", name)):
            written.append(f"plots/{name}")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Reproduction study at CPU scale: CIFAR-10 (JPEG), ResNet-9 (width 16)",
        "",
        f"- command: `{command}`; written {now} on {platform.machine()} "
        f"({os.cpu_count()} cores), Python {platform.python_version()}",
        f"- runs reported: {len(loaded)} of {len(runs)}"
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
        "",
        "## Main table",
        "",
        *main_table(rows),
    ]
    other_lr = _lr_notes(main)
    if other_lr:
        lines += ["", other_lr]
    if ce_rows:
        ce_energy = ce_rows["ce:energy"]
        lines += [
            "",
            f"Cross-entropy with the energy score: real FPR95 "
            f"{_fmt(ce_energy['real/fpr95'])}, AUROC {_fmt(ce_energy['real/auroc'])}.",
        ]
    openood = openood_rows(main)
    if openood:
        lines += [
            "",
            "The same runs in the OpenOOD convention (OOD is the positive class: FPR95 is "
            "the share of ID test images flagged once 95% of the OOD images are, AUPR "
            "the trapezoid area), recomputed from the saved scores on the same draws:",
            "",
            *openood_table(openood),
        ]
    lines += [
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
    lines += ["", "## The papers' claims, as measured here", ""]
    lines += [
        f'A comparison "holds" when the difference exceeds both the seeds\' combined '
        f"standard deviations and {100 * MIN_MARGIN:.0f} point.",
        "",
    ]
    lines += R._table(
        ["paper", "claim", "here", "evidence"],
        [[c["paper"], c["claim"], f"**{c['verdict']}**", c["evidence"]] for c in found],
    )
    lines += [
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
    lines += [
        "",
        "## Density scores (Mahalanobis, GMM) on these models",
        "",
        "AUROC (%) over the real sets of the class-conditional density scores on the raw "
        "features and on L2-normalized features, and the median feature norm of ID test "
        "and real OOD images (mean over the sets):",
        "",
        *R._table(
            [
                "method",
                "Mahalanobis",
                "Mahalanobis (L2)",
                "GMM",
                "GMM (L2)",
                "ID ‖z‖",
                "OOD ‖z‖",
            ],
            density_evidence(main),
        ),
    ]
    lines += ["", *density_summary(main)]
    split = density_split(main)
    if split:
        lines += [
            "",
            "Where the distance comes from. Whitening by the tied covariance divides each "
            "direction's squared offset from the nearest class mean by that direction's "
            "variance, so the directions of least variance weigh most. Median squared "
            "distance of ID test vs real OOD images (mean over the sets), in total, along "
            "the K - 1 directions of largest variance (top) and along the others (rest), "
            "on raw and on L2-normalized features:",
            "",
            *R._table(
                ["method"] + [f"{v} {p}" for v in ("raw", "L2") for p in ("total", "top", "rest")],
                density_split_rows(split),
            ),
            "",
            *density_split_summary(split),
        ]
    lines += [
        "",
        "## The logit shift every class shares",
        "",
        "The mean of a model's logits over the classes shifts every logit alike: softmax "
        "(MSP) ignores it, energy and max-logit do not. Median mean logit of ID test and "
        "real OOD inputs, and the AUROC (%) over the real sets of MSP, energy and max-logit:",
        "",
        *R._table(
            ["method", "ID mean logit", "OOD mean logit", "MSP", "energy", "max-logit"],
            logit_shift_rows(main),
        ),
    ]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in written]
    summary = {
        "command": command,
        "written": now,
        "runs": sorted(loaded),
        "missing": missing,
        "complete": complete and not missing,
        "rows": rows,
        "claims": found,
        "density_split": density_split(main),
        "openood_convention": openood,
        "plots": written,
    }
    R.write_json(summary, os.path.join(report_dir, "results.json"))
    with open(os.path.join(report_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary
