"""Images/s of the CIFAR-10 train input: the host pipeline alone, and training end to end.

Usage (from the repository root):
  python -m benchmarks.input_pipeline [--passes 7] [--steps 100] [--output FILE.md]
  python -m benchmarks.input_pipeline --mode train [--runs 5] [--warmup 20] [--steps 40] \
      [--output FILE.md]

``--mode pipeline`` (the default) times the host pipeline alone on the offline data
of ../shared/data: the one-time JPEG decode (no cache) and the cached load, then the
median over ``--passes`` timed passes of ``--steps`` batches for each configuration
(the first batch of each pass, which starts the prefetch thread, is not timed).
``prefetch=0`` is the raw cost of a batch in the caller's thread; ``prefetch=2`` is
the rate a consumer that does nothing else sees (in training the thread overlaps with
the step).

``--mode train`` times training end to end: the ``cpu`` preset's CE run
(``--method``, ``--preset``) with the host pipeline (``config.data.on_device=false``)
against the data on the device (``true``): the runner's own data path, step and loop
(:func:`ood_jax.train.fit` with ``experiments.train``'s data, as ``python -m
experiments.cifar10_ce --preset cpu --data local`` runs them), without checkpoints or
evaluation. Each measurement is a process of its own (loading the data, compiling,
``--warmup`` steps, then ``--steps`` timed steps between two host synchronizations),
``--runs`` of each, alternating host / device and which goes first; median and
min-max images/s. Run it on a quiet machine: the load average is recorded at the start
and the CPU share of other processes before every run; a table measured with a 1-minute
load of 1 or more, or others above 10%, says not to cite it.

Each mode writes its own section of ``--output`` and keeps the other's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ood_jax import data

ROOT = Path(__file__).resolve().parents[1]
# The heading of --mode train's section of the output file.
TRAIN_HEADING = "## Training end to end: host pipeline against data on the device"
# --mode train: the CPU share other processes may take before a run (a quiet machine).
OTHERS_LIMIT = 0.10


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
    parser.add_argument("--mode", choices=("pipeline", "train"), default="pipeline")
    parser.add_argument("--passes", type=int, default=7, help="pipeline: timed passes")
    parser.add_argument(
        "--steps", type=int, default=None, help="batches a pass (100) / timed steps a run (40)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="default: $OOD_JAX_DATA_DIR or ../shared/data"
    )
    parser.add_argument("--output", default=None, help="also write the table to this file")
    parser.add_argument("--runs", type=int, default=5, help="train: runs of each path")
    parser.add_argument("--warmup", type=int, default=20, help="train: untimed steps first")
    parser.add_argument("--method", default="ce", help="train: the method")
    parser.add_argument("--preset", default="cpu", help="train: the preset")
    parser.add_argument("--child", choices=("host", "device"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    if args.child:
        return json.dumps(child(args))
    if args.mode == "train":
        text = train_table(args, argv)
        print(text)
        if args.output:
            write_section(Path(args.output), text, TRAIN_HEADING)
        return text
    return pipeline_table(args, argv)


def pipeline_table(args: argparse.Namespace, argv: list[str]) -> str:
    """The host pipeline alone (``--mode pipeline``)."""
    args.steps = 100 if args.steps is None else args.steps
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

    command = "python -m benchmarks.input_pipeline " + " ".join(argv)
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
        write_section(Path(args.output), table, "# ")
    return table


def write_section(path: Path, text: str, heading: str) -> None:
    """Writes ``text`` into ``path`` in place of the section that starts with ``heading``
    (the pipeline table: the file's start, up to the train section), keeping the rest."""
    old = path.read_text() if path.exists() else ""
    at = old.find("\n" + TRAIN_HEADING)
    pipeline, train = (old, "") if at < 0 else (old[: at + 1], old[at + 1 :])
    if heading == TRAIN_HEADING:
        train = text
    else:
        pipeline = text
    parts = [part.strip("\n") for part in (pipeline, train) if part.strip()]
    path.write_text("\n\n".join(parts) + "\n")


def child(args: argparse.Namespace) -> dict:
    """One measurement, in this process: ``--child host|device`` (``--mode train``)."""
    import jax

    from experiments import methods
    from experiments.run_config import parse, resolve
    from experiments.steps import make_run_steps
    from experiments.train import initial_state, load_inputs, place_on_device, train_data
    from ood_jax.train.loop import fit

    config = methods.get_config(args.method, args.preset)
    overrides = [
        "--config.data.source=local",
        f"--config.data.on_device={args.child == 'device'}",
        f"--config.train.log_every={args.warmup}",
        "--config.train.progress=false",
    ]
    settings = resolve(parse(config, overrides))
    config = settings.config
    inputs = load_inputs(config)
    spec = data.get_dataset_spec(config.data.dataset)
    identity = settings.model_identity(spec.num_classes or inputs.train_ds.num_classes)
    model_def, state, optimizer = initial_state(config, inputs, identity)
    device_data = place_on_device(config, inputs)
    train_step, _ = make_run_steps(
        config, model_def, optimizer, inputs.mesh, device_data=device_data
    )
    num_steps = args.warmup + args.steps
    if num_steps > inputs.steps_per_epoch:
        raise SystemExit(f"--warmup + --steps must be at most {inputs.steps_per_epoch} (an epoch)")
    # fit synchronizes with the device every log_every (= warmup) steps and at the last
    # step, before calling on_step: the clock reads finished steps at both ends.
    clock: dict[int, float] = {}

    def on_step(done: int) -> None:
        if done in (args.warmup, num_steps):
            clock[done] = time.perf_counter()

    with tempfile.TemporaryDirectory() as workdir:
        fit(
            state,
            train_step=train_step,
            mesh=inputs.mesh,
            data=train_data(config, inputs),
            num_steps=num_steps,
            workdir=workdir,
            log_every=args.warmup,
            progress=False,
            on_step=on_step,
            tensorboard=False,
        )
    elapsed = clock[num_steps] - clock[args.warmup]
    return {
        "images_per_s": args.steps * config.train.batch_size / elapsed,
        "batch_size": config.train.batch_size,
        "device": f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
        "versions": f"jax {jax.__version__}",
    }


def measure(path: str, args: argparse.Namespace, others_share) -> dict:
    """One ``--child`` process: its result, and the CPU share other processes took in
    the 2 s before it started (the machine otherwise idle: no run in flight)."""
    others = others_share(2.0)
    argv = [sys.executable, "-m", "benchmarks.input_pipeline", "--child", path]
    argv += ["--method", args.method, "--preset", args.preset]
    argv += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(path, f"{result['images_per_s']:,.0f} images/s, others {others:.0%}", flush=True)
    return {**result, "others": others}


def train_table(args: argparse.Namespace, argv: list[str]) -> str:
    """Training end to end, host pipeline against data on the device (``--mode train``)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine_load import cpu_name, others_share

    args.steps = 40 if args.steps is None else args.steps
    if min(args.runs, args.steps, args.warmup) < 1:
        raise SystemExit("--runs, --steps and --warmup must be >= 1")
    import experiments  # noqa: F401  (the commands' defaults: the offline data folder, XLA flag)

    if args.data_dir:
        os.environ["OOD_JAX_DATA_DIR"] = args.data_dir  # the runs read it too
    # The decoded-image cache filled first, so that no run pays for decoding the JPEGs.
    data.load_dataset("cifar10_jpeg", "train")
    data.load_dataset("cifar10_jpeg", "test")
    load, others = os.getloadavg(), others_share()
    results: dict[str, list[dict]] = {"host": [], "device": []}
    for run in range(args.runs):
        order = ("host", "device") if run % 2 == 0 else ("device", "host")
        for path in order:
            results[path].append(measure(path, args, others_share))
    rates = {k: [r["images_per_s"] for r in v] for k, v in results.items()}
    ratios = [d / h for h, d in zip(rates["host"], rates["device"], strict=True)]
    shares = [r["others"] for v in results.values() for r in v]
    first = results["host"][0]
    command = "python -m benchmarks.input_pipeline " + " ".join(argv)
    quiet = load[0] < 1.0 and max(others, *shares) <= OTHERS_LIMIT
    rows = [
        ("host pipeline (`--config.data.on_device=false`)", rates["host"]),
        ("data on the device (`--config.data.on_device=true`)", rates["device"]),
    ]
    lines = [
        TRAIN_HEADING,
        "",
        f"- command: `{command.strip()}`",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores; devices: {first['device']}; "
        f"{first['versions']}, numpy {np.__version__}, Python {platform.python_version()}",
        f"- load average before: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 "
        f"min), other processes' share of the CPU {others:.0%}; in the 2 s before each "
        f"run: {min(shares):.0%}-{max(shares):.0%}"
        + ("" if quiet else " (**not a quiet machine: do not cite these numbers**)"),
        f"- `{args.method}`, preset `{args.preset}` (batch {first['batch_size']}), offline "
        f"CIFAR-10 (JPEG): each run a process of its own, {args.warmup} untimed steps (the "
        f"first compiles), then {args.steps} timed steps; {args.runs} runs of each path, "
        "alternating which goes first; median and min-max",
        "",
        "| input | train images/s (median) | min | max |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {what} | {statistics.median(v):,.0f} | {min(v):,.0f} | {max(v):,.0f} |"
            for what, v in rows
        ),
        "",
        f"Data on the device / host pipeline, per run: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    out = main()
    if "--child" in sys.argv:
        print(out)
