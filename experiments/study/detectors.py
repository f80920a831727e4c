"""Every registered detector on the study's published checkpoints: the detector table.

    python -m experiments.study.detectors run --workdir runs/detectors --report results/cpu_study
    python -m experiments.study.detectors table --workdir runs/detectors --report results/cpu_study

``run`` evaluates each published main-study checkpoint (``ood_jax.pretrained``:
every method and seed of the 5-epoch study, not the sweeps) with **every**
registered score on the real OOD sets, through ``python -m experiments.evaluate``
(one process per checkpoint, the papers' protocol, the run's own evaluation
settings: scores fitted on 10,000 training images, full OOD sets). A checkpoint
whose ``results.json`` exists under ``--workdir`` is skipped, so a stopped ``run``
resumes. ``run`` then (and ``table`` alone) writes ``detectors.md`` and
``detectors.json`` into ``--report``: for each training method and
detector, the real-set AUROC and FPR95 (mean of the three sets' values, then mean
± population std over seeds), and OpenOOD v1.5's CIFAR-10 leaderboard AUROC beside
it for reference (another model and protocol: ResNet-18 trained 100 epochs with
cross-entropy, near / far OOD sets of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from experiments import cli
from experiments.methods import STUDY_ORDER
from experiments.methods import get as get_method
from experiments.study.report.runs import (
    REAL,
    format_cell,
    mean_std,
    set_metric,
)
from ood_jax import pretrained
from ood_jax.evaluate.report import markdown_table, write_json

# OpenOOD v1.5's CIFAR-10 leaderboard (ResNet-18, cross-entropy, mean of 3 runs):
# near / far AUROC %, by our score name. Another model, training and set of OOD sets:
# printed beside our numbers for orientation, never compared as equals.
OPENOOD_CE_AUROC = {
    "msp": (88.03, 90.73),
    "energy": (87.58, 91.21),
    "max_logit": (87.52, 91.10),
    "mahalanobis": (84.20, 89.72),
    "knn": (90.64, 92.96),
    "react": (87.11, 90.42),
    "odin": (82.87, 87.96),
    "gradnorm": (54.90, 57.55),
    "fdbd": (90.42, 93.16),
    "rmds": (89.80, 92.20),
    "relation": (89.77, 92.21),
    "vim": (88.68, 93.48),
    "gen": (88.20, 91.35),
    "temp_scale": (88.09, 90.97),
}
RESULTS = "results.json"


def study_checkpoints(names: Sequence[str] | None = None) -> list[str]:
    """The published main runs of the 5-epoch study, ``<data>/<model>/<method>/seed<k>``
    (not its sweep, ``.../sweep/<variant>/seed<k>``, nor the regime study's,
    ``.../regime/<run>/seed<k>``)."""
    found = [n for n in pretrained.available() if len(n.split("/")) == 4]
    if names:
        unknown = sorted(set(names) - {n.split("/")[-2] for n in found})
        if unknown:
            raise cli.UsageError(
                f"--methods {','.join(unknown)}: not among the published study runs' "
                f"methods {sorted({n.split('/')[-2] for n in found})}."
            )
        found = [n for n in found if n.split("/")[-2] in names]
    return found


def evaluate_command(name: str, out: str) -> list[str]:
    """The evaluation of checkpoint ``name`` with every registered score."""
    return [
        sys.executable,
        "-m",
        "experiments.evaluate",
        f"--pretrained={name}",
        f"--ood_sets={','.join(REAL)}",
        "--protocols=papers",
        f"--out_dir={os.path.join(out, name)}",
    ]


def run(out: str, names: Sequence[str]) -> list[str]:
    """Evaluates each checkpoint without a ``results.json`` under ``out``; returns the
    ones whose evaluation failed (the others still run: one failure costs one row)."""
    failed = []
    for i, name in enumerate(names, 1):
        if os.path.exists(os.path.join(out, name, RESULTS)):
            print(f"[{i}/{len(names)}] {name}: done", flush=True)
            continue
        print(f"[{i}/{len(names)}] {name}: evaluating", flush=True)
        start = time.perf_counter()
        done = subprocess.run(evaluate_command(name, out), check=False)
        if done.returncode == 130:  # Ctrl-C in the evaluation: stop here
            raise KeyboardInterrupt
        if done.returncode:
            print(f"[{i}/{len(names)}] {name}: exited {done.returncode}", flush=True)
            failed.append(name)
            continue
        print(f"[{i}/{len(names)}] {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return failed


def collect(out: str, names: Sequence[str]) -> dict[str, dict[str, dict]]:
    """``{method: {score: {"auroc": cell, "fpr95": cell, "seeds": [...]}}}`` of the
    evaluated checkpoints (cells from :func:`mean_std` over seeds)."""
    per_method: dict[str, list[Mapping]] = {}
    for name in names:
        path = os.path.join(out, name, RESULTS)
        if os.path.exists(path):
            with open(path) as f:
                per_method.setdefault(name.split("/")[-2], []).append(json.load(f))
    table: dict[str, dict[str, dict]] = {}
    for method in (m for m in STUDY_ORDER if m in per_method):
        results = per_method[method]
        # Every score any seed has (a score skipped for one model counts as missing there).
        scores = dict.fromkeys(k for r in results for k in r["ood"]["papers"]["metrics"])
        table[method] = {
            score: {
                metric: mean_std([set_metric(r, score, REAL, metric) for r in results])
                for metric in ("auroc", "fpr95")
            }
            | {"seeds": len(results)}
            for score in scores
        }
    return table


def markdown(table: Mapping[str, Mapping[str, dict]], header: Mapping[str, str]) -> str:
    """Two tables (AUROC, FPR95): a row per detector, a column per training method."""
    methods = list(table)
    scores = list(dict.fromkeys(s for m in methods for s in table[m]))
    lines = [
        "# Every detector on the study's checkpoints",
        "",
        *(f"- {k}: {v}" for k, v in header.items()),
        "- each cell: the mean over the three real OOD sets (Tiny ImageNet crop and "
        "resize, Textures) of the papers' protocol, then mean ± std over seeds; "
        "CIFAR-10 (JPEG) in distribution, ResNet-9 width 16 trained 5 epochs.",
        "- † methods trained with Tiny ImageNet outliers (near-auxiliary: the Tiny "
        "ImageNet test sets share their classes).",
        "- OpenOOD v1.5 column: its CIFAR-10 leaderboard (ResNet-18, cross-entropy, "
        "100 epochs; near / far AUROC on its own OOD sets), for orientation only.",
    ]
    names = [
        f"{get_method(m).label}{' †' if get_method(m).near_auxiliary else ''} "
        f"({next(iter(table[m].values()))['seeds']})"
        for m in methods
    ]
    for metric, title in (("auroc", "AUROC % (real sets) ↑"), ("fpr95", "FPR95 % (real sets) ↓")):
        body = []
        for score in scores:
            row = [score] + [
                format_cell(table[m][score][metric]) if score in table[m] else "–" for m in methods
            ]
            if metric == "auroc":
                ref = OPENOOD_CE_AUROC.get(score)
                row.append(f"{ref[0]:.2f} / {ref[1]:.2f}" if ref else "")
            body.append(row)
        extra = ["OpenOOD CE near / far"] if metric == "auroc" else []
        lines += ["", f"## {title}", ""] + markdown_table(["detector", *names, *extra], body)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.study.detectors", description=__doc__.split("\n")[0]
    )
    parser.add_argument("action", choices=("run", "table"))
    parser.add_argument("--workdir", required=True, help="folder of the evaluations")
    parser.add_argument("--report", required=True, help="folder of detectors.md / .json")
    parser.add_argument("--methods", default="", help="only these methods, e.g. ce,logitnorm")
    args = parser.parse_args(argv)
    names = study_checkpoints([m for m in args.methods.split(",") if m])
    failed = run(args.workdir, names) if args.action == "run" else []
    table = collect(args.workdir, names)
    if not table and not failed:
        raise cli.UsageError(f"{args.workdir}: no evaluated checkpoint; run `run` first.")
    evaluated = sum(os.path.exists(os.path.join(args.workdir, n, RESULTS)) for n in names)
    header = {
        "command": f"python -m experiments.study.detectors run --workdir {args.workdir} "
        f"--report {args.report}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "checkpoints": f"{evaluated} of {len(names)} published study runs evaluated",
    }
    path = os.path.join(args.report, "detectors")
    if table:
        os.makedirs(args.report, exist_ok=True)
        with open(f"{path}.md", "w") as f:
            f.write(markdown(table, header))
        write_json({"header": header, "table": table}, f"{path}.json")
        print(f"wrote {path}.md")
    if failed:
        raise cli.UsageError(
            f"{len(failed)} evaluation(s) failed ({', '.join(failed)}); see their errors "
            "above, fix them and run again (finished checkpoints are kept)."
        )


if __name__ == "__main__":
    cli.run_main(main, sys.argv[1:])
