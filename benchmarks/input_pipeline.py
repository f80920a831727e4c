"""Images/s of the CIFAR-10 train pipeline on the offline data of ../shared/data.

Usage (from the repository root):
  python -m benchmarks.input_pipeline [--passes 7] [--steps 100] [--output FILE.md]

Prints a Markdown table: the one-time JPEG decode (no cache) and the cached
load, then the median over ``--passes`` timed passes of ``--steps`` batches for
each configuration (the first batch of each pass, which starts the prefetch
thread, is not timed). ``prefetch=0`` is the raw cost of a batch in the
caller's thread; ``prefetch=2`` is the rate a consumer that does nothing else
sees (in training the thread overlaps with the step).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from ood_jax import data


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores available"


def time_train(dataset, *, batch_size, augment, prefetch, steps, passes) -> list[float]:
    rates = []
    for p in range(passes):
        it = data.train_iterator(
            dataset,
            batch_size=batch_size,
            seed=p,
            augment=augment,
            prefetch=prefetch,
            process_index=0,
            process_count=1,
        )
        next(it)
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        rates.append(steps * batch_size / (time.perf_counter() - start))
        it.close()
    return rates


def time_eval(dataset, *, batch_size, passes) -> list[float]:
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        for _ in data.eval_batches(
            dataset, batch_size=batch_size, process_index=0, process_count=1
        ):
            pass
        rates.append(len(dataset) / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--data-dir", default=None, help="default: $OOD_JAX_DATA_DIR or ../shared/data"
    )
    parser.add_argument("--output", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        dataset = data.load_dataset(
            "cifar10_jpeg", "train", data_dir=args.data_dir, cache_dir=cache
        )
        decode_s = time.perf_counter() - start
        start = time.perf_counter()
        data.load_dataset("cifar10_jpeg", "train", data_dir=args.data_dir, cache_dir=cache)
        cached_s = time.perf_counter() - start

    rows = []
    for batch_size, augment, prefetch in [
        (128, True, 0),
        (128, True, 2),
        (128, False, 2),
        (1024, True, 0),
        (1024, True, 2),
    ]:
        steps = max(10, args.steps * 128 // batch_size)
        rates = time_train(
            dataset,
            batch_size=batch_size,
            augment=augment,
            prefetch=prefetch,
            steps=steps,
            passes=args.passes,
        )
        what = f"train, batch {batch_size}, augment={augment}, prefetch={prefetch}"
        rows.append((what, statistics.median(rates), min(rates), max(rates)))
    rates = time_eval(dataset, batch_size=500, passes=min(args.passes, 3))
    rows.append(
        ("eval (50,000 images), batch 500", statistics.median(rates), min(rates), max(rates))
    )

    command = "python -m benchmarks.input_pipeline " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    lines = [
        "# Input pipeline throughput: CIFAR-10 (JPEG) train split, 50,000 images",
        "",
        f"- command: `{command.strip()}`",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()} (shared with other jobs while measuring)",
        f"- numpy {np.__version__}, Python {platform.python_version()}",
        f"- one-time JPEG decode of 50,000 images (PIL, no cache): {decode_s:.1f} s; "
        f"load from the decoded cache: {cached_s:.2f} s",
        f"- {args.passes} passes of {args.steps} x 128 images (as many images at batch 1024); "
        "median, min and max over passes",
        "",
        "| pipeline | images/s (median) | min | max |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {what} | {med:,.0f} | {lo:,.0f} | {hi:,.0f} |" for what, med, lo, hi in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table)
    return table


if __name__ == "__main__":
    main()
