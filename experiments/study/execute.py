"""Running the study: each unfinished run in its own process, in the plan's order,
with a log of starts and ends (``<root>/study.jsonl``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from experiments.study.plan import EPOCHS, Run, command, plan, state_of

LOG_FILE = "study.jsonl"


def _log(root: str, record: dict) -> None:
    with open(os.path.join(root, LOG_FILE), "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}) + "\n")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _how_it_failed(returncode: int) -> str:
    if returncode < 0:
        oom = " (SIGKILL: out of memory?)" if returncode == -9 else ""
        return f"was killed by signal {-returncode}{oom}"
    return f"exited with status {returncode}"


def run_study(
    root: str,
    *,
    data: str,
    only: Sequence[str] = (),
    epochs: int = EPOCHS,
    preset: str = "cpu",
    scores: Sequence[str] = (),
) -> bool:
    """Runs every unfinished run of the plan (or those named in ``only``), in order;
    ``scores``: the detectors each run scores (default: every registered one).

    Returns True when every planned run is done. A run that fails stops the study
    with its exit status; its workdir keeps what it saved.
    """
    runs = [r for r in plan(epochs) if not only or r.name in only or r.method in only]
    execute(root, runs, lambda run: command(run, root, data, preset, scores))
    return all(state_of(r, root) == "done" for r in plan(epochs))


def execute(root: str, runs: Sequence[Run], argv_of: Callable[[Run], list[str]]) -> None:
    """Runs each unfinished run of ``runs`` in order, each ``argv_of(run)`` in its own
    process; a run that fails stops here (``SystemExit(1)``), its workdir kept."""
    os.makedirs(root, exist_ok=True)
    todo = [r for r in runs if state_of(r, root) != "done"]
    print(f"study in {root}: {len(runs) - len(todo)} of {len(runs)} runs done, {len(todo)} to go")
    durations = []
    for i, run in enumerate(todo, 1):
        if run.init_from and state_of(Run(run.init_from, "", 0), root) != "done":
            print(f"[{i}/{len(todo)}] {run.name}: waits for {run.init_from}; skipped this time")
            continue
        eta = ""
        if durations:
            eta = f", about {_minutes(sum(durations) / len(durations) * (len(todo) - i + 1))} left"
        print(f"[{i}/{len(todo)}] {run.name} ({state_of(run, root)}{eta})", flush=True)
        argv = argv_of(run)
        _log(root, {"run": run.name, "event": "start", "command": " ".join(argv[1:])})
        start = time.perf_counter()
        done = subprocess.run(argv, check=False)
        elapsed = time.perf_counter() - start
        _log(root, {"run": run.name, "event": "end", "rc": done.returncode, "seconds": elapsed})
        if done.returncode != 0:
            print(
                f"[{i}/{len(todo)}] {run.name} {_how_it_failed(done.returncode)}; the study "
                "stops here. Its workdir keeps its checkpoints: run the same command again "
                "to resume.",
                file=sys.stderr,
            )
            raise SystemExit(1)
        durations.append(elapsed)
        print(f"[{i}/{len(todo)}] {run.name}: done in {_minutes(elapsed)}", flush=True)
