"""Cost of an ACET train step against a CE step on the same batch.

ACET with ``k`` attack steps adds, per train step, ``k`` forward+backward passes
and one forward pass over the noise (as many images as the batch), then trains
on batch + noise in one pass; so it should cost about ``k + 2`` CE steps (CE:
one forward+backward over the batch). This script times the jitted train step
(``ood_jax.train.make_train_step``, the objective registered as ``ce``,
``ceda`` or ``acet``) on the ``cpu`` preset's model and prints the ratio to CE
with the ``k + 2`` budget, medians and spreads over rounds::

    python benchmarks/acet_cost.py --steps 0,1,2,5 --rounds 5

Run it on a quiet machine (nothing else running): it records the load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot,reduce")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ood_jax.models import create_model  # noqa: E402
from ood_jax.train import (  # noqa: E402
    bind_objective,
    create_train_state,
    make_optimizer,
    make_train_step,  # noqa: E402
)


def time_step(objective, hparams, *, model_name, options, batch_size, rounds, reps):
    model = create_model(model_name, num_classes=10, rngs=nnx.Rngs(0), **options)
    tx = make_optimizer(0.01, momentum=0.9, weight_decay=5e-4)
    model_def, state = create_train_state(model, tx, seed=0)
    step = jax.jit(make_train_step(model_def, tx, bind_objective(objective, **hparams)))
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(batch_size, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32),
        "mask": jnp.ones(batch_size, bool),
    }
    state, metrics = step(state, batch)  # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - start) / reps)
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", default="0,1,2,5", help="ACET attack steps (0 = CEDA)")
    p.add_argument("--model", default="resnet9")
    p.add_argument("--options", default='{"width": 16, "pooling": "max"}')
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="steps per timed round")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    load = os.getloadavg()
    common = {
        "model_name": args.model,
        "options": json.loads(args.options),
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "reps": args.reps,
    }
    runs = [("CE", 0, time_step("ce", {}, **common))]
    for k in (int(s) for s in args.steps.split(",")):
        name, hparams = ("ceda", {}) if k == 0 else ("acet", {"attack_steps": k})
        runs.append(
            (name.upper() if k == 0 else f"ACET k={k}", k, time_step(name, hparams, **common))
        )
    ce = statistics.median(runs[0][2])
    lines = [
        "# ACET step cost",
        "",
        f"- command: `{shlex.join(['python', 'benchmarks/acet_cost.py', *sys.argv[1:]])}`",
        f"- date: {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}",
        f"- load average before: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        f"(after: {os.getloadavg()[0]:.2f})",
        f"- model {args.model} {args.options}, batch {args.batch_size} (+ {args.batch_size} noise "
        f"for CEDA/ACET), float32; median of {args.rounds} rounds of {args.reps} steps",
        "",
        "| step | ms/step (median) | spread (min-max) | x CE step | budget k + 2 |",
        "|---|---|---|---|---|",
    ]
    for name, k, times in runs:
        med = statistics.median(times)
        budget = "" if name == "CE" else f"{k + 2}"
        lines.append(
            f"| {name} | {1e3 * med:.1f} | {1e3 * min(times):.1f}-{1e3 * max(times):.1f} "
            f"| {med / ce:.2f} | {budget} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
