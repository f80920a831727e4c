"""The reproduction study's report, written from the runs' workdirs.

``write(root, report_dir, runs)`` reads each finished run's ``eval/results.json``,
``eval/scores.npz`` and ``metrics.jsonl`` and writes ``results.md``,
``results.json`` and ``plots/*.png`` into ``report_dir``. Only runs that finished
are reported; the report says which planned runs are missing.

Conventions: the papers' protocol (2,000 OOD examples per draw, ten draws; a set
no larger than that used whole) and the Hendrycks convention (ID positive); a
run's number for a group of sets is the mean over the sets of its per-set means,
and the table gives the mean ± standard deviation of that number over seeds.

Modules: :mod:`~experiments.study.report.runs` (loading the runs, their numbers per
method), :mod:`~experiments.study.report.claims` (each paper's claim and its verdict),
:mod:`~experiments.study.report.tables`, :mod:`~experiments.study.report.density`
(the density scores), :mod:`~experiments.study.report.figures` (the PNGs) and
:mod:`~experiments.study.report.markdown` (:func:`write`, one function per section).
:mod:`~experiments.study.report.regime` writes the regime study's report
(``python -m experiments.study.regime report``) from the same pieces.
"""

from experiments.study.report.markdown import write
from experiments.study.report.runs import load_runs

__all__ = ["load_runs", "write"]
