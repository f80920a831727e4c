"""What the commands' persistent compilation cache saves at a start.

Each measurement is one command in a process of its own, as a user runs it:
``python -m experiments.cifar10_<method> --preset P --data local
--config.train.num_steps=1 --config.eval.ood=false`` in a fresh workdir, timed
from the process's start to its exit (loading the data, compiling the train and
eval steps, one step, the test pass). A *cold* start has an empty cache folder; a
*warm* start reuses the folder the cold one filled. Medians and ranges over rounds::

    python benchmarks/compile_cache.py --out benchmarks/results/compile_cache.md

Run it on a quiet machine (load below 1): it records the load before it starts.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine_load import cpu_name  # noqa: E402


def start(method: str, preset: str, cache: Path, workdir: Path) -> float:
    """Seconds from launching one 1-step run to its exit."""
    from experiments import methods

    argv = [
        *methods.train_argv(method, workdir, preset=preset),
        "--config.train.num_steps=1",
        "--config.train.progress=false",
        "--config.train.tensorboard=false",
        "--config.eval.ood=false",
    ]
    env = {**os.environ, "OOD_JAX_COMPILATION_CACHE": str(cache)}
    begin = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - begin
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return elapsed


def measure(method: str, preset: str, rounds: int) -> dict[str, list[float]]:
    """``{"cold": [s], "warm": [s]}``: per round, a cold start then a warm one."""
    out: dict[str, list[float]] = {"cold": [], "warm": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "cache"
            for kind in ("cold", "warm"):
                workdir = Path(tmp) / kind
                out[kind].append(start(method, preset, cache, workdir))
                shutil.rmtree(workdir)
        print(method, preset, {k: round(v[-1], 1) for k, v in out.items()}, flush=True)
    return out


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="ce,acet")
    parser.add_argument("--presets", default="smoke,cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    # The decoded-image cache filled first, so that no start pays for decoding the JPEGs.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import experiments; from ood_jax import data as D; "
            "[D.load_dataset('cifar10_jpeg', s) for s in ('train', 'test')]",
        ],
        cwd=ROOT,
        check=True,
    )
    load = os.getloadavg()
    rows = []
    for preset in args.presets.split(","):
        for method in args.methods.split(","):
            times = measure(method, preset, args.rounds)
            saved = [c - w for c, w in zip(times["cold"], times["warm"], strict=True)]
            rows.append(
                f"| {method} | {preset} | {cell(times['cold'])} | {cell(times['warm'])} "
                f"| {cell(saved)} |"
            )
    command = "python benchmarks/compile_cache.py " + shlex.join(sys.argv[1:])
    lines = [
        "# Persistent compilation cache: a start, cold and warm",
        "",
        f"`{command}`, {datetime.date.today()}, {cpu_name()} ({os.cpu_count()} cores), "
        f"{platform.python_version()}, load average before the run "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min).",
        "",
        "Seconds from launching `python -m experiments.cifar10_<method> --preset P --data "
        "local --config.train.num_steps=1 --config.eval.ood=false` to its exit (loading "
        "the data, compiling the train and eval steps, one step, the test pass), each in a "
        "process of its own; cold: an empty cache folder, warm: the folder the cold start "
        f"filled. Median (min-max) over {args.rounds} rounds.",
        "",
        "| method | preset | cold start (s) | warm start (s) | saved (s) |",
        "|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
