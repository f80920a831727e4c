"""Compile-only TPU plans of the evaluation's jitted functions (the second table).

    python -m experiments.plan.tpu --eval --method logitnorm,l2norm --preset paper \\
        --topology v5e:2x2 --output results/plans/tpu_eval_plan

What is compiled are the jax.jit objects the evaluation (:mod:`ood_jax.evaluate`)
runs, taken from the objects it builds for the preset's model and eval settings:

- ``forward``: :attr:`ForwardPass.jitted`, the one forward pass per dataset, at the
  evaluation's batch (``experiments.run_config.eval_batch_size``);
- ``odin``: :meth:`ForwardPass.jitted_map` of ODIN's
  :func:`~ood_jax.evaluate.scoring.image_score_fn` (a per-example input gradient
  and a second forward), at the same batch;
- ``attack chunk``: one call of the adversarial-noise attack
  (:func:`~ood_jax.evaluate.adversarial.noise_attack`), ``CHUNK_STEPS`` PGD steps
  at its batch (``ATTACK_BATCH`` rounded to the devices), a loop on TPU (unrolled
  only on CPU), with an estimate of the whole attack: ``eval.adversarial_noise``
  images, ``eval.attack_steps`` steps;
- ``gradnorm``: an ``"outputs"`` score; the evaluation computes it from the cached
  features of all datasets, concatenated on the host and put on **one** device (not
  sharded), through :func:`ood_jax.scores.gradnorm`'s own jitted function. It is
  compiled so here (that function under one more ``jax.jit``, which inlines it), on
  one device, for 10,240 features (``GRADNORM_TRIPS`` of its 1,024-row chunks, about
  the CIFAR-10 test set; time is linear in the rows).

XLA's cost analysis counts a loop body once, so the FLOPs and bytes of the two
programs that are loops (the attack chunk's steps, GradNorm's chunks) are multiplied
by their trip counts.

The programs do not depend on the training objective: a row is keyed by
:data:`KEY` (model, preset, topology, precision) and names the methods whose preset
builds that model. The evaluation runs in one process (``ForwardPass`` refuses
several), on the devices of its host: a multi-host topology's row is compiled for
process 0's devices. Times are roofline estimates (:func:`~experiments.plan.program.roofline`).
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from experiments import methods
from experiments.plan import table as plan_table
from experiments.plan.core import (
    abstract,
    duration,
    gib,
    overrides_label,
    preset_cell,
    preset_config,
    tpu_slice,
)
from experiments.plan.program import (
    PlanError,
    compiled_cost,
    compiled_memory,
    required_bytes,
    roofline,
)
from experiments.run_config import eval_batch_size, eval_spec, model_identity
from ood_jax import sharding
from ood_jax.evaluate import ForwardPass
from ood_jax.evaluate.adversarial import CHUNK_STEPS, noise_attack
from ood_jax.evaluate.scoring import image_score_fn
from ood_jax.evaluate.stages import head_weights
from ood_jax.models import build_model
from ood_jax.scores import get_score
from ood_jax.scores import gradnorm as gradnorm_score

# A row to plan: (method, preset, topology, precision, the runner's config overrides).
Run = tuple[str, str, str, str, tuple[str, ...]]
KEY = ("model", "preset", "topology", "precision", "overrides")
PROGRAMS = ("forward", "odin", "gradnorm", "attack chunk")
# GradNorm's rows: 10 of its lax.map chunks of chunk_size (1024), no remainder.
GRADNORM_TRIPS = 10
IMAGE_SHAPE = (32, 32, 3)


def model_label(config) -> str:
    """The model a preset builds, as ``name(option=value, ...)`` (precision apart)."""

    options = {k: v for k, v in model_identity(config, 10)["options"].items() if k != "dtype"}
    return f"{config.model.name}({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})"


def keyed_runs(runs: Sequence[Run]) -> list[tuple[dict, Run]]:
    """One ``(key fields, first run)`` per distinct :data:`KEY` of
    ``(method, preset, topology, precision, overrides)`` runs."""
    found: dict[tuple, tuple[dict, Run]] = {}
    for run in runs:
        method, preset, topology, precision, overrides = run
        fields = _key(preset_config(method, preset, precision, overrides), *run[1:])
        found.setdefault(tuple(fields.values()), (fields, run))
    return list(found.values())


def _key(config, preset: str, topology: str, precision: str, overrides: Sequence[str]) -> dict:
    """A row's :data:`KEY` fields: the model ``config`` builds, and how it was planned."""
    label = model_label(config)
    return dict(
        zip(KEY, (label, preset, topology, precision, overrides_label(overrides)), strict=True)
    )


def jobs(runs: Sequence[Run]) -> list[plan_table.Job]:
    """One job per distinct :data:`KEY` of ``runs``, planned in this process."""
    return [(fields, functools.partial(plan_eval, *run)) for fields, run in keyed_runs(runs)]


def _methods_of(label: str, preset: str, precision: str, overrides: Sequence[str]) -> list[str]:

    return [
        m
        for m in methods.METHODS
        if preset in methods.presets_of(m)
        and model_label(preset_config(m, preset, precision, overrides)) == label
    ]


def _compile(jitted, args: tuple, chip: str, hbm: float, *, batch: int, trips: int) -> dict:
    """``trips``: iterations of the program's one loop; XLA's cost analysis counts a
    loop body once, so FLOPs and bytes are scaled by it."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled_memory(compiled)
    cost = {k: v * trips for k, v in compiled_cost(compiled).items()}
    call_s = roofline(cost, chip)
    return {
        "compiled": compiled,
        "batch": batch,
        "compile_s": compile_s,
        "memory": memory,
        "fits": required_bytes(memory) <= hbm,
        "loop_trips": trips,
        "cost": cost,
        "call_s": call_s,
        "images_per_s": batch / call_s,
    }


def _check_sharded(compiled, name: str) -> str:
    """The model state replicated, every batch argument split over ``data``; returns the
    mesh axis of the batch arguments' leading axis."""
    (state, *batch), _ = compiled.input_shardings
    if not all(leaf.is_fully_replicated for leaf in jax.tree.leaves(state)):
        raise PlanError(f"{name}: the model state is not replicated.")
    for leaf in jax.tree.leaves(batch):
        if tuple(leaf.spec)[:1] != ("data",):
            raise PlanError(f"{name}: the batch is not sharded over 'data' (got {leaf.spec}).")
    return "data"


def evaluation_programs(config, mesh) -> tuple[dict, dict]:
    """``({program: (jitted, abstract args, batch)}, attack)`` of the evaluation that
    ``config`` runs on ``mesh`` (see the module docstring); ``attack``: its size."""

    batch = eval_batch_size(config, mesh)
    spec = eval_spec(config, batch_size=batch)
    model = build_model(model_identity(config, 10), 0)
    forward = ForwardPass(model, mesh=mesh)
    rep, data = sharding.replicated(mesh), forward.batch_sharding
    state = abstract(forward.host_state, rep)
    images = jax.ShapeDtypeStruct((batch, *IMAGE_SHAPE), jnp.float32, sharding=data)
    odin = forward.jitted_map(image_score_fn("odin", spec.score_hparams["odin"], std=spec.std))
    attack = noise_attack(forward, spec.adversarial_noise, **spec.attack_options())
    chunk_steps = min(CHUNK_STEPS, spec.attack_steps)
    noise = jax.ShapeDtypeStruct((attack.batch, *IMAGE_SHAPE), jnp.float32, sharding=data)
    key = abstract(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))), rep)
    pgd = abstract(jax.eval_shape(attack.start.jitted, state, noise, key), data)
    hp = spec.score_hparams["gradnorm"]
    gradnorm = jax.jit(lambda logits, z, head: get_score("gradnorm").fn(logits, z, head, **hp))
    one = jax.sharding.SingleDeviceSharding(mesh.devices.flat[0])
    head = abstract(head_weights(model), one)
    chunk = inspect.signature(gradnorm_score).parameters["chunk_size"].default
    rows = GRADNORM_TRIPS * chunk
    outputs = [
        jax.ShapeDtypeStruct((rows, n), jnp.float32, sharding=one)
        for n in (head.kernel.shape[1], head.kernel.shape[0])
    ]
    # {program: (jitted, abstract arguments, batch, iterations of its loop)}
    programs = {
        "forward": (forward.jitted, (state, images), batch, 1),
        "odin": (odin, (state, images), batch, 1),
        "gradnorm": (gradnorm, (*outputs, head), rows, GRADNORM_TRIPS),
        "attack chunk": (
            attack.advance[chunk_steps].jitted,
            (state, pgd),
            attack.batch,
            1 if attack.unrolled else chunk_steps,
        ),
    }
    calls = math.ceil(spec.adversarial_noise / attack.batch) * spec.attack_steps / chunk_steps
    size = {"images": spec.adversarial_noise, "steps": spec.attack_steps, "chunk_calls": calls}
    return programs, size


def plan_eval(
    method: str,
    preset: str,
    topology: str,
    precision: str = "bfloat16",
    overrides: Sequence[str] = (),
    *,
    programs: Sequence[str] = PROGRAMS,
) -> dict:
    """Compiles the evaluation's ``programs`` (all :data:`PROGRAMS`) for ``topology``,
    with the runner's ``--config.<field>=<value>`` ``overrides``."""

    config = preset_config(method, preset, precision, overrides)
    tpu = tpu_slice(topology)
    # The evaluation runs in one process, on its host's devices.
    host = [d for d in tpu.devices if d.process_index == 0]
    built, attack = evaluation_programs(config, sharding.make_mesh(devices=host))
    compiled = {}
    for name in programs:
        jitted, args, batch, trips = built[name]
        compiled[name] = _compile(
            jitted, args, tpu.chip, tpu.hbm_per_device, batch=batch, trips=trips
        )
        program = compiled[name].pop("compiled")
        if name != "gradnorm":  # an outputs score: one device, nothing to shard
            compiled[name]["batch_axis"] = _check_sharded(program, f"{name} of {method}/{preset}")
    if "attack chunk" in compiled:
        attack["estimate_s"] = attack["chunk_calls"] * compiled["attack chunk"]["call_s"]
    key = _key(config, preset, topology, precision, overrides)
    return {
        **key,
        "methods": _methods_of(key["model"], preset, precision, overrides),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": f"jax {jax.__version__}, libtpu {plan_table.libtpu_version()}",
        "devices": len(host),
        "topology_processes": tpu.processes,
        "hbm_per_device": tpu.hbm_per_device,
        "programs": compiled,
        "attack": attack,
    }


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def markdown(rows: Sequence[dict], header: dict) -> str:
    """The evaluation plans as a Markdown table, one line per compiled program."""
    notes = [
        "one row per model (the programs do not depend on the training objective); "
        "memory, FLOPs and bytes are XLA's, per device per call (XLA peak: the compiled "
        "program's peak_memory_in_bytes; its temp_size is 0 for several of these programs); "
        "call time and images/s are **roofline estimates** (as in tpu_plan.md), not "
        "measurements.",
        "forward, odin, attack chunk: the batch split over the host's devices (`data`), "
        "the model replicated; gradnorm: an outputs score, all datasets' cached features "
        "on one device (10 chunks of 1,024 rows); the attack chunk is "
        "ood_jax.evaluate.adversarial.CHUNK_STEPS PGD steps (a loop on TPU), the attack "
        "estimate all its calls. XLA's cost analysis counts a loop body once: the FLOPs "
        "and bytes of gradnorm and the attack chunk are scaled by their loops' trips.",
    ]
    lines = [
        *plan_table.heading(
            "Compile-only TPU plans of the evaluation's jitted functions", header, notes
        ),
        "| model | methods | preset | topology | host devices | precision | program | batch "
        "| compile s | args / temp / XLA peak MiB | HBM GiB | GFLOP | GB accessed | est. call "
        "| est. images/s |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        lead = f"| {r['model']} | {', '.join(r.get('methods', []))} | {preset_cell(r)} "
        if "error" in r:
            lines.append(
                f"{lead}| {r['topology']} | | {r['precision']} | | | | | | | | | **{r['error']}** |"
            )
            continue
        where = f"| {r['topology']} | {r['devices']} | {r['precision']} "
        for name, p in r["programs"].items():
            m, c = p["memory"], p["cost"]
            peak = _mib(m["xla_peak_bytes"]) + ("" if p["fits"] else " **(exceeds HBM)**")
            lines.append(
                f"{lead}{where}| {name} | {p['batch']} | {p['compile_s']:.0f} "
                f"| {_mib(m['argument_bytes'])} / {_mib(m['temp_bytes'])} / {peak} "
                f"| {gib(r['hbm_per_device'])} | {c['flops'] / 1e9:.1f} "
                f"| {c['bytes_accessed'] / 1e9:.2f} | {p['call_s'] * 1e3:.2f} ms "
                f"| {p['images_per_s']:,.0f} |"
            )
        a = r["attack"]
        if "estimate_s" not in a:
            continue
        lines.append(
            f"{lead}{where}| attack ({a['images']:,} images, {a['steps']} steps) "
            f"| | | | | | | {a['chunk_calls']:.0f} chunk calls: {duration(a['estimate_s'])} | |"
        )
    return "\n".join(lines) + "\n"
