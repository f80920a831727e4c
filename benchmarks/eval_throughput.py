"""Evaluation throughput: forward images/s, every model-running score's images/s, and
per-score time from cache.

Usage (from the repository root, ``ood_jax`` importable: ``pip install -e .`` or
``PYTHONPATH=.``)::

    python benchmarks/eval_throughput.py                       # cpu preset model, issue sizes
    python benchmarks/eval_throughput.py --out benchmarks/results/eval_throughput.md

Forward pass: ``ForwardPass`` (jitted, sharded over all devices) on random
uint8 images through ``eval_batches``; images/s after one warm-up pass.
Scores: ``score_outputs`` on cached outputs of the issue's sizes (10,000 ID +
6 x 2,000 OOD examples, fitted on 50,000 training features), with synthetic
ReLU-like features of the model's feature size and logits from its head;
each score's time is given for the first call (with compilation) and the
best of ``--repeats`` later calls, plus the host-side fit time. Metrics: the
papers' protocol (10 draws per set) over all scores.

Scores that run the model (``"images"``: ODIN, MC dropout, Mahalanobis with input
preprocessing, MDSEns; ``"activations"``: ASH/SCALE on the map, RankFeat, Gram):
images/s of each alone on ``--num-odin`` random images after a warm-up call, and
the fits that stream over a capturing pass of the training set (Gram, MDSEns) in
training images/s on ``--num-fit`` labelled random images. Together with the
forward pass these give what ``--scores all`` costs on a set of N images.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import jax
import numpy as np
from flax import nnx

from ood_jax import data as D
from ood_jax.evaluate import (
    ForwardPass,
    ModelOutputs,
    fit_captured,
    fit_scores,
    score_images,
    score_outputs,
)
from ood_jax.evaluate.protocol import evaluate_ood
from ood_jax.evaluate.scoring import (
    fitted_on_captures,
    fitted_on_outputs,
    runs_on,
    score_activations,
)
from ood_jax.models import create_model
from ood_jax.scores import (
    ArrayScore,
    Head,
    ModelScore,
    available_scores,
    get_score,
    resolve_hparams,
)

TEMPERATURES = (1.0, 10.0, 100.0, 1000.0)


def _synthetic_outputs(rng, n, kernel, bias, shift, labelled):
    dim, k = kernel.shape
    labels = rng.integers(0, k, n)
    means = np.abs(np.random.default_rng(0).normal(size=(k, dim)))
    z = np.maximum(means[labels] * shift + rng.normal(size=(n, dim)), 0).astype(np.float32)
    logits = (z @ kernel + bias).astype(np.float32)
    return ModelOutputs(logits, z, (labels if labelled else -np.ones(n)).astype(np.int32))


def _time(fn, repeats):
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return first, best


def _model_score_rows(forward, images, labels, batches, hparams, train_outputs, num_fit):
    """``(rows, fit rows)``: images/s of each model-running score alone, and of the
    captured fits' streaming pass."""
    ds = D.from_arrays(images, name="random", num_classes=0)
    fit_ds = D.from_arrays(images[:num_fit], labels[:num_fit], name="train", num_classes=10)
    fitted = fit_scores(hparams, train_outputs)
    fit_rows = []
    for name in [n for n in hparams if fitted_on_captures(get_score(n))]:
        start = time.perf_counter()
        fitted.update(fit_captured({name: hparams[name]}, forward, lambda: batches(fit_ds)))
        fit_rows.append(
            (f"fit {name} (streamed capturing pass)", num_fit / (time.perf_counter() - start))
        )
    rows = []
    for name, hp in hparams.items():
        score = get_score(name)
        if not runs_on(score, forward):
            rows.append((f"{name} (skipped: the model has no dropout)", None))
            continue
        # The evaluation's two model stages: each computes the scores of its kind and
        # passes over the others (no forward pass for them).
        run = lambda name=name, hp=hp: (
            score_images(
                {name: hp},
                forward,
                {"random": ds},
                batches=batches,
                std=D.CIFAR10_STD,
                seed=0,
                fitted=fitted,
            ),
            score_activations({name: hp}, forward, {"random": ds}, batches=batches, fitted=fitted),
        )
        run()  # compile
        start = time.perf_counter()
        run()
        rows.append((f"{name} ({score.consumes})", len(ds) / (time.perf_counter() - start)))
    return rows, fit_rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet9")  # the cpu preset's model
    p.add_argument("--options", default='{"width": 16, "pooling": "max"}')
    p.add_argument("--num-forward", type=int, default=2048)
    p.add_argument("--num-odin", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-id", type=int, default=10_000)
    p.add_argument("--num-ood", type=int, default=2_000)
    p.add_argument("--num-ood-sets", type=int, default=6)
    p.add_argument("--num-train", type=int, default=50_000)
    p.add_argument("--num-fit", type=int, default=2048, help="images of the captured fits")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    args = p.parse_args(argv)
    load_at_start = os.getloadavg()[0]

    model = create_model(args.model, num_classes=10, rngs=nnx.Rngs(0), **json.loads(args.options))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.num_forward, 32, 32, 3), dtype=np.uint8)
    ds = D.from_arrays(images, name="random", num_classes=0)
    forward = ForwardPass(model)

    def batches(dataset):
        # No larger than the dataset: padding rows would be timed as if they were images.
        size = min(args.batch_size, len(dataset))
        return D.eval_batches(dataset, batch_size=size, process_index=0, process_count=1)

    forward(batches(ds))  # compile
    start = time.perf_counter()
    forward(batches(ds))
    fwd_rate = args.num_forward / (time.perf_counter() - start)
    odin_ds = D.from_arrays(images[: args.num_odin], name="random", num_classes=0)
    odin = lambda: score_images(
        resolve_hparams(["odin"]),
        forward,
        {"random": odin_ds},
        batches=batches,
        std=D.CIFAR10_STD,
        seed=0,
    )
    odin()
    start = time.perf_counter()
    odin()
    odin_rate = args.num_odin / (time.perf_counter() - start)

    kernel = np.asarray(model.head.kernel[...], np.float32)
    bias = np.asarray(model.head.bias[...], np.float32)
    head = Head(kernel, bias)
    train = _synthetic_outputs(rng, args.num_train, kernel, bias, 1.0, True)
    outputs = {"id": _synthetic_outputs(rng, args.num_id, kernel, bias, 1.0, True)}
    for s in range(args.num_ood_sets):
        outputs[f"ood{s}"] = _synthetic_outputs(rng, args.num_ood, kernel, bias, 0.5, False)
    cached = [n for n in available_scores() if isinstance(get_score(n), ArrayScore)]
    swept = [n for n in cached if get_score(n).sweep == "temperature"]
    sweeps = {n: {"temperature": TEMPERATURES} for n in swept}
    hparams = resolve_hparams(cached, sweeps)
    rows = []
    fitted = {}
    for name in cached:
        if fitted_on_outputs(get_score(name)):
            start = time.perf_counter()
            fitted.update(fit_scores({name: hparams[name]}, train))
            rows.append((f"fit {name}", time.perf_counter() - start, None))
    scored = {}
    for name in cached:
        run = lambda name=name: scored.update(
            score_outputs({name: hparams[name]}, outputs, head=head, fitted=fitted)
        )
        first, best = _time(run, args.repeats)
        rows.append((name, first, best))
    total_examples = args.num_id + args.num_ood_sets * args.num_ood
    everything = lambda: score_outputs(hparams, outputs, head=head, fitted=fitted)
    first, best = _time(everything, 1)
    rows.append(("all scores, one call", first, best))
    scored = everything()
    id_scores = scored["id"]
    ood_scores = {k: v for k, v in scored.items() if k != "id"}
    first, best = _time(lambda: evaluate_ood(id_scores, ood_scores, protocol="papers"), 0)
    rows.append((f"metrics, papers' protocol ({len(id_scores)} score keys)", first, None))
    modelled = [n for n in available_scores() if isinstance(get_score(n), ModelScore)]
    model_rows, fit_rows = _model_score_rows(
        forward,
        images[: args.num_odin],
        rng.integers(0, 10, args.num_odin),
        batches,
        resolve_hparams(modelled),
        train,
        min(args.num_fit, args.num_odin),
    )

    lines = [
        "# Evaluation throughput",
        "",
        f"- command: `{shlex.join(['python', 'benchmarks/eval_throughput.py', *sys.argv[1:]])}`",
        f"- date: {datetime.date.today()}, machine: {platform.machine()} "
        f"{platform.processor() or ''}, {jax.device_count()} {jax.default_backend()} device(s), "
        f"jax {jax.__version__}; 1-minute load average {load_at_start:.1f} at the start on "
        f"{os.cpu_count()} cores (a shared machine: higher load, slower numbers)",
        f"- model: {args.model} {args.options}, feature dim {kernel.shape[0]}, batch "
        f"{args.batch_size}",
        "",
        "| pass | images/s |",
        "|---|---|",
        f"| forward (logits + features) | {fwd_rate:.0f} |",
        f"| ODIN (per-example input gradient + second forward) | {odin_rate:.0f} |",
        "",
        f"Scores that run the model, each alone on {args.num_odin} random images (after a "
        "warm-up call); the captured fits stream one capturing pass over labelled random "
        "images:",
        "",
        "| score (kind) | images/s |",
        "|---|---|",
        *(f"| {n} | {'' if r is None else f'{r:.0f}'} |" for n, r in model_rows + fit_rows),
        "",
        f"Scores from cached outputs: {args.num_id} ID + {args.num_ood_sets} x "
        f"{args.num_ood} OOD = {total_examples} examples; fitted on {args.num_train} "
        f"training features; MSP and energy swept over T = {TEMPERATURES} (vmapped).",
        "",
        "| step | first call, s (with compilation) | best later call, s |",
        "|---|---|---|",
    ]
    for name, first, best in rows:
        lines.append(f"| {name} | {first:.2f} | {'' if best is None else f'{best:.2f}'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
