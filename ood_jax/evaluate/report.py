"""Reports: ``results.json`` (every number) and ``results.md`` (the papers' tables).

The Markdown table is laid out like the LogitNorm / energy papers' tables:
rows are the OOD sets and their average, columns FPR95 / AUROC / AUPR (AUPR-In)
per score, as percentages with two decimals.

A report directory is written atomically (:func:`atomic_directory`): files go
to a temporary sibling directory that is renamed into place only after every
step succeeded, so a failed evaluation never leaves a partial report that looks
complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np

#: (metric key, column header) of the main table, as the papers print it.
MAIN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("fpr95", "FPR95↓"),
    ("auroc", "AUROC↑"),
    ("aupr_in", "AUPR↑"),
)
DETAIL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("fpr95", "FPR95↓"),
    ("auroc", "AUROC↑"),
    ("aupr_in", "AUPR-In↑"),
    ("aupr_out", "AUPR-Out↑"),
)


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yields a temporary directory that replaces ``path`` only on success.

    On an exception the temporary directory is deleted, ``path`` is left as it
    was, and the exception propagates.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"the report folder {path!r} is a file; choose another --out_dir.")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(parent, os.path.basename(path))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale(parent: str, name: str) -> None:
    """Deletes temporary report folders left by killed evaluations of ``name``.

    Each holds its writer's process id (``.<name>.tmp-<pid>-*``); a folder whose
    process no longer exists is stale.
    """
    prefix = f".{name}.tmp-"
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # JSON has no inf/nan; keep them readable rather than invalid.
    return x


def write_json(results: Mapping, path: str) -> None:
    """Writes ``results`` as indented JSON (NumPy values converted)."""
    with open(path, "w") as f:
        json.dump(_jsonable(results), f, indent=1, sort_keys=False)
        f.write("\n")


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _pct_std(cell: Mapping[str, float], with_std: bool) -> str:
    text = _pct(cell["mean"])
    return f"{text} ± {_pct(cell['std'])}" if with_std else text


def report_scalars(results: Mapping) -> dict[str, float]:
    """``{tag: value}`` of a report's headline numbers, for TensorBoard: per protocol,
    score and OOD set the mean AUROC and FPR95 over draws
    (``ood_<protocol>/<score>/<set>/auroc``), and the test accuracy and ECE
    (``classification/accuracy``, ``classification/ece``)."""
    out = {}
    for protocol, result in results.get("ood", {}).items():
        for score, per_set in result["metrics"].items():
            for name, cell in per_set.items():
                for metric in ("auroc", "fpr95"):
                    if metric in cell:
                        out[f"ood_{protocol}/{score}/{name}/{metric}"] = float(cell[metric]["mean"])
    for key in ("accuracy", "ece"):
        value = results.get("classification", {}).get(key)
        if isinstance(value, int | float):
            out[f"classification/{key}"] = float(value)
    return out


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def ood_tables(
    protocol_result: Mapping,
    *,
    display: Mapping[str, str] | None = None,
    set_notes: Mapping[str, str] | None = None,
    scores_per_table: int = 4,
) -> list[str]:
    """Markdown lines for one protocol's results.

    1. A summary: rows = scores, columns = the metrics averaged over OOD sets.
    2. The papers' layout: rows = OOD sets + average, columns = FPR95 / AUROC /
       AUPR per score, split into tables of ``scores_per_table`` scores so
       that they stay readable.
    3. One detail table per score with all four metrics (mean ± std for the
       papers' protocol).
    """
    metrics = protocol_result["metrics"]
    scores = list(metrics)
    display = dict(display or {})
    notes = dict(set_notes or {})

    with_std = protocol_result["protocol"] == "papers"
    draws = protocol_result.get("draws", {})
    whole = {s for s, d in draws.items() if with_std and d.get("num_draws") == 1}

    def row_name(s: str) -> str:
        if s == "average":
            return "**Average**"
        extra = [notes[s]] if s in notes else []
        if s in whole:
            extra.append(f"all {draws[s]['population']}, one draw")
        return f"{s} ({'; '.join(extra)})" if extra else s

    def display_name(key: str) -> str:
        return display.get(key, key)

    sets = [s for s in next(iter(metrics.values())) if s != "average"] + ["average"]
    summary = [
        [display_name(k)] + [_pct(metrics[k]["average"][m]["mean"]) for m, _ in DETAIL_COLUMNS]
        for k in scores
    ]
    lines = ["Average over OOD sets:", ""]
    lines += markdown_table(["score"] + [h for _, h in DETAIL_COLUMNS], summary)
    for start in range(0, len(scores), scores_per_table):
        group = scores[start : start + scores_per_table]
        header = ["OOD set"] + [f"{display_name(k)} {h}" for k in group for _, h in MAIN_COLUMNS]
        rows = [
            [row_name(s)] + [_pct(metrics[k][s][m]["mean"]) for k in group for m, _ in MAIN_COLUMNS]
            for s in sets
        ]
        lines += [""] + markdown_table(header, rows)
    for k in scores:
        lines += ["", f"#### {display_name(k)}", ""]
        detail = [
            [row_name(s)]
            + [_pct_std(metrics[k][s][m], with_std and s not in whole) for m, _ in DETAIL_COLUMNS]
            for s in sets
        ]
        lines += markdown_table(["OOD set"] + [h for _, h in DETAIL_COLUMNS], detail)
    return lines


def _protocol_heading(result: Mapping) -> str:
    if result["protocol"] == "papers":
        return (
            f"Papers' protocol: {result['num_ood']} OOD examples per set, "
            f"{result['num_draws']} draws (mean ± std; seeds in results.json), "
            f"{result['convention']} convention"
        )
    return f"Full OOD sets, {result['convention']} convention"


def _checkpoint_origin(ckpt: Mapping) -> str:
    """Where the model came from: a workdir, a published checkpoint, or another record."""
    if ckpt.get("workdir"):
        return f"`{ckpt['workdir']}`"
    if ckpt.get("published"):
        return f"published `{ckpt['published']}` (sha256 {str(ckpt.get('sha256'))[:12]}...)"
    other = {k: v for k, v in ckpt.items() if k != "step"}
    return ", ".join(f"{k} `{v}`" for k, v in other.items()) or "unrecorded"


def markdown_report(results: Mapping) -> str:
    """The text of ``results.md`` from the ``results.json`` dict."""
    cls = results["classification"]
    lines = _header_lines(results)
    lines += [
        "",
        "## Test accuracy and calibration",
        "",
        f"Accuracy {_pct(cls['accuracy'])}%, ECE ({cls['num_bins']} bins) {_pct(cls['ece'])}%.",
    ]
    if results.get("mmc"):
        lines += ["", "Mean maximum softmax confidence (MMC) per set:", ""]
        lines += markdown_table(
            ["dataset", "MMC"], [[name, f"{value:.4f}"] for name, value in results["mmc"].items()]
        )
    lines += _tuning_lines(results)
    for result in results["ood"].values():
        lines += ["", f"## {_protocol_heading(result)}", ""] + ood_tables(
            result, display=results.get("score_display"), set_notes=results.get("set_notes")
        )
    lines += _diagnostics_lines(results["diagnostics"])
    if results.get("plots"):
        lines += ["", "## Plots", ""] + [f"- [{p}]({p})" for p in results["plots"]]
    return "\n".join(lines) + "\n"


def _header_lines(results: Mapping) -> list[str]:
    """The report's list of what was evaluated, on what, and how."""
    ckpt, data = results["checkpoint"], results["data"]
    model = results["model"]
    lines = [
        f"# OOD evaluation: {model.get('name', 'model')} on {data['id']['name']}",
        "",
        f"- checkpoint: {_checkpoint_origin(ckpt)} step {ckpt.get('step')}"
        if ckpt
        else f"- model: {model.get('description') or model.get('name', 'given in memory')}",
        f"- in-distribution test set: {data['id']['name']} ({data['id']['num_examples']} "
        f"images; {data['id']['source']})",
    ]
    for name, info in data["ood"].items():
        note = (results.get("set_notes") or {}).get(name)
        lines.append(
            f"- OOD set {name}: {info['num_examples']} images ({info['source']})"
            + (f"; **{note}**: the training outliers share its classes" if note else "")
        )
    if data.get("train"):
        lines.append(
            f"- training set for fitted scores: {data['train']['name']} "
            f"({data['train']['num_examples']} images)"
        )
    for part, what in (("val_id", "ID validation"), ("val_ood", "OOD validation")):
        if data.get(part):
            info = data[part]
            lines.append(
                f"- {what} set: {info['name']} ({info['num_examples']} images; {info['source']})"
            )
    fit_on_val = (results.get("spec") or {}).get("fit_on_val")
    if fit_on_val:
        labels = [results.get("score_display", {}).get(n, n) for n in fit_on_val]
        lines.append(
            f"- fitted on the ID validation set, not the training set: {', '.join(labels)}"
        )
    for name in results.get("image_score_examples") or {}:
        budget = results.get("score_hparams", {}).get(name, {}).get("max_examples")
        if budget:
            label = results.get("score_display", {}).get(name, name)
            lines.append(
                f"- {label} on seeded random subsets of at most {budget} images per dataset "
                f"(sizes in results.json `image_score_examples`)"
            )
    by_reason: dict[str, list[str]] = {}
    for name, why in (results.get("skipped_scores") or {}).items():
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        lines.append(f"- skipped {', '.join(names)}: {'it' if len(names) == 1 else 'each'} {why}")
    command = results.get("command")
    lines.append(
        "- metrics in percent; higher score = more in-distribution"
        + (f"; command: `{command}`" if command else "")
    )
    return lines


def _tuning_lines(results: Mapping) -> list[str]:
    """The hyperparameters chosen on the validation pair, with every candidate's AUROC."""
    tuning = results.get("tuning")
    if not tuning:
        return []
    data = results["data"]
    lines = [
        "",
        "## Hyperparameters chosen on validation",
        "",
        f"Best validation AUROC of each grid: {data['val_id']['name']} (held-out training "
        f"images) vs {data['val_ood']['name']}; the test sets are scored at the chosen "
        "values only.",
    ]
    for record in tuning.values():
        chosen = _hparams_text(record["chosen"])
        lines += ["", f"#### {record['display']}: {chosen} (result key `{record['key']}`)", ""]
        rows = [
            [
                _hparams_text(c["hparams"]),
                _pct(c["auroc"]) + (" ✓" if c["hparams"] == record["chosen"] else ""),
            ]
            for c in record["candidates"]
        ]
        lines += markdown_table(["hyperparameters", "validation AUROC↑"], rows)
    return lines


def _hparams_text(hparams: Mapping) -> str:
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hparams.items()
    )


def _diagnostics_lines(diag: Mapping) -> list[str]:
    """Pearce et al.'s diagnostics: head geometry, feature norms, the Mahalanobis split
    (each where the model has what it needs: a head, features)."""
    w = diag["weights"]
    lines = ["", "## Diagnostics (Pearce et al. 2021)", ""]
    if w is None:
        lines += ["No final linear layer given: no weight or feature geometry.", ""]
    else:
        lines += [
            f"Final-layer weight vectors: pairwise cosine mean {w['cosine']['mean']:.4f} "
            f"(min {w['cosine']['min']:.4f}, max {w['cosine']['max']:.4f}) vs optimal "
            f"{w['optimal_cosine']:.4f}; norms mean {w['norm']['mean']:.4f} "
            f"(coefficient of variation {w['norm_cv']:.4f}); "
            + (
                f"bias mean |b| {np.mean(np.abs(w['biases'])):.4f}."
                if w["biases"] is not None
                else "no bias."
            ),
            "",
        ]
    rows = [
        [
            name,
            f"{d['feature_norm']['mean']:.3f}",
            f"{d['feature_norm']['q50']:.3f}",
            f"{d['cos_pred']['mean']:.3f}",
            f"{d['cos_pred']['q50']:.3f}",
        ]
        for name, d in diag["features"].items()
    ]
    if rows:
        header = ["dataset", "mean ‖z‖", "median ‖z‖", "mean cos(z, w_pred)", "median cos"]
        lines += markdown_table(header, rows)
    split = diag.get("mahalanobis_split")
    if split:
        lines += [
            "",
            "Median squared Mahalanobis distance to the nearest class mean (tied covariance "
            "of the training features), split into the K - 1 directions of largest "
            "variance and the rest, which whitening amplifies; raw and L2-normalized "
            "features:",
            "",
        ]
        header = ["dataset"] + [
            f"{v} {part}" for v in ("raw", "L2") for part in ("total", "top", "rest")
        ]
        rows = [
            [name]
            + [
                f"{split[v][name][part]['q50']:.4g}"
                for v in ("raw", "l2")
                for part in ("total", "top", "rest")
            ]
            for name in split["raw"]
        ]
        lines += markdown_table(header, rows)
    return lines
