"""Wall time of ood_jax.metrics on large score sets (host-side NumPy).

Usage::

    python benchmarks/metrics_speed.py                  # 1,000,000 ID + 1,000,000 OOD scores
    python benchmarks/metrics_speed.py --num 100000     # quicker

Each row is the median of ``--repeats`` calls (default 5) of ``ood_metrics`` on
float32 scores, for both conventions and three score distributions:
``continuous`` (Gaussian, no ties), ``saturated`` (MSP-like float32 softmax
confidences, a large tied group at 1.0) and ``integer`` (values 0..99, every
score tied). The target is under 2 s for 1,000,000 + 1,000,000 scores. The
last rows time ``expected_calibration_error`` and ``accuracy`` on ``[num, 10]``
logits.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from ood_jax.metrics import accuracy, expected_calibration_error, ood_metrics


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _score_sets(rng: np.random.Generator, num: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    def msp(shift: float) -> np.ndarray:
        logits = rng.normal(size=(num, 10)).astype(np.float32)
        logits[:, 0] += rng.exponential(shift, size=num).astype(np.float32)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (exp / exp.sum(axis=1, keepdims=True)).max(axis=1)

    return {
        "continuous": (
            rng.normal(1.0, 1.0, num).astype(np.float32),
            rng.normal(0.0, 1.0, num).astype(np.float32),
        ),
        "saturated": (msp(20.0), msp(3.0)),
        "integer": (
            rng.integers(0, 100, num).astype(np.float32),
            rng.integers(0, 80, num).astype(np.float32),
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1_000_000, help="ID and OOD scores each")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    score_sets = _score_sets(rng, args.num)
    logits = rng.normal(scale=3.0, size=(args.num, 10)).astype(np.float32)
    labels = rng.integers(0, 10, args.num).astype(np.int32)

    print(f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"numpy={np.__version__} load_avg_1min={os.getloadavg()[0]:.1f}"
    )
    print(f"{args.num:,} ID + {args.num:,} OOD scores, median of {args.repeats} calls\n")
    print("| call | inputs | median (s) |")
    print("| --- | --- | ---: |")
    for name, (id_scores, ood_scores) in score_sets.items():
        for convention in ("hendrycks", "openood"):
            seconds = _median_seconds(
                lambda i=id_scores, o=ood_scores, c=convention: ood_metrics(i, o, convention=c),
                args.repeats,
            )
            print(f"| ood_metrics({convention}) | {name} | {seconds:.3f} |", flush=True)
    ece_s = _median_seconds(lambda: expected_calibration_error(logits, labels), args.repeats)
    print(f"| expected_calibration_error | [{args.num:,}, 10] logits | {ece_s:.3f} |")
    acc_s = _median_seconds(lambda: accuracy(logits, labels), args.repeats)
    print(f"| accuracy | [{args.num:,}, 10] logits | {acc_s:.3f} |")


if __name__ == "__main__":
    main()
