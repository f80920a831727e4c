"""Train-step throughput: ood_jax (JAX/Flax NNX) vs PyTorch on CPU, same run.

Times one optimizer step (forward, backward, SGD momentum 0.9 Nesterov with
weight decay 5e-4, cross-entropy or LogitNorm loss) for WRN-40-2 and ResNet-18
at batch 128, float32, and prints images/s (median over rounds after
compilation/warm-up) with the ratio JAX / PyTorch. JAX and PyTorch rounds are
interleaved so that load from other processes hits both alike.

    pip install torch==2.13.0   # benchmark only; not an ood_jax dependency
    python benchmarks/train_throughput.py --models wrn40_2,resnet18 --steps 2 --rounds 3

The JAX step is ``ood_jax.train.make_train_step`` jitted by
``ood_jax.train.compile_train_step`` (state donated) on a one-device mesh.
``--xla-flags`` replaces the tuned default XLA flags (see
benchmarks/results/train_throughput.md for what each flag gave).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Tuned on the 2-core CPU benchmark machine; see the "attempts" table in
# benchmarks/results/train_throughput.md.
# YNNPACK fusions for dots, elementwise ops and reductions: XLA:CPU then runs the
# convolution weight gradients (the slowest part of the step) about twice as fast.
DEFAULT_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="wrn40_2,resnet18", help="comma-separated")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved JAX/torch rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads")
    parser.add_argument("--loss", choices=("ce", "logitnorm"), default="ce")
    parser.add_argument("--frameworks", default="jax,torch", help="jax and/or torch")
    parser.add_argument("--xla-flags", default=None, help="XLA_FLAGS for this run")
    parser.add_argument("--output", type=Path, default=None, help="write the table here")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.frameworks = [f for f in args.frameworks.split(",") if f]
    for name in args.models:
        if name not in ("wrn40_2", "resnet18"):
            parser.error(f"--models: unknown model {name!r}; choose from wrn40_2, resnet18")
    for name in args.frameworks:
        if name not in ("jax", "torch"):
            parser.error(f"--frameworks: unknown framework {name!r}; choose from jax, torch")
    if min(args.batch_size, args.steps, args.rounds, args.threads) < 1:
        parser.error("--batch-size, --steps, --rounds and --threads must be >= 1")
    return args


def configure_threads(args: argparse.Namespace) -> None:
    """Set thread counts and XLA flags; must run before jax/torch are imported."""
    flags = DEFAULT_XLA_FLAGS if args.xla_flags is None else args.xla_flags
    os.environ["XLA_FLAGS"] = " ".join(
        [f for f in (os.environ.get("XLA_FLAGS", ""), flags) if f]
    ).strip()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# -- JAX ------------------------------------------------------------------------------------


def build_jax_step(name: str, batch_size: int, loss: str):
    """Return ``run(n)`` that performs ``n`` train steps and blocks on the result."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ood_jax import models, sharding
    from ood_jax import train as train_lib

    model = models.create_model(name, num_classes=10, rngs=nnx.Rngs(0))
    tx = train_lib.make_optimizer(0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model_def, state = train_lib.create_train_state(model, tx, seed=0)
    objective = {"ce": ("ce", {}), "logitnorm": ("logitnorm", {"temperature": 0.04})}[loss]
    step = train_lib.make_train_step(
        model_def, tx, train_lib.bind_objective(objective[0], **objective[1])
    )
    mesh = sharding.make_mesh(1)
    compiled = train_lib.compile_train_step(step, mesh)
    rng = np.random.default_rng(0)
    batch = sharding.global_batch(
        {
            "image": rng.standard_normal((batch_size, 32, 32, 3), np.float32),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
            "mask": np.ones(batch_size, bool),
        },
        mesh,
    )
    box = {"state": sharding.replicate(state, mesh)}

    def run(n: int) -> None:
        state, metrics = box["state"], None
        for _ in range(n):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        box["state"] = state
        if not bool(jnp.isfinite(metrics["loss"])):
            raise FloatingPointError(f"JAX {name}: non-finite loss")

    return run, train_lib.state.count_params(box["state"])


# -- PyTorch --------------------------------------------------------------------------------


def build_torch_step(name: str, batch_size: int, loss: str, threads: int):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch_models

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch_models.MODELS[name](num_classes=10)
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    images = torch.randn(batch_size, 3, 32, 32)  # PyTorch's native NCHW
    labels = torch.randint(0, 10, (batch_size,))

    def compute_loss(logits):
        if loss == "logitnorm":
            logits = logits / (0.04 * (logits.norm(dim=-1, keepdim=True) + 1e-7))
        return F.cross_entropy(logits, labels)

    def run(n: int) -> None:
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            value = compute_loss(model(images))
            value.backward()
            optimizer.step()
        if not torch.isfinite(value):
            raise FloatingPointError(f"torch {name}: non-finite loss")

    return run, torch_models.num_params(model)


# -- driver ---------------------------------------------------------------------------------


def timed(run, steps: int) -> float:
    start = time.perf_counter()
    run(steps)
    return time.perf_counter() - start


def benchmark_model(name: str, args: argparse.Namespace) -> dict:
    runners, counts, compile_s = {}, {}, {}
    if "jax" in args.frameworks:
        start = time.perf_counter()
        runners["jax"], counts["jax"] = build_jax_step(name, args.batch_size, args.loss)
        runners["jax"](1)  # compile
        compile_s["jax"] = time.perf_counter() - start
    if "torch" in args.frameworks:
        runners["torch"], counts["torch"] = build_torch_step(
            name, args.batch_size, args.loss, args.threads
        )
    if len(set(counts.values())) > 1:
        raise AssertionError(f"{name}: parameter counts differ between frameworks: {counts}")
    for run in runners.values():
        run(args.warmup)
    rates: dict[str, list[float]] = {fw: [] for fw in runners}
    for _ in range(args.rounds):
        for fw, run in runners.items():
            rates[fw].append(args.steps * args.batch_size / timed(run, args.steps))
    result = {"model": name, "params": next(iter(counts.values())), "compile_s": compile_s}
    for fw, values in rates.items():
        result[fw] = statistics.median(values)
        print(f"{name} {fw}: " + " ".join(f"{v:.1f}" for v in values) + " img/s", flush=True)
    if len(rates) == 2:
        # Rounds are interleaved, so the ratio within a round cancels most of the
        # load from other processes; report its median too.
        result["paired"] = statistics.median(
            j / t for j, t in zip(rates["jax"], rates["torch"], strict=True)
        )
    return result


def format_table(results: list[dict], args: argparse.Namespace) -> str:
    import jax

    lines = [
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.node()} {_cpu_name()}, {os.cpu_count()} CPUs, "
        f"threads {args.threads}",
        f"- jax {jax.__version__}" + (f", torch {_torch_version()}" if _has("torch") else ""),
        f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`",
        f"- command: `python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}`",
        f"- batch {args.batch_size}, float32, loss {args.loss}, SGD momentum 0.9 Nesterov, "
        f"wd 5e-4; median of {args.rounds} rounds x {args.steps} steps",
        "",
        "| model | params | JAX img/s | PyTorch img/s | JAX / PyTorch | per-round ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        jax_rate, torch_rate = r.get("jax"), r.get("torch")
        ratio = f"{jax_rate / torch_rate:.2f}x" if jax_rate and torch_rate else "-"
        paired = f"{r['paired']:.2f}x" if "paired" in r else "-"
        lines.append(
            f"| {r['model']} | {r['params']:,} | {_fmt(jax_rate)} | {_fmt(torch_rate)} "
            f"| {ratio} | {paired} |"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _has(module: str) -> bool:
    return module in sys.modules


def _torch_version() -> str:
    return sys.modules["torch"].__version__


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_threads(args)
    # Runnable from a checkout without installing ood_jax.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    results = [benchmark_model(name, args) for name in args.models]
    table = format_table(results, args)
    print(table)
    if args.output:
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
