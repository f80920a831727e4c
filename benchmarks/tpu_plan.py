"""Compile-only TPU plans of a preset's real steps: does it fit, shard, and how long would it take?

    pip install "jax[tpu]==0.10.2"        # or: pip install -e ".[tpu]" (adds libtpu)
    python -m benchmarks.tpu_plan --method logitnorm --preset paper --topology v5e:4x4
    python -m benchmarks.tpu_plan --all --output benchmarks/results/tpu_plan
    python -m benchmarks.tpu_plan --eval --method logitnorm,l2norm \
        --output benchmarks/results/tpu_eval_plan    # the evaluation's functions

XLA's TPU compiler (libtpu) runs on a CPU-only machine through its compile-only
client: ``jax.experimental.topologies.get_topology_desc`` describes a slice of
any size, and ``jax.jit(...).lower(...).compile()`` builds the real TPU program
for it. What is compiled is the runner's own train and eval step
(:mod:`experiments.steps`, the functions ``python -m experiments.cifar10_<method>``
executes) with the preset's real config: model, batch, outliers, attack steps,
spectral norm, dropout, precision. From the compiled program this reports
per-device memory against the chip's HBM, XLA's FLOP and byte counts, the
collectives, and checks the sharding the design promises (batch split over
``data``, state replicated and donated, one gradient all-reduce, BatchNorm
statistics reduced over the global batch). The step time is a **roofline
estimate** (max of FLOPs / peak FLOP/s and bytes / HBM bandwidth, from the
chips' published figures), never a measurement. ``--eval`` compiles the
evaluation's jitted functions instead (:mod:`benchmarks.tpu_eval_plan`).

Multi-host slices (``v5e:4x4``: 4 hosts, ``v6e:2x4``: 2) cannot be fed the way the
runner feeds them, so the per-host data path is checked, not run. The runner hands
each host's slice of the batch to ``jax.make_array_from_process_local_data``
(:func:`ood_jax.sharding.global_batch`); here there is one real process
(``jax.process_count() == 1``), where that function requires the global shape to be
the local one and then places the data with ``device_put``, which the compile-only
client refuses ("MakeArraysFromHostBufferShards not available with compile-only
client": it has no device memory). The step is therefore lowered from
``ShapeDtypeStruct`` s of the global batch with the batch sharding (the array that
function returns), and :func:`check_process_rows` checks what the per-host path
rests on: under that sharding, every host's devices (their ``process_index`` in the
topology) hold exactly the per-host batch (global batch / hosts) each host reads,
which is the local shape ``make_array_from_process_local_data`` maps onto them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

# Compile-only: no TPU is opened, so several plans (or a plan beside a test) may load
# libtpu at once; without this, the second one stops at libtpu's process lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import plan_table
from benchmarks.tpu_program import (
    CHIPS,
    PlanError,
    bn_channels,
    check_program,
    collectives,
    compiled_cost,
    compiled_memory,
    roofline,
)
from experiments import cli

TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5e:4x4", "v6e:2x4")
PRECISIONS = ("bfloat16", "float32")
# The input pipeline's measured rate (benchmarks/results/input_pipeline.md: train,
# augment, batch 1024, on 2 CPU cores): a TPU host has more cores; a lower bound.
INPUT_IMAGES_PER_S_2_CORES = 41_887
CIFAR_TRAIN_IMAGES = 50_000


@dataclasses.dataclass(frozen=True)
class Slice:
    """A compile-only TPU slice."""

    name: str
    chip: str
    devices: tuple
    processes: int

    @property
    def hbm_per_device(self) -> float:
        chips = len({(tuple(d.coords), getattr(d, "slice_index", 0)) for d in self.devices})
        return CHIPS[self.chip]["hbm_bytes"] * chips / len(self.devices)


def tpu_slice(name: str) -> Slice:
    """The compile-only devices of topology ``name`` (``v5e:2x2``); needs libtpu."""
    from jax.experimental import topologies

    chip = name.split(":")[0]
    if chip not in CHIPS:
        raise PlanError(f"--topology {name!r}: chip must be one of {sorted(CHIPS)}.")
    try:
        # v4 runs megacore (one device per chip, both TensorCores), as on a TPU VM.
        extra = {"chip_config_name": "megacore"} if chip == "v4" else {}
        topology = topologies.get_topology_desc(name, "tpu", **extra)
    except Exception as err:  # the plugin's own errors are RuntimeError/ValueError/Xla
        raise PlanError(
            f"--topology {name!r}: XLA's TPU compiler is not available or refused it "
            f"({str(err).splitlines()[0][:160]}); install it with pip install "
            '"jax[tpu]==0.10.2" (adds libtpu).'
        ) from None
    devices = tuple(topology.devices)
    return Slice(name, chip, devices, len({d.process_index for d in devices}))


def preset_config(method: str, preset: str, precision: str):
    """The resolved config a user's ``--preset`` gives (``finetune`` recipes for OE and
    energy fine-tuning, as the runner builds them with ``--init_from``)."""
    from experiments.configs import methods
    from experiments.run_config import complete_config, validate_config

    config = methods.get_config(method, preset, finetune=method in ("oe", "energy_ft"))
    config.model.mixed_precision = precision == "bfloat16"
    complete_config(config)
    validate_config(config)
    return config


def check_batch(config, tpu: Slice) -> int:
    """The per-process batch; a global batch that does not split over the devices is
    a :class:`PlanError` naming the fix."""
    batch, n = config.train.batch_size, len(tpu.devices)
    if batch % n:
        lower = batch - batch % n or n
        raise PlanError(
            f"{config.method} --preset {config.preset}: batch_size {batch} does not divide over "
            f"the {n} devices of {tpu.name}; use --config.train.batch_size={lower} (a multiple "
            f"of {n}) or a slice whose device count divides {batch}."
        )
    return batch // tpu.processes


def check_process_rows(mesh, batch: int, per_process: int, *, name: str) -> dict[int, int]:
    """``{process: rows}`` of a ``batch``-row global batch under the batch sharding.

    What each host must hand :func:`ood_jax.sharding.global_batch`:
    ``jax.make_array_from_process_local_data`` maps a process's rows onto its own
    devices' slices, in order, wherever the mesh puts them. A process whose devices hold
    other than ``per_process`` rows (what the runner reads per host) is a
    :class:`PlanError`.
    """
    from ood_jax import sharding

    rows: dict[int, int] = {}
    for device, index in sharding.batch_sharding(mesh).devices_indices_map((batch,)).items():
        held = len(range(*index[0].indices(batch)))
        rows[device.process_index] = rows.get(device.process_index, 0) + held
    wrong = {p: n for p, n in sorted(rows.items()) if n != per_process}
    if wrong:
        raise PlanError(
            f"{name}: the batch sharding gives processes {wrong} rows, not the {per_process} "
            "each host reads; the mesh must split the batch evenly over the hosts."
        )
    return rows


def abstract(tree: Any, sharding) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree
    )


def _batch(size: int, sharding, *, labels: bool = True) -> dict:
    spec = {"image": jax.ShapeDtypeStruct((size, 32, 32, 3), jnp.float32, sharding=sharding)}
    if labels:
        spec["label"] = jax.ShapeDtypeStruct((size,), jnp.int32, sharding=sharding)
        spec["mask"] = jax.ShapeDtypeStruct((size,), jnp.bool_, sharding=sharding)
    return spec


def plan(method: str, preset: str, topology: str, precision: str = "bfloat16") -> dict:
    """Compiles ``method``'s ``preset`` train and eval steps for ``topology``."""
    from experiments.run_config import eval_batch_size
    from experiments.steps import make_run_optimizer, make_run_steps
    from experiments.workdir import model_identity
    from ood_jax import sharding
    from ood_jax.models import build_model
    from ood_jax.train import create_train_state

    config = preset_config(method, preset, precision)
    tpu = tpu_slice(topology)
    per_process = check_batch(config, tpu)
    mesh = sharding.make_mesh(devices=tpu.devices)
    batch = config.train.batch_size
    optimizer = make_run_optimizer(config, CIFAR_TRAIN_IMAGES // batch)
    identity = model_identity(config, 10)
    model_def, state = create_train_state(build_model(identity, 0), optimizer.tx, seed=0)
    train_step, eval_step = make_run_steps(config, model_def, optimizer, mesh)
    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    state_abs = abstract(state, rep)
    ratio = config.data.outliers.ratio if "outliers" in config.data else 0
    from ood_jax.train import get_objective

    aux = (
        _batch(batch * ratio, data, labels=False)
        if get_objective(config.objective.name).uses_outliers
        else None
    )
    name = f"{method}/{preset} on {topology}"
    start = time.perf_counter()
    compiled = train_step.jitted.lower(state_abs, _batch(batch, data), aux).compile()
    compile_s = time.perf_counter() - start
    checks = check_program(compiled, state, bn_channels=bn_channels(state.batch_stats), name=name)
    checks["process_rows"] = check_process_rows(mesh, batch, per_process, name=name)
    memory, cost = compiled_memory(compiled), compiled_cost(compiled)
    if memory["peak_bytes"] > tpu.hbm_per_device:
        raise PlanError(
            f"{name}: needs {memory['peak_bytes'] / 2**30:.1f} GiB per device, the chip has "
            f"{tpu.hbm_per_device / 2**30:.1f} GiB; lower --config.train.batch_size or use "
            "more chips."
        )
    eval_batch = eval_batch_size(config, mesh)  # the runner's one rounding to the devices
    eval_compiled = eval_step.lower(state_abs, _batch(eval_batch, data)).compile()
    step_s = roofline(cost, tpu.chip)
    images_per_s = batch / step_s
    return {
        "method": method,
        "preset": preset,
        "topology": topology,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": f"jax {jax.__version__}, libtpu {plan_table.libtpu_version()}",
        "devices": len(tpu.devices),
        "processes": tpu.processes,
        "precision": precision,
        "model": config.model.name,
        "global_batch": batch,
        "per_process_batch": per_process,
        "compile_s": compile_s,
        "memory": memory,
        "hbm_per_device": tpu.hbm_per_device,
        "cost": cost,
        "collectives": collectives(compiled.as_text()),
        "checks": checks,
        "eval": {
            "batch": eval_batch,
            "memory": compiled_memory(eval_compiled),
            "cost": compiled_cost(eval_compiled),
        },
        "estimate": {
            "step_s": step_s,
            "images_per_s": images_per_s,
            "epoch_s": optimizer.steps_per_epoch * step_s,
            "total_s": optimizer.num_steps * step_s,
            "input_images_per_s_per_host": images_per_s / tpu.processes,
            "input_bound_on_2_cores": images_per_s / tpu.processes > INPUT_IMAGES_PER_S_2_CORES,
        },
    }


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f}"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def markdown(rows: Sequence[dict], header: dict) -> str:
    """The plans as a Markdown table (failures as one line each)."""
    note = (
        "memory, FLOPs and bytes are XLA's, per device per train step; step time, images/s "
        "and run time are **roofline estimates** (max of FLOPs / peak bf16 FLOP/s and bytes "
        "/ HBM bandwidth, published per-chip figures), not measurements: real steps are "
        "slower (latency, collectives, input)."
    )
    lines = [
        *plan_table.heading("Compile-only TPU plans of the presets' train steps", header, [note]),
        "| method | preset | topology | devices (hosts) | precision | batch | compile s "
        "| args / temp / peak GiB | HBM GiB | GFLOP | GB accessed | all-reduce (ops, MB) "
        "| est. step | est. images/s | est. epoch | est. run | input/host needed |",
        "|" + "---|" * 17,
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['method']} | {r['preset']} | {r['topology']} | | {r['precision']} | "
                f"| | | | | | | | | | | **{r['error']}** |"
            )
            continue
        m, c, e = r["memory"], r["cost"], r["estimate"]
        ar = next(
            (x for x in r["collectives"] if x["op"] == "all-reduce"), {"count": 0, "bytes": 0}
        )
        lines.append(
            f"| {r['method']} | {r['preset']} | {r['topology']} "
            f"| {r['devices']} ({r['processes']}) "
            f"| {r['precision']} | {r['global_batch']} | {r['compile_s']:.0f} "
            f"| {gib(m['argument_bytes'])} / {gib(m['temp_bytes'])} / {gib(m['peak_bytes'])} "
            f"| {gib(r['hbm_per_device'])} | {c['flops'] / 1e9:.1f} "
            f"| {c['bytes_accessed'] / 1e9:.2f} "
            f"| {ar['count']}, {ar['bytes'] / 1e6:.1f} | {e['step_s'] * 1e3:.2f} ms "
            f"| {e['images_per_s']:,.0f} | {duration(e['epoch_s'])} | {duration(e['total_s'])} "
            f"| {e['input_images_per_s_per_host']:,.0f}"
            + (" (input-bound on 2 cores)" if e["input_bound_on_2_cores"] else "")
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    from experiments.configs import methods

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="logitnorm", help="a method, or several: ce,oe")
    parser.add_argument("--preset", default="paper")
    parser.add_argument(
        "--topology", default="v5e:2x2", help=f"one or several, e.g. {','.join(TOPOLOGIES)}"
    )
    parser.add_argument("--precision", default="bfloat16", help="bfloat16, float32 or both")
    parser.add_argument(
        "--all", action="store_true", help="every method's paper preset on every topology"
    )
    parser.add_argument(
        "--eval",
        action="store_true",
        help="the evaluation's jitted functions instead (benchmarks.tpu_eval_plan), one row "
        "per model of the methods' presets",
    )
    parser.add_argument("--output", default="", help="write (or add to) OUTPUT.md, OUTPUT.json")
    args = parser.parse_args(argv)
    names = {
        "method": methods.METHODS if args.all else _listed(args.method),
        "topology": TOPOLOGIES if args.all else _listed(args.topology),
        "precision": _listed(args.precision),
    }
    for flag, allowed in (("method", methods.METHODS), ("precision", PRECISIONS)):
        unknown = [n for n in names[flag] if n not in allowed]
        if unknown:
            raise cli.UsageError(f"--{flag} {','.join(unknown)}: choose from {','.join(allowed)}.")
    preset = "paper" if args.all else args.preset
    for method in names["method"]:
        if preset not in methods.presets_of(method):
            raise cli.UsageError(f"--preset {preset!r}: {method} has {methods.presets_of(method)}.")
    runs = [
        (m, preset, t, p)
        for m in names["method"]
        for t in names["topology"]
        for p in names["precision"]
    ]
    command = "python -m benchmarks.tpu_plan " + " ".join(argv or sys.argv[1:])
    if args.eval:
        from benchmarks import tpu_eval_plan  # it imports this module: not at the top

        jobs, key_fields, table = (
            tpu_eval_plan.jobs(runs),
            tpu_eval_plan.KEY,
            tpu_eval_plan.markdown,
        )
    else:
        key_fields, table = ("method", "preset", "topology", "precision"), markdown
        jobs = [
            (dict(zip(key_fields, run, strict=True)), functools.partial(plan, *run)) for run in runs
        ]
    return plan_table.run_rows(
        jobs, key_fields=key_fields, markdown=table, output=args.output, command=command
    )


def _listed(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


if __name__ == "__main__":
    cli.run_main(main, sys.argv[1:])
