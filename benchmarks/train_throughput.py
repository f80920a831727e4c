"""Train-step throughput, ood_jax (JAX/Flax NNX) against PyTorch on CPU, measured fairly.

    pip install torch==2.13.0   # benchmark only; not an ood_jax dependency
    python benchmarks/train_throughput.py --models resnet18,wrn40_2,resnet9 \\
        --objectives ce,logitnorm,oe,acet --steps 3 --rounds 5

One optimizer step: forward, backward, SGD (momentum 0.9, Nesterov, weight
decay 5e-4), batch 128, float32, 32x32x3 inputs. Objectives: ``ce``;
``logitnorm`` (tau 0.04); ``oe`` (128 images + 256 outliers in one forward
pass, outlier-exposure term weight 0.5: the cost of OE and energy fine-tuning);
``acet`` (128 noise images attacked by ``--acet-steps`` PGD steps in evaluation
mode, then one forward-backward pass over the 256 images).

How it measures:

- each framework runs in its **own process** (a worker), so one framework's
  idle thread pool cannot take CPU from the other; the driver sends the workers
  "run N steps" in turn, alternating them round by round, with a pause between;
- thread counts are pinned (``--threads``: ``torch.set_num_threads`` and
  ``OMP_NUM_THREADS``; XLA's CPU pool has one thread per core);
- the machine must be quiet: the load average and the CPU time taken by other
  processes are recorded before, during (per round) and after. If the 1-minute
  load is 1 or more at the start, or other processes took more than 10% of the
  CPU during the timed rounds, the table is marked INVALID (``--require-quiet``
  refuses to start instead);
- per framework: median images/s over rounds and the spread (min-max); the
  ratio is the median of the per-round ratios (same-run ratio).

The JAX step is ``ood_jax.train.make_train_step`` jitted by
``compile_train_step`` (state donated) on a one-device mesh, with the XLA flag
the experiments use (``experiments/__init__.py``). PyTorch runs the reference
models of ``tests/conformance/torch_models.py`` in NCHW; parameter counts are checked
equal.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine_load import busy_jiffies, cpu_name, others_share

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
MODELS = ("resnet18", "wrn40_2", "resnet9")
OBJECTIVES = ("ce", "logitnorm", "oe", "acet")
OTHERS_LIMIT = 0.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,wrn40_2,resnet9")
    p.add_argument("--objectives", default="ce")
    p.add_argument("--frameworks", default="jax,torch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per framework")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--acet-steps", type=int, default=5, help="PGD steps of the acet objective")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between timed rounds")
    p.add_argument("--xla-flags", default=DEFAULT_XLA_FLAGS)
    p.add_argument("--require-quiet", action="store_true", help="refuse to run on a busy machine")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="first wait up to this many seconds for load < 1 and others' CPU < 10%%",
    )
    p.add_argument("--output", type=Path, default=None, help="also write the table here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--objective", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for field, allowed in (
        ("models", MODELS),
        ("objectives", OBJECTIVES),
        ("frameworks", ("jax", "torch")),
    ):
        values = [v for v in getattr(args, field).split(",") if v]
        unknown = [v for v in values if v not in allowed]
        if unknown:
            p.error(f"--{field}: unknown {unknown}; choose from {', '.join(allowed)}")
        setattr(args, field, values)
    if min(args.batch_size, args.steps, args.rounds, args.threads) < 1:
        p.error("--batch-size, --steps, --rounds and --threads must be >= 1")
    return args


# -- workers: build one step, then answer "run N" with the elapsed seconds --------------------


def jax_step(name: str, objective: str, args: argparse.Namespace):
    import jax
    import numpy as np
    from flax import nnx

    from ood_jax import models, sharding
    from ood_jax import train as train_lib

    options = {"width": 16, "pooling": "max"} if name == "resnet9" else {}
    model = models.create_model(name, num_classes=10, rngs=nnx.Rngs(0), **options)
    tx = train_lib.make_optimizer(0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model_def, state = train_lib.create_train_state(model, tx, seed=0)
    hparams = {
        "ce": {},
        "logitnorm": {"temperature": 0.04},
        "oe": {"weight": 0.5},
        "acet": {"attack_steps": args.acet_steps},
    }[objective]
    registered = {"oe": "outlier_exposure"}.get(objective, objective)
    step = train_lib.make_train_step(model_def, tx, train_lib.bind_objective(registered, **hparams))
    mesh = sharding.make_mesh(1)
    compiled = train_lib.compile_train_step(step, mesh)
    rng = np.random.default_rng(0)
    b = args.batch_size

    def batch(n):
        return sharding.global_batch(
            {
                "image": rng.standard_normal((n, 32, 32, 3), np.float32),
                "label": rng.integers(0, 10, n).astype(np.int32),
                "mask": np.ones(n, bool),
            },
            mesh,
        )

    data = batch(b)
    aux = batch(2 * b) if objective == "oe" else None
    box = {"state": sharding.replicate(state, mesh)}

    def run(n: int) -> None:
        state, metrics = box["state"], None
        for _ in range(n):
            state, metrics = compiled(state, data, aux)
        jax.block_until_ready((state, metrics))
        box["state"] = state

    return run, train_lib.state.count_params(box["state"])


def torch_step(name: str, objective: str, args: argparse.Namespace):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "tests" / "conformance"))
    import torch_models

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torch_models.MODELS[name](num_classes=10)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    b = args.batch_size
    images = torch.randn(b, 3, 32, 32)
    labels = torch.randint(0, 10, (b,))
    outliers = torch.randn(2 * b, 3, 32, 32)

    def attack(noise):
        # ACET's PGD in evaluation mode: k forward-backward passes w.r.t. the input.
        model.eval()
        x = noise.clone()
        for _ in range(args.acet_steps):
            x.requires_grad_(True)
            conf = F.log_softmax(model(x), dim=-1).max(dim=-1).values.sum()
            (grad,) = torch.autograd.grad(conf, x)
            x = (x.detach() + 0.3 / args.acet_steps * grad.sign()).clamp(0, 1)
        model.train()
        return x.detach()

    def loss_fn():
        if objective == "ce":
            return F.cross_entropy(model(images), labels)
        if objective == "logitnorm":
            logits = model(images)
            return F.cross_entropy(
                logits / (0.04 * (logits.norm(dim=-1, keepdim=True) + 1e-7)), labels
            )
        if objective == "oe":
            logits = model(torch.cat([images, outliers]))
            out = logits[b:]
            return F.cross_entropy(logits[:b], labels) + 0.5 * (
                -(out.mean(1) - torch.logsumexp(out, dim=1)).mean()
            )
        noise = attack(torch.rand(b, 3, 32, 32))
        logits = model(torch.cat([images, noise]))
        term = F.log_softmax(logits[b:], dim=-1).max(dim=-1).values.mean()
        return (F.cross_entropy(logits[:b], labels, reduction="sum") + b * term) / (2 * b)

    def run(n: int) -> None:
        model.train()
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            optimizer.step()

    return run, torch_models.num_params(model)


def worker(args: argparse.Namespace) -> None:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if args.worker == "jax":
        os.environ["XLA_FLAGS"] = args.xla_flags
        os.environ["OOD_JAX_DEFAULT_XLA_FLAGS"] = "0"
        sys.path.insert(0, str(ROOT))
    build = jax_step if args.worker == "jax" else torch_step
    start = time.perf_counter()
    run, params = build(args.model, args.objective, args)
    run(1)  # compile (JAX) or allocate (PyTorch)
    setup = time.perf_counter() - start
    run(args.warmup)
    versions = {"jax": _version("jax"), "torch": _version("torch")}[args.worker]
    print(
        json.dumps({"ready": True, "params": params, "setup_s": setup, "version": versions}),
        flush=True,
    )
    for line in sys.stdin:
        if line.strip() == "quit":
            return
        n = int(line.split()[1])
        cpu0, t0 = time.process_time(), time.perf_counter()
        run(n)
        elapsed = time.perf_counter() - t0
        print(json.dumps({"seconds": elapsed, "cpu_s": time.process_time() - cpu0}), flush=True)


def _version(module: str) -> str:
    return __import__(module).__version__


# -- driver ---------------------------------------------------------------------------------


class Worker:
    def __init__(self, framework: str, model: str, objective: str, args: argparse.Namespace):
        argv = [
            sys.executable,
            __file__,
            f"--worker={framework}",
            f"--model={model}",
            f"--objective={objective}",
            f"--threads={args.threads}",
            f"--batch-size={args.batch_size}",
            f"--warmup={args.warmup}",
            f"--acet-steps={args.acet_steps}",
            f"--xla-flags={args.xla_flags}",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[2]} died (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, steps: int) -> dict:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait()


def measure(model: str, objective: str, args: argparse.Namespace) -> dict:
    workers = {fw: Worker(fw, model, objective, args) for fw in args.frameworks}
    try:
        params = {fw: w.info["params"] for fw, w in workers.items()}
        if len(set(params.values())) > 1:
            raise AssertionError(f"{model}: parameter counts differ: {params}")
        rates = {fw: [] for fw in workers}
        others = []
        for _ in range(args.rounds):
            for fw, w in workers.items():
                time.sleep(args.pause)
                b0, t0 = busy_jiffies()
                result = w.run(args.steps)
                b1, t1 = busy_jiffies()
                hz = os.sysconf("SC_CLK_TCK")
                # The machine's busy CPU during the round minus the worker's own.
                other = (b1 - b0) / hz - result["cpu_s"]
                others.append(max(other, 0.0) / max((t1 - t0) / hz, 1e-9))
                images = args.steps * args.batch_size
                rates[fw].append(images / result["seconds"])
    finally:
        for w in workers.values():
            w.close()
    row = {
        "model": model,
        "objective": objective,
        "params": next(iter(params.values())),
        "others": statistics.median(others),
        "versions": {fw: w.info["version"] for fw, w in workers.items()},
    }
    for fw, values in rates.items():
        row[fw] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "values": values,
        }
    if len(rates) == 2:
        row["ratio"] = statistics.median(
            j / t for j, t in zip(rates["jax"], rates["torch"], strict=True)
        )
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], args: argparse.Namespace, loads: dict, argv: list[str]) -> str:
    valid = loads["before"] < 1.0 and all(r["others"] <= OTHERS_LIMIT for r in rows)
    versions = {k: v for r in rows for k, v in r["versions"].items()}
    lines = [
        "" if valid else "**INVALID: the machine was not quiet (see load and others' CPU).**",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {cpu_name()}, {os.cpu_count()} CPUs; threads {args.threads}",
        f"- load average (1 min): {loads['before']:.2f} before, {loads['after']:.2f} after; "
        f"other processes' CPU share before start: {100 * loads['others_before']:.1f}%",
        "- "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; XLA_FLAGS `{args.xla_flags}`",
        f"- command: `python benchmarks/train_throughput.py {' '.join(argv)}`",
        f"- batch {args.batch_size}, float32, SGD momentum 0.9 Nesterov, wd 5e-4; "
        f"{args.rounds} alternating rounds x {args.steps} steps per framework, each in its "
        f"own process; acet: {args.acet_steps} PGD steps",
        "",
        "| model | objective | params | JAX img/s (min-max) | PyTorch img/s (min-max) "
        "| JAX / PyTorch | others' CPU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = []
        for fw in ("jax", "torch"):
            c = r.get(fw)
            cells.append(f"{c['median']:.1f} ({c['min']:.1f}-{c['max']:.1f})" if c else "-")
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        lines.append(
            f"| {r['model']} | {r['objective']} | {r['params']:,} | {cells[0]} | "
            f"{cells[1]} | {ratio} | {100 * r['others']:.1f}% |"
        )
    return "\n".join(lines).lstrip("\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    deadline = time.monotonic() + args.wait_quiet
    while True:
        loads = {"before": os.getloadavg()[0], "others_before": others_share()}
        quiet = loads["before"] < 1.0 and loads["others_before"] <= OTHERS_LIMIT
        if quiet or time.monotonic() >= deadline:
            break
        time.sleep(10)
    if args.require_quiet and not quiet:
        print(
            f"error: the machine is busy (load {loads['before']:.2f}, other processes "
            f"{100 * loads['others_before']:.0f}% of the CPU); stop them and rerun.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    rows = [measure(m, o, args) for m in args.models for o in args.objectives]
    loads["after"] = os.getloadavg()[0]
    text = table(rows, args, loads, argv)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
