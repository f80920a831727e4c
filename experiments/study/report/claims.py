"""Each paper's claim beside what the study measured: holds / does not hold / not
comparable / not measured, with the numbers it was read from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments.methods import get as get_method
from experiments.study.report.runs import (
    ADVERSARIAL,
    AUTHORS_NOISE,
    OTHER_NOISE,
    REAL,
    epochs_of,
    format_cell,
    id_set,
    lr_of,
    mean_std,
    set_metric,
    summarize,
)

# A claim "holds" only if the difference is larger than the seeds' combined spread
# and than this many points (fractions): with one seed the spread is 0, and a
# 0.1-point difference must not count as "better".
MIN_MARGIN = 0.01
FINETUNE_PAPERS = (
    ("energy_ft", "Energy (Liu et al. 2020)"),
    ("oe", "Outlier exposure (Hendrycks et al. 2019)"),
)


def claims(main: Mapping[str, list[dict]], sweep: Mapping[str, dict] | None = None) -> list[dict]:
    """Each paper's claim beside what was measured: holds / does not hold / not comparable.

    ``main``: the finished main runs per method (``runs.by_method``). ``sweep``: the
    finished sweep runs by name; CEDA/ACET are compared with a CE run at their learning
    rate when one is there.
    """
    sweep = sweep or {}
    out = []
    if "ce" in main and "logitnorm" in main:
        out.append(logitnorm_claim(main["ce"], main["logitnorm"], sweep))
    if "ce" in main and "l2norm" in main:
        out.append(l2norm_claim(main["ce"], main["l2norm"]))
    for method, paper in FINETUNE_PAPERS:
        if "ce" in main and method in main:
            out.append(finetune_claim(main["ce"], main[method], method, paper))
    for method in ("ceda", "acet"):
        if "ce" in main and method in main:
            out.append(_noise_claim(main, sweep, method))
    if main:
        out += pearce_claims({get_method(m).label: es for m, es in main.items()})
    return out


def _claim(paper: str, claim: str, verdict: str, evidence: str) -> dict[str, str]:
    return {"paper": paper, "claim": claim, "verdict": verdict, "evidence": evidence}


def _diff(a: Mapping, b: Mapping) -> str:
    if not (a["n"] and b["n"]):
        return "–"
    return f"{100 * (a['mean'] - b['mean']):+.1f}"


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


def _baseline_at_lr(
    main: Mapping[str, list[dict]], sweep: Mapping[str, dict], entries: Sequence[dict]
) -> tuple[str, list[dict]]:
    """The CE runs to compare ``entries`` with: the main ones, or a sweep CE run at the
    same peak lr when the main ones used another (CEDA/ACET train at a lower lr)."""
    lr = lr_of(entries[0])
    if all(lr_of(e) == lr for e in main["ce"]):
        return "CE", main["ce"]
    same = [e for e in sweep.values() if e["run"].method == "ce" and lr_of(e) == lr]
    if same and all(
        e["results"]["config"]["train"]["epochs"]
        == entries[0]["results"]["config"]["train"]["epochs"]
        for e in same
    ):
        return f"CE at lr {lr:g} ({', '.join(e['run'].name for e in same)})", same
    return f"CE (lr {lr_of(main['ce'][0]):g}; no CE run at lr {lr:g} yet)", main["ce"]


def logitnorm_claim(
    ce_runs: Sequence[dict],
    logitnorm_runs: Sequence[dict],
    sweep: Mapping[str, dict] | None = None,
    *,
    name: str = "LogitNorm",
) -> dict:
    """LogitNorm's claim: a lower MSP FPR95 over the real sets than CE's at about CE's
    accuracy ("not comparable" when the mean accuracies differ by more than 2 points;
    then each seed's numbers). ``name``: LogitNorm's name in the claim (its temperature);
    ``sweep``: the finished sweep runs by name, each read against CE at its budget.
    No runs on one side: "not measured"."""
    ce = summarize(ce_runs, "msp")
    ln = summarize(logitnorm_runs, "msp")
    gap = abs(ce["accuracy"]["mean"] - ln["accuracy"]["mean"])
    evidence = (
        f"MSP FPR95 over the real sets: {name} {format_cell(ln['real/fpr95'])} vs CE "
        f"{format_cell(ce['real/fpr95'])} ({_diff(ln['real/fpr95'], ce['real/fpr95'])} "
        f"points); accuracy {format_cell(ln['accuracy'])} vs {format_cell(ce['accuracy'])} "
        f"(gap {format_cell(mean_std([gap]))})"
    )
    verdict = _verdict((ln["real/fpr95"], ce["real/fpr95"]))
    if gap > 0.02 and verdict != "not measured":
        verdict = "not comparable"
        evidence += "; the accuracies differ by more than 2 points (see the sweep)"
        evidence += _logitnorm_seeds(logitnorm_runs, ce)
    evidence += _logitnorm_sweep(ce_runs, sweep or {}, ce)
    return _claim(
        "LogitNorm (Wei et al. 2022)",
        f"{name} lowers MSP's FPR95 at about CE's accuracy",
        verdict,
        evidence,
    )


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


def _logitnorm_sweep(
    ce_runs: Sequence[dict], sweep: Mapping[str, dict], ce: Mapping[str, Any]
) -> str:
    """Each finished LogitNorm sweep run (longer schedule, other temperature) beside CE
    at the same epochs and peak lr: a sweep CE run where there is one, else the main CE
    runs when their budget matches. Tells whether a longer schedule or another
    temperature brings LogitNorm to CE's accuracy, and what its FPR95 is there."""
    parts = []
    for e in sweep.values():
        if e["run"].method != "logitnorm":
            continue
        budget = (epochs_of(e), lr_of(e))
        same = [
            c
            for c in sweep.values()
            if c["run"].method == "ce" and (epochs_of(c), lr_of(c)) == budget
        ]
        if same:
            base = summarize(same, "msp")
            base_name = ", ".join(c["run"].name for c in same)
        elif all((epochs_of(c), lr_of(c)) == budget for c in ce_runs):
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


def l2norm_claim(ce_runs: Sequence[dict], l2_runs: Sequence[dict], *, baseline: str = "CE") -> dict:
    """L2's claim: a higher feature-norm AUROC over the real sets than the CE runs'
    (``baseline``: their name in the claim, e.g. "same-architecture CE")."""
    ce = summarize(ce_runs, "feature_norm")
    l2 = summarize(l2_runs, "feature_norm")
    evidence = (
        f"feature-norm AUROC, real sets: L2 {format_cell(l2['real/auroc'])} vs {baseline} "
        f"{format_cell(ce['real/auroc'])}; FPR95 {format_cell(l2['real/fpr95'])} vs "
        f"{format_cell(ce['real/fpr95'])}"
    )
    return _claim(
        "L2 feature normalization (Haas et al. 2023)",
        f"the feature norm of an L2-trained model separates OOD far better than a {baseline} "
        "model's",
        _verdict((ce["real/auroc"], l2["real/auroc"])),
        evidence,
    )


def ece_claim(ce_runs: Sequence[dict], runs: Sequence[dict], *, name: str, paper: str) -> dict:
    """A lower test ECE (15 bins) than CE's: ``name`` (its runs ``runs``) is less
    overconfident than CE."""
    ce, mine = (
        {
            k: mean_std([e["results"]["classification"][k] for e in group])
            for k in ("ece", "accuracy")
        }
        for group in (ce_runs, runs)
    )
    return _claim(
        paper,
        f"{name} lowers CE's test ECE",
        _verdict((mine["ece"], ce["ece"])),
        f"test ECE: {name} {format_cell(mine['ece'])} vs CE {format_cell(ce['ece'])} "
        f"({_diff(mine['ece'], ce['ece'])} points), at accuracy "
        f"{format_cell(mine['accuracy'])} vs {format_cell(ce['accuracy'])}",
    )


def finetune_claim(
    ce_runs: Sequence[dict],
    runs: Sequence[dict],
    method: str,
    paper: str,
    *,
    baseline_score: str = "energy",
) -> dict:
    """A fine-tuned method's own score against ``baseline_score`` of the CE runs it
    starts from (the same seeds), on textures: the one real set that is not
    near-auxiliary for it."""
    seeds = [e["run"].seed for e in runs]
    ce_entries = [e for e in ce_runs if e["run"].seed in seeds]
    base = summarize(ce_entries, baseline_score)
    score = get_method(method).headline_score
    mine = summarize(runs, score)
    evidence = (
        f"{score} FPR95 on textures (not near-auxiliary): "
        f"{format_cell(mine['textures_partial/fpr95'])} vs the CE start's {baseline_score} "
        f"{format_cell(base['textures_partial/fpr95'])}; over the real sets "
        f"{format_cell(mine['real/fpr95'])} vs {format_cell(base['real/fpr95'])} (Tiny "
        "ImageNet is near-auxiliary for the fine-tuned model)"
    )
    if score != baseline_score:
        own = summarize(ce_entries, score)
        evidence += (
            f"; against the CE start's own {score} (the {paper.split(' (')[0]}"
            f" paper's baseline) on textures: {format_cell(mine['textures_partial/fpr95'])} "
            f"vs {format_cell(own['textures_partial/fpr95'])}"
        )
    return _claim(
        paper,
        f"{get_method(method).label} beats the {baseline_score} score of the CE model it "
        "starts from",
        _verdict((mine["textures_partial/fpr95"], base["textures_partial/fpr95"])),
        evidence,
    )


def _noise_claim(main: Mapping[str, list[dict]], sweep: Mapping[str, dict], method: str) -> dict:
    """CEDA/ACET's mean max confidence on their training noise (and ACET's on
    adversarial noise) against CE at the same peak lr."""
    base_name, base_entries = _baseline_at_lr(main, sweep, main[method])
    ce, mine = summarize(base_entries, "msp"), summarize(main[method], "msp")
    k = main[method][0]["results"]["diagnostics"]["weights"]["num_classes"]
    parts, pairs = [], []
    claimed = AUTHORS_NOISE + ((ADVERSARIAL,) if method == "acet" else ())
    for s in claimed + OTHER_NOISE:
        a, b = mine["mmc"].get(s, mean_std([])), ce["mmc"].get(s, mean_std([]))
        parts.append(f"{s}: {format_cell(a)} vs {format_cell(b)}")
        if s in claimed:
            pairs.append((a, b))
    target = " and adversarial noise" if method == "acet" else ""
    return _claim(
        "CEDA/ACET (Hein et al. 2019)",
        f"{get_method(method).label} lowers the mean max confidence on their noise{target} "
        f"towards 1/K = {100 / k:.0f}%",
        _verdict(*pairs),
        f"MMC (%) {get_method(method).label} vs {base_name}: "
        + "; ".join(parts)
        + f" (the verdict uses {', '.join(claimed)}; {' and '.join(OTHER_NOISE)} are "
        "noise of another kind than the training noise); "
        + f"accuracy {format_cell(mine['accuracy'])} vs {format_cell(ce['accuracy'])}; "
        + _id_confidence(mine, ce),
    )


def _id_confidence(mine: Mapping[str, Any], ce: Mapping[str, Any]) -> str:
    """MMC on the ID test images of a noise-trained method and its CE baseline, per seed:
    a model that is unsure of everything also has a low MMC on noise, so the noise
    numbers mean most where the ID MMC stays near CE's."""
    a, b = mine["mmc"]["id"], ce["mmc"]["id"]
    seeds = ", ".join(f"{100 * v:.1f}" for v in a["values"])
    return f"MMC on the ID test images {format_cell(a)} (per seed {seeds}) vs {format_cell(b)}"


def pearce_claims(groups: Mapping[str, Sequence[dict]]) -> list[dict]:
    """Pearce et al.'s two geometry claims, over the runs of every group (its name in
    the evidence -> its runs): the class weight vectors' cosines, and OOD feature norms
    below ID's; "not measured" without runs."""
    parts, near, smaller, opt = [], [], [], None
    for label, entries in groups.items():
        cos = [e["results"]["diagnostics"]["weights"]["cosine"]["mean"] for e in entries]
        opt = entries[0]["results"]["diagnostics"]["weights"]["optimal_cosine"]
        parts.append(f"{label} {np.mean(cos):+.3f}")
        near.append(abs(np.mean(cos) - opt) < 0.05)
        feats = [e["results"]["diagnostics"]["features"] for e in entries]
        for f, r in zip(feats, entries, strict=True):
            id_median = f[id_set(r["results"])]["feature_norm"]["q50"]
            smaller += [f[s]["feature_norm"]["q50"] < id_median for s in REAL if s in f]
    return [
        _claim(
            "Pearce et al. (2021)",
            "the class weight vectors' pairwise cosines approach -1/(K-1)"
            + ("" if opt is None else f" = {opt:+.3f}"),
            "not measured"
            if not near
            else ("holds" if all(near) else ("partly holds" if any(near) else "does not hold")),
            "mean pairwise cosine: " + ", ".join(parts),
        ),
        _claim(
            "Pearce et al. (2021)",
            "OOD inputs have smaller feature norms ‖z‖ than ID inputs",
            "not measured"
            if not smaller
            else ("holds" if all(smaller) else f"holds for {sum(smaller)} of {len(smaller)}"),
            f"median ‖z‖ of a real OOD set below the ID median in {sum(smaller)} of "
            f"{len(smaller)} (run, set) pairs",
        ),
    ]
