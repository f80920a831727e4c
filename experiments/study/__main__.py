"""``python -m experiments.study``: plan, run or resume, publish and report the study."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from experiments import cli, study
from experiments.study.execute import run_study
from experiments.study.plan import EPOCHS, REPORT_SCORES, plan, print_plan
from experiments.study.publish import publish


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.study", description=study.__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="the study's runs go in sub-folders")
    parser.add_argument("--data", default="local", help="local (offline files) or a folder")
    parser.add_argument(
        "--report_dir",
        default=os.path.join("results", "cpu_study"),
        help="the report and the published checkpoints (default: results/cpu_study)",
    )
    parser.add_argument("--only", default="", help="comma-separated run or method names")
    parser.add_argument("--plan", action="store_true", help="list the runs and their state")
    parser.add_argument("--report_only", action="store_true", help="write the report only")
    parser.add_argument(
        "--epochs", type=int, default=EPOCHS, help="from-scratch epochs (the study's: 5)"
    )
    parser.add_argument(
        "--preset", default="cpu", choices=("cpu", "smoke"), help="smoke: a quick trial"
    )
    parser.add_argument(
        "--scores",
        default="",
        help="comma-separated detectors each run scores (default: every registered one); "
        f"the report's own ({', '.join(REPORT_SCORES)}) are always added",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        raise cli.UsageError(f"--epochs must be >= 1, got {args.epochs}.")
    scores = _scores(args.scores)
    root = os.path.abspath(args.workdir)
    if args.plan:
        print_plan(root, args.epochs)
        return
    complete = True
    if not args.report_only:
        only = [s for s in args.only.split(",") if s]
        complete = run_study(
            root, data=args.data, only=only, epochs=args.epochs, preset=args.preset, scores=scores
        )
    from experiments.study import report

    report_dir = args.report_dir
    published = publish(root, os.path.join(report_dir, "checkpoints"), plan(args.epochs))
    if published:
        print(f"published {len(published)} checkpoints in {report_dir}/checkpoints")
    command = " ".join(["python -m experiments.study", *(argv or [])])
    report.write(root, report_dir, plan(args.epochs), complete=complete, command=command)
    print(f"report: {os.path.join(report_dir, 'results.md')}")


def _scores(flag: str) -> tuple[str, ...]:
    """``--scores`` with the report's own scores added; () (every score) when empty."""
    named = [s.strip() for s in flag.split(",") if s.strip()]
    if not named:
        return ()
    from ood_jax.scores import available_scores

    unknown = [s for s in named if s not in available_scores()]
    if unknown:
        raise cli.UsageError(
            f"--scores: unknown score(s) {', '.join(map(repr, unknown))}; "
            f"available: {', '.join(available_scores())}."
        )
    return tuple(dict.fromkeys([*REPORT_SCORES, *named]))


if __name__ == "__main__":
    cli.run_main(main, sys.argv[1:])
