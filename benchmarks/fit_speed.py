"""Fit and score times of the fitted OOD scores on CIFAR-sized synthetic features.

Usage (from the repository root, with ``ood_jax`` importable: ``pip install -e .``
or ``PYTHONPATH=.``)::

    python benchmarks/fit_speed.py                      # 50,000 x 512 train, 10,000 test
    python benchmarks/fit_speed.py --num-train 5000     # quicker

Features are synthetic ReLU-like activations (class-dependent means), the
shape of ResNet-18 penultimate features on CIFAR-10. Fit time is host-side
float64 NumPy; score time is the jitted scorer on all test features, reported
as the first call (includes compilation) and the best of ``--repeats`` later calls.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from ood_jax import scores


def _synthetic_features(
    rng: np.random.Generator, num: int, dim: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, num_classes, num)
    class_means = np.abs(np.random.default_rng(0).normal(size=(num_classes, dim)))
    features = np.maximum(class_means[labels] + rng.normal(size=(num, dim)), 0.0)
    return features.astype(np.float32), labels.astype(np.int32)


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=50_000)
    parser.add_argument("--num-test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(1)
    train, labels = _synthetic_features(rng, args.num_train, args.dim, args.num_classes)
    test, _ = _synthetic_features(rng, args.num_test, args.dim, args.num_classes)
    kernel = rng.normal(size=(args.dim, args.num_classes)).astype(np.float32) / np.sqrt(args.dim)
    bias = np.zeros(args.num_classes, np.float32)

    methods = {
        "mahalanobis": (
            lambda: scores.fit_mahalanobis(train, labels),
            lambda p: scores.mahalanobis_score(p, test),
        ),
        "gmm": (lambda: scores.fit_gmm(train, labels), lambda p: scores.gmm_score(p, test)),
        "knn": (
            lambda: scores.fit_knn(train),
            lambda p: scores.knn_score(p, test, k=args.k, chunk_size=args.chunk_size),
        ),
        "react": (
            lambda: scores.fit_react(train),
            lambda p: scores.react_score(p, test, kernel, bias),
        ),
    }

    print(f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} "
        f"cpus={os.cpu_count()} jax={jax.__version__} backend={jax.default_backend()} "
        f"devices={len(jax.devices())}"
    )
    print(
        f"train {args.num_train} x {args.dim} ({args.num_classes} classes), "
        f"test {args.num_test}, knn k={args.k} chunk={args.chunk_size}\n"
    )
    print("| score | fit (s) | score, first call (s) | score, best later call (s) |")
    print("| --- | ---: | ---: | ---: |")
    for name, (fit, score) in methods.items():
        start = time.perf_counter()
        params = jax.block_until_ready(fit())
        fit_s = time.perf_counter() - start
        first_s = _seconds(lambda p=params, s=score: s(p))
        later_s = min(_seconds(lambda p=params, s=score: s(p)) for _ in range(args.repeats))
        print(f"| {name} | {fit_s:.2f} | {first_s:.2f} | {later_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
