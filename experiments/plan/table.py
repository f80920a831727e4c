"""A resumable table of compile-only plans: one row per key, kept across runs.

A plan can take minutes per row, so :func:`run_rows` writes the JSON after every
row and a later run with the same ``--output`` keeps the rows it does not redo
(:mod:`experiments.plan.tpu`'s and :mod:`experiments.plan.gpu`'s train-step tables and
:mod:`experiments.plan.tpu_eval`'s evaluation table).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax

from experiments import cli
from experiments.plan.program import PlanError

# A job: the row's key fields, and the plan that computes the row.
Job = tuple[dict, Callable[[], dict]]


class CompilerCrash(Exception):
    """The compiler killed its process (a signal, e.g. libtpu's SIGSEGV): an error row
    that stands until the software versions change."""


def isolated(module: str, args: Sequence[str]) -> Callable[[], dict]:
    """A plan run as ``python -m module *args --output TMP`` in a process of its own,
    so that a compiler that crashes its process (libtpu 0.0.42.1 on WRN-40-2 for
    v6e) becomes a :class:`CompilerCrash` row instead of ending the table.

    The child plans one row: its row is read back from its ``TMP.json``; its one-line
    refusal (exit 2, a :class:`PlanError` verdict) is raised here as the same
    :class:`PlanError`; any other exit is a ``RuntimeError`` (tried again next run)."""

    def plan() -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "row")
            argv = [sys.executable, "-m", module, *args, "--output", out]
            done = subprocess.run(argv, stderr=subprocess.PIPE, text=True, check=False)
            last = (done.stderr.strip().splitlines() or [""])[-1]
            if done.returncode == 0:
                with open(f"{out}.json") as f:
                    return json.load(f)["rows"][0]
            if done.returncode < 0:  # its stack trace, for a bug report
                sys.stderr.write(done.stderr[-4000:])
                name = signal.Signals(-done.returncode).name
                raise CompilerCrash(f"the compiler crashed its process ({name})")
            sys.stderr.write(done.stderr[-4000:])
            if done.returncode == 2:
                raise PlanError(last.removeprefix("error: "))
            raise RuntimeError(f"exit {done.returncode}: {last}")

    return plan


def run_rows(
    jobs: Sequence[Job],
    *,
    key_fields: tuple[str, ...],
    markdown: Callable[[Sequence[dict], dict], str],
    output: str,
    command: str,
    versions: str | None = None,
) -> list[dict]:
    """Runs every job not already in ``output``.json; returns (and writes) all rows.

    ``versions``: the header's software versions (default: jax's and libtpu's).

    A failed job is an error row when there are several (one failure must not end a
    long run); a single one raises (a :class:`PlanError` as a usage error)."""

    def key_of(row: dict) -> tuple:  # a field older rows lack (overrides) is ""
        return tuple(row.get(f, "") for f in key_fields)

    versions = versions or f"jax {jax.__version__}, libtpu {libtpu_version()}"
    wanted = {key_of(fields) for fields, _ in jobs}
    done = _previous_rows(output, key_of)
    kept = [row for key, row in done.items() if key not in wanted]
    rows = []
    for fields, plan in jobs:
        if key_of(fields) in done and not _retry(done[key_of(fields)], versions):
            rows.append(done[key_of(fields)])
            continue
        try:
            rows.append(plan())
        except Exception as err:  # noqa: BLE001 -- one failed row must not end an --all run
            if len(jobs) == 1:
                if isinstance(err, PlanError):
                    raise cli.UsageError(str(err)) from None
                raise
            if isinstance(err, CompilerCrash):
                err = f"{err} ({versions})"
            elif not isinstance(err, PlanError):
                err = f"compile failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            rows.append({**fields, "error": str(err), "versions": versions})
        print(markdown(rows[-1:], {}).splitlines()[-1], flush=True)
        done[key_of(fields)] = rows[-1]
        if output:  # after every row, every row so far: a stopped --all run resumes
            _write_json(output, {"rows": list(done.values())})
    header = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": versions,
    }
    rows = kept + rows
    text = markdown(rows, header)
    print(text)
    if output:
        with open(f"{output}.md", "w") as f:
            f.write(text)
        _write_json(output, {"header": header, "rows": rows})
    return rows


def heading(title: str, header: dict, notes: Sequence[str]) -> list[str]:
    """A table's Markdown title, run header (command, date, versions) and notes."""
    return [
        f"# {title}",
        "",
        *(f"- {k}: {v}" for k, v in header.items()),
        *(f"- {n}" for n in notes),
        "",
    ]


def _retry(row: dict, versions: str) -> bool:
    """Whether a later run plans an earlier row again: a compile that raised (not a
    plan's verdict such as "does not fit"), or a compiler crash under other versions."""
    error = str(row.get("error", ""))
    if error.startswith("the compiler crashed"):
        return row.get("versions") != versions
    return error.startswith("compile failed")


def _previous_rows(output: str, key_of: Callable[[dict], tuple]) -> dict:
    """Rows of an earlier run with the same ``--output`` (kept, not compiled again)."""
    if not output or not os.path.exists(f"{output}.json"):
        return {}
    with open(f"{output}.json") as f:
        rows = json.load(f)["rows"]
    return {key_of(r): r for r in rows}


def _write_json(output: str, payload: dict) -> None:
    tmp = f"{output}.json.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, f"{output}.json")


def libtpu_version() -> str:
    """The installed libtpu's version (``unknown`` without its package metadata)."""
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return "unknown"
