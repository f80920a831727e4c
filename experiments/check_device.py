"""The first command on a new machine: does the install work, and how fast does each method train?

    python -m experiments.check_device                     # paper presets on an accelerator
    python -m experiments.check_device --preset smoke      # a minute on a CPU (what CI runs)
    python -m experiments.check_device --methods ce,acet --steps 50 --out runs/check_device

It reports JAX's backend, devices and versions; then, for each method, builds the
runner's own train step (``experiments.steps``, the preset's model, batch, outliers and
attack) over all local devices, runs it on random images for ``--steps`` steps after
one compiling step, and prints the images/s beside the compile-only plan's roofline
estimate for this chip (``results/plans/``, scaled to this machine's device count);
then it compiles and runs the evaluation's forward pass, ODIN and one chunk of the
adversarial-noise attack. What goes wrong is one line saying what to try (no
accelerator found, a batch that does not fit, a compile failure). The report goes to
``<out>/check_device.md`` and ``.json``, rewritten after each method, so a check stopped
by a time limit keeps what it measured. The numbers are a check of this install, not
a benchmark: random images, a few dozen steps, no input pipeline.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import experiments
from experiments import cli, compile_cache, methods
from experiments.run_config import eval_batch_size, eval_spec, model_identity, parse, resolve
from experiments.steps import make_run_optimizer, make_run_steps
from ood_jax import sharding
from ood_jax.evaluate import ForwardPass
from ood_jax.evaluate.adversarial import CHUNK_STEPS, noise_attack
from ood_jax.evaluate.scoring import image_score_fn
from ood_jax.models import build_model
from ood_jax.train import create_train_state, get_objective

IMAGE_SHAPE = (32, 32, 3)
# Device kinds (jax's device_kind, lower case) -> the plans' chip names.
CHIPS = {"h100": "h100", "a100": "a100", "v6 lite": "v6e", "v5 lite": "v5e", "v5e": "v5e"}
PLANS = ("tpu_plan.json", "gpu_plan.json")
VERSIONED = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "libtpu",
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
)


def environment() -> dict[str, Any]:
    """JAX's backend, the devices and the installed versions."""
    devices = jax.devices()
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "backend": jax.default_backend(),
        "devices": len(devices),
        "local_devices": jax.local_device_count(),
        "processes": jax.process_count(),
        "device_kind": devices[0].device_kind,
        "versions": versions,
    }


def chip_of(device_kind: str) -> str | None:
    """The plans' chip name of a device kind ("NVIDIA H100 80GB HBM3" -> "h100")."""
    kind = device_kind.lower()
    return next((chip for key, chip in CHIPS.items() if key in kind), None)


def planned_images_per_s(
    method: str,
    preset: str,
    chip: str | None,
    precision: str,
    devices: int,
    plans: os.PathLike | str = experiments.CHECKOUT / "results" / "plans",
) -> dict | None:
    """The plan's roofline images/s for ``method``'s ``preset`` on ``chip``, scaled from
    the plan row's device count to ``devices``; None without a row (or a checkout)."""
    if chip is None:
        return None
    for name in PLANS:
        path = Path(plans) / name
        if not path.is_file():
            continue
        for row in json.loads(path.read_text())["rows"]:
            topology = str(row.get("topology", ""))
            if (
                row.get("method") == method
                and row.get("preset") == preset
                and row.get("precision") == precision
                and topology.split(":")[0] == chip
                and "estimate" in row
            ):
                scaled = row["estimate"]["images_per_s"] * devices / row["devices"]
                return {"images_per_s": scaled, "row": f"{topology}, {row['devices']} devices"}
    return None


def diagnose(err: BaseException) -> str:
    """One line: what went wrong and what to try."""
    text = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    lowered = text.lower()
    if "resource_exhausted" in lowered or "out of memory" in lowered:
        return (
            f"out of memory ({text[:200]}): lower --config.train.batch_size, or use bfloat16 "
            "(--config.model.mixed_precision=true)"
        )
    if "tile sizes" in lowered or "triton" in lowered:
        return (
            f"GPU compile failure ({text[:200]}): try XLA_FLAGS=--xla_gpu_enable_triton_gemm=false "
            "and report it"
        )
    if "compil" in lowered:
        return (
            f"compile failure ({text[:200]}): run with OOD_JAX_DEBUG=1 for the trace and report it"
        )
    return text[:300]


def _timed(fn, steps: int) -> tuple[float, float]:
    """``(first call's seconds, median seconds of the next ``steps`` calls)``."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def _config(method: str, preset: str, overrides: Sequence[str]):
    finetune = methods.get(method).fine_tuning != "none"
    return resolve(parse(methods.get_config(method, preset, finetune=finetune), overrides)).config


def check_training(method: str, preset: str, steps: int, overrides: Sequence[str]) -> dict:
    """The method's train step at the preset's real batch on random images: compile
    seconds, step seconds and images/s."""
    config = _config(method, preset, overrides)
    mesh = sharding.make_mesh()
    batch_size = config.train.batch_size
    optimizer = make_run_optimizer(config, 1000)
    model = build_model(model_identity(config, 10), 0)
    model_def, state = create_train_state(model, optimizer.tx, seed=0)
    train_step, _ = make_run_steps(config, model_def, optimizer, mesh)
    rng = np.random.default_rng(0)

    def batch(n, labels=True):
        out = {
            "image": rng.normal(size=(n, *IMAGE_SHAPE)).astype(np.float32),
            "mask": np.ones(n, bool),
        }
        if labels:
            out["label"] = rng.integers(0, 10, n).astype(np.int32)
        return sharding.global_batch(out, mesh)

    images = batch(batch_size)
    aux = None
    if get_objective(config.objective.name).uses_outliers:
        aux = batch(batch_size * config.data.outliers.ratio, labels=False)
    box = {"state": sharding.replicate(state, mesh)}

    def one_step():
        box["state"], metrics = train_step(box["state"], images, aux)
        return metrics

    first, step_s = _timed(one_step, steps)
    return {
        "batch": batch_size,
        "model": config.model.name,
        "compile_s": first - step_s,
        "step_s": step_s,
        "images_per_s": batch_size / step_s,
    }


def check_evaluation(method: str, preset: str, overrides: Sequence[str]) -> dict:
    """The evaluation's forward pass, ODIN and one attack chunk on random images:
    seconds of the first (compiling) and of a later call each."""
    config = _config(method, preset, overrides)
    mesh = sharding.make_mesh()
    batch = eval_batch_size(config, mesh)
    spec = eval_spec(config, batch_size=batch)
    forward = ForwardPass(build_model(model_identity(config, 10), 0), mesh=mesh)
    images = jax.device_put(
        jnp.asarray(np.random.default_rng(1).normal(size=(batch, *IMAGE_SHAPE)), jnp.float32),
        forward.batch_sharding,
    )
    odin = forward.jitted_map(image_score_fn("odin", spec.score_hparams["odin"], std=spec.std))
    attack = noise_attack(forward, max(spec.adversarial_noise, 1), **spec.attack_options())
    chunk = attack.advance[min(CHUNK_STEPS, spec.attack_steps)]
    noise = jax.device_put(jnp.full((attack.batch, *IMAGE_SHAPE), 0.5), forward.batch_sharding)
    pgd = attack.start.jitted(forward.state, noise, jax.random.key_data(jax.random.key(0)))
    programs = {
        "forward": lambda: forward.jitted(forward.state, images),
        "odin": lambda: odin(forward.state, images),
        "attack chunk": lambda: chunk.jitted(forward.state, pgd),
    }
    out = {}
    for name, fn in programs.items():
        first, again = _timed(fn, 2)
        out[name] = {"first_s": first, "call_s": again}
    return {"batch": batch, "attack_batch": attack.batch, "programs": out}


def markdown(report: dict) -> str:
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [
        "# Device check",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}",
        f"- backend: {env['backend']}, {env['devices']} x {env['device_kind']} "
        f"({env['processes']} process(es)); {versions}",
        f"- preset: {report['preset']}, {report['steps']} timed steps after one compiling step, "
        "random images (no input pipeline): a check of the install, not a benchmark",
    ]
    lines += [f"- **{w}**" for w in report["warnings"]]
    lines += [
        "",
        "| method | model | batch | compile s | step ms | images/s | plan's estimate images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in report["training"].items():
        if "error" in row:
            lines.append(f"| {method} | | | | | | **{row['error']}** |")
            continue
        plan = row.get("plan")
        estimate = f"{plan['images_per_s']:,.0f} ({plan['row']})" if plan else "no plan row"
        lines.append(
            f"| {method} | {row['model']} | {row['batch']} | {row['compile_s']:.1f} | "
            f"{1000 * row['step_s']:.1f} | {row['images_per_s']:,.0f} | {estimate} |"
        )
    evaluation = report["evaluation"]
    lines += ["", f"Evaluation ({report['eval_method']}'s preset model):", ""]
    if evaluation is None:
        lines.append("- not run: the check stopped before it")
    elif "error" in evaluation:
        lines.append(f"- **{evaluation['error']}**")
    else:
        for name, cell in evaluation["programs"].items():
            lines.append(
                f"- {name}: first call {cell['first_s']:.1f} s (compiles), then "
                f"{1000 * cell['call_s']:.1f} ms"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    def run(argv):
        parser = argparse.ArgumentParser(
            prog="python -m experiments.check_device", description=__doc__.split("\n")[0]
        )
        parser.add_argument(
            "--preset", default=None, help="paper (default on an accelerator), cpu, smoke"
        )
        parser.add_argument("--methods", default="all", help="all, or e.g. ce,acet")
        parser.add_argument("--steps", type=int, default=30, help="timed steps per method")
        parser.add_argument("--out", default=os.path.join("runs", "check_device"))
        args, overrides = parser.parse_known_args(argv)
        cli.split_overrides(overrides)  # --config.<field>=<value> only
        return check(args, overrides, argv)

    return cli.run_main(run, argv)


def save(report: dict, out: str) -> str:
    """Writes ``<out>/check_device.json`` and ``.md``; returns the Markdown."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "check_device.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    text = markdown(report)
    with open(os.path.join(out, "check_device.md"), "w") as f:
        f.write(text)
    return text


def check(args: argparse.Namespace, overrides: Sequence[str], argv) -> dict:
    env = environment()
    warnings = []
    preset = args.preset or ("smoke" if env["backend"] == "cpu" else "paper")
    if env["backend"] == "cpu":
        warnings.append(
            "no accelerator found: JAX runs on the CPU. For a GPU install "
            '"jax[cuda12]==0.10.2", for a TPU VM "jax[tpu]==0.10.2" (then run this again)'
        )
    chosen = (
        methods.METHODS
        if args.methods == "all"
        else [m for m in (s.strip() for s in args.methods.split(",")) if m]
    )
    unknown = [m for m in chosen if m not in methods.METHODS]
    if unknown or args.steps < 1:
        raise cli.UsageError(
            f"--methods {','.join(unknown)}: choose from {','.join(methods.METHODS)}"
            if unknown
            else f"--steps must be >= 1, got {args.steps}."
        )
    cache = compile_cache.use()
    chip = chip_of(env["device_kind"])
    precision = (
        "bfloat16" if any("mixed_precision=true" in o.lower() for o in overrides) else "float32"
    )
    training = {}
    eval_method = chosen[0]
    report = {
        "command": "python -m experiments.check_device " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "environment": env,
        "preset": preset,
        "steps": args.steps,
        "compilation_cache": cache,
        "warnings": warnings,
        "training": training,
        "eval_method": eval_method,
        "evaluation": None,
    }
    for method in chosen:
        try:
            row = check_training(method, preset, args.steps, overrides)
            row["plan"] = planned_images_per_s(method, preset, chip, precision, env["devices"])
        except cli.UsageError:
            raise
        except Exception as err:  # each method's failure is its own row
            row = {"error": diagnose(err)}
        training[method] = row
        done = row["error"] if "error" in row else f"{row['images_per_s']:,.0f} images/s"
        print(f"{method}: {done}", flush=True)
        save(report, args.out)  # a check stopped by a time limit keeps what it measured
    try:
        report["evaluation"] = check_evaluation(eval_method, preset, overrides)
    except cli.UsageError:
        raise
    except Exception as err:
        report["evaluation"] = {"error": diagnose(err)}
    print(save(report, args.out))
    for line in warnings + [f"{m}: {r['error']}" for m, r in training.items() if "error" in r]:
        print(f"warning: {line}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
