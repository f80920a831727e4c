"""The device-generic core of the compile-only plans: a preset's train and eval step
compiled for some compile-only devices, and the table of such plans.

:mod:`experiments.plan.tpu` (TPU slices, libtpu) and :mod:`experiments.plan.gpu` (N GPUs
of one host, the CUDA plugin) each build the devices and say how a compiled program's
cost is read; :func:`plan_steps` does the rest: the runner's own steps of the config,
the design's checks, the memory against the device's, and a roofline estimate.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from experiments import cli, methods
from experiments.plan import table as plan_table
from experiments.plan.program import (
    CHIPS,
    PlanError,
    bn_channels,
    check_lowered,
    check_program,
    collectives,
    compiled_memory,
    required_bytes,
    roofline,
)
from experiments.run_config import eval_batch_size, model_identity, parse, resolve
from experiments.steps import make_run_optimizer, make_run_steps
from ood_jax import attacks, sharding
from ood_jax import data as D
from ood_jax.data.device import DeviceData, abstract_split, resident_bytes
from ood_jax.models import build_model
from ood_jax.train import create_train_state, get_objective

PRECISIONS = ("bfloat16", "float32")
# The input pipeline's measured rate (benchmarks/results/input_pipeline.md: train,
# augment, batch 1024, on 2 CPU cores): a TPU host has more cores; a lower bound.
INPUT_IMAGES_PER_S_2_CORES = 41_887
CIFAR_TRAIN_IMAGES = 50_000
# The images of the auxiliary outlier sets a plan with the data on the device places
# beside the split (the offline Tiny ImageNet train subset: docs/data.md); any other
# source is planned at the CIFAR split's size.
OUTLIER_IMAGES = {"tinyimagenet_train": 20_200}
# What the host hands a step with the data on the device, per image: its row (int32)
# and, with augmentation, its crop corner and flip (3 x int32); no pixels.
PLAN_BYTES_PER_IMAGE = {True: 16, False: 4}

# How a compiled program's FLOPs and bytes per device are read: (lowered, compiled) -> cost.
CostFn = Callable[[Any, Any], dict]


@dataclasses.dataclass(frozen=True)
class Slice:
    """Compile-only devices of one chip type (a TPU slice, a host's GPUs)."""

    name: str
    chip: str
    devices: tuple
    processes: int
    hbm_per_device: float


def tpu_slice(name: str) -> Slice:
    """The compile-only devices of topology ``name`` (``v5e:2x2``); needs libtpu."""
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
    chips = len({(tuple(d.coords), getattr(d, "slice_index", 0)) for d in devices})
    hbm_per_device = CHIPS[chip]["hbm_bytes"] * chips / len(devices)
    return Slice(name, chip, devices, len({d.process_index for d in devices}), hbm_per_device)


def preset_config(method: str, preset: str, precision: str, overrides: Sequence[str] = ()):
    """The resolved config a user's ``--preset`` gives (the fine-tuning recipe of a method
    that has one, OE's and energy fine-tuning's, as the runner builds it with
    ``--init_from``), with the runner's ``--config.<field>=<value>`` ``overrides``
    applied (a bad one is a :class:`~experiments.cli.UsageError`)."""

    record = methods.get(method)
    config = record.config(preset, finetune=record.fine_tuning != "none")
    config.model.mixed_precision = precision == "bfloat16"
    if any(o.startswith("--config.model.mixed_precision") for o in overrides):
        raise cli.UsageError(
            "--config.model.mixed_precision: the plans take --precision "
            "(bfloat16, float32 or both) instead."
        )
    config = parse(config, overrides)
    resolve(config)  # the checks a launched run makes; the plan edits its copies (ACET's loop)
    return config


def overrides_label(overrides: Sequence[str]) -> str:
    """A row's ``overrides`` field: ``train.batch_size=256 ...`` ("" for the preset)."""
    return " ".join(o.removeprefix("--config.") for o in overrides)


def preset_cell(row: Mapping) -> str:
    """A table's preset cell: the preset, and the overrides it was planned with."""
    return row["preset"] + (f" ({row['overrides']})" if row.get("overrides") else "")


def check_batch(config, target: Slice) -> int:
    """The per-process batch; a global batch that does not split over the devices is
    a :class:`PlanError` naming the fix."""
    batch, n = config.train.batch_size, len(target.devices)
    if batch % n:
        lower = batch - batch % n or n
        raise PlanError(
            f"{config.method} --preset {config.preset}: batch_size {batch} does not divide over "
            f"the {n} devices of {target.name}; use --config.train.batch_size={lower} (a multiple "
            f"of {n}) or a slice whose device count divides {batch}."
        )
    return batch // target.processes


def check_process_rows(mesh, batch: int, per_process: int, *, name: str) -> dict[int, int]:
    """``{process: rows}`` of a ``batch``-row global batch under the batch sharding.

    What each host must hand :func:`ood_jax.sharding.global_batch`:
    ``jax.make_array_from_process_local_data`` maps a process's rows onto its own
    devices' slices, in order, wherever the mesh puts them. A process whose devices hold
    other than ``per_process`` rows (what the runner reads per host) is a
    :class:`PlanError`.
    """

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


def check_fits(memory: dict, hbm_per_device: float, *, name: str) -> None:
    """A program needing more than the device's memory is a :class:`PlanError`; the need
    is the larger of the two peaks (:func:`~experiments.plan.program.required_bytes`)."""
    needed = required_bytes(memory)
    if needed > hbm_per_device:
        raise PlanError(
            f"{name}: needs {needed / 2**30:.1f} GiB per device, the device has "
            f"{hbm_per_device / 2**30:.1f} GiB; lower --config.train.batch_size or use "
            "more devices."
        )


def abstract(tree: Any, sharding) -> Any:
    """``tree``'s arrays as ``ShapeDtypeStruct`` s placed with ``sharding``."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree
    )


def batch_spec(size: int, sharding, *, labels: bool = True) -> dict:
    """An abstract CIFAR batch of ``size`` images (with labels and mask unless not)."""
    spec = {"image": jax.ShapeDtypeStruct((size, 32, 32, 3), jnp.float32, sharding=sharding)}
    if labels:
        spec["label"] = jax.ShapeDtypeStruct((size,), jnp.int32, sharding=sharding)
        spec["mask"] = jax.ShapeDtypeStruct((size,), jnp.bool_, sharding=sharding)
    return spec


def plan_spec(size: int, sharding, *, augment: bool) -> dict:
    """An abstract plan of ``size`` images (:class:`ood_jax.data.PlanIterator`): what the
    host hands a step with the data on the device."""
    spec = {"index": jax.ShapeDtypeStruct((size,), jnp.int32, sharding=sharding)}
    if augment:
        spec["crop"] = jax.ShapeDtypeStruct((size, 3), jnp.int32, sharding=sharding)
    return spec


def abstract_device_data(config, mesh, *, outliers: bool) -> DeviceData:
    """The splits ``config.data.on_device`` places, as ``ShapeDtypeStruct`` s on ``mesh``:
    CIFAR's 50,000 training images, and the objective's outliers beside them."""
    spec = D.get_dataset_spec(config.data.dataset)
    norm = {"mean": spec.mean, "std": spec.std}
    aux = None
    if outliers:
        images = OUTLIER_IMAGES.get(config.data.outliers.source, CIFAR_TRAIN_IMAGES)
        aux = abstract_split(images, mesh, **norm)
    return DeviceData(abstract_split(CIFAR_TRAIN_IMAGES, mesh, **norm), aux)


def resident_split_bytes(device_data: DeviceData | None, num_devices: int) -> int:
    """Device memory the resident splits take on each device (0 with the host pipeline)."""
    if device_data is None:
        return 0
    splits = [s for s in (device_data.train, device_data.aux) if s is not None]
    return sum(resident_bytes(s.num_examples, num_devices) for s in splits)


@dataclasses.dataclass(frozen=True)
class RunSteps:
    """What :func:`lower_train_step` built: the runner's state, mesh, optimizer and
    eval step, the batch each process reads, and the facts checked on the lowered step."""

    state: Any
    mesh: Any
    optimizer: Any
    eval_step: Any
    per_process: int
    checks: dict
    device_data: DeviceData | None = None


def lower_train_step(config, target: Slice):
    """``(lowered, RunSteps)``: the runner's train step of ``config`` lowered for
    ``target``'s devices (state replicated and donated, batch split over ``data``,
    the objective's outlier batch beside it), not yet compiled.

    What can be checked before the compile is (a :class:`PlanError` names what is
    wrong): the batch divides over the devices, every host's devices hold the batch
    that host reads, the lowered step's state is replicated and donated and its
    batch split over ``data``."""

    per_process = check_batch(config, target)
    mesh = sharding.make_mesh(devices=target.devices)
    batch = config.train.batch_size
    optimizer = make_run_optimizer(config, CIFAR_TRAIN_IMAGES // batch)
    model_def, state = create_train_state(
        build_model(model_identity(config, 10), 0), optimizer.tx, seed=0
    )
    outliers = get_objective(config.objective.name).uses_outliers
    on_device = config.data.get("on_device", False)
    device_data = abstract_device_data(config, mesh, outliers=outliers) if on_device else None
    train_step, eval_step = make_run_steps(
        config, model_def, optimizer, mesh, device_data=device_data
    )
    state_abs = abstract(state, sharding.replicated(mesh))
    data = sharding.batch_sharding(mesh)
    aux_size = batch * config.data.outliers.ratio
    if on_device:  # the steps' plans in, the splits beside them; the batch made inside
        augment = config.data.augment
        aux = plan_spec(aux_size, data, augment=augment) if outliers else None
        args = (plan_spec(batch, data, augment=augment), aux, device_data)
    else:
        aux = batch_spec(aux_size, data, labels=False) if outliers else None
        args = (batch_spec(batch, data), aux)
    lowered = train_step.jitted.lower(state_abs, *args)
    name = f"{config.method}/{config.preset} on {target.name}"
    checks = check_lowered(lowered, state, name=name)
    checks["process_rows"] = check_process_rows(mesh, batch, per_process, name=name)
    steps = RunSteps(state, mesh, optimizer, eval_step, per_process, checks, device_data)
    return lowered, steps


def attack_loop_cost(config, target: Slice, cost_fn: CostFn, counted_once: dict) -> dict | None:
    """The cost of a step whose attack is a loop (ACET's ``attack_steps`` PGD steps on
    TPU/GPU), or None for a step without one.

    XLA's cost analysis counts a loop body once, so the compiled step's
    ``counted_once`` cost is one attack step plus the rest. One attack step's cost
    (``body``) is the difference of two unrolled copies of the step, with a 2-step and
    a 1-step attack; the step's cost is ``counted_once + (trips - 1) * body``."""

    trips = int(config.objective.hparams.get("attack_steps", 0))
    if trips < 2 or target.devices[0].platform == "cpu":  # no loop: unrolled on CPU
        return None
    unrolled = {}
    for steps in (1, 2):
        short = copy.deepcopy(config)
        short.objective.hparams.attack_steps = steps
        with attacks.unrolling():
            lowered, _ = lower_train_step(short, target)
            unrolled[steps] = cost_fn(lowered, lowered.compile())
    body = {k: unrolled[2][k] - unrolled[1][k] for k in counted_once}
    return {
        "trips": trips,
        "counted_once": counted_once,
        "body": body,
        "cost": {k: counted_once[k] + (trips - 1) * body[k] for k in counted_once},
    }


def plan_steps(
    config, target: Slice, *, chips: Mapping[str, dict], cost_fn: CostFn, versions: str
) -> dict:
    """Compiles the runner's train and eval step of ``config`` for ``target``'s devices.

    ``chips[target.chip]``: the device's published ``peak_flops`` and ``hbm_bw`` (the
    roofline); ``cost_fn``: how FLOPs and bytes per device are read from a compiled step.
    Returns the plan's row (what :func:`markdown` reads)."""

    start = time.perf_counter()
    lowered, steps = lower_train_step(config, target)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    state, mesh, optimizer, eval_step = steps.state, steps.mesh, steps.optimizer, steps.eval_step
    state_abs, data = abstract(state, sharding.replicated(mesh)), sharding.batch_sharding(mesh)
    batch, per_process = config.train.batch_size, steps.per_process
    name = f"{config.method}/{config.preset} on {target.name}"
    checks = check_program(compiled, state, bn_channels=bn_channels(state.batch_stats), name=name)
    checks["process_rows"] = steps.checks["process_rows"]
    memory, cost = compiled_memory(compiled), cost_fn(lowered, compiled)
    check_fits(memory, target.hbm_per_device, name=name)
    loop = attack_loop_cost(config, target, cost_fn, cost)
    if loop is not None:
        cost = loop["cost"]
    eval_batch = eval_batch_size(config, mesh)  # the runner's one rounding to the devices
    eval_lowered = eval_step.lower(state_abs, batch_spec(eval_batch, data))
    eval_compiled = eval_lowered.compile()
    step_s = roofline(cost, target.chip, chips=chips)
    images_per_s = batch / step_s
    per_host = images_per_s / target.processes
    on_device = steps.device_data is not None
    # The host path hands over float32 images (12,288 bytes), a label and a mask each;
    # with the data on the device, a plan (PLAN_BYTES_PER_IMAGE) a few microseconds of
    # NumPy a step make, whatever the batch: no host CPU bound.
    per_image = PLAN_BYTES_PER_IMAGE[bool(config.data.augment)] if on_device else 12_288 + 5
    return {
        "method": config.method,
        "preset": config.preset,
        "topology": target.name,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": versions,
        "devices": len(target.devices),
        "processes": target.processes,
        "precision": "bfloat16" if config.model.mixed_precision else "float32",
        "model": config.model.name,
        "global_batch": batch,
        "per_process_batch": per_process,
        "compile_s": compile_s,
        "memory": memory,
        "hbm_per_device": target.hbm_per_device,
        "cost": cost,
        "collectives": collectives(compiled.as_text()),
        "checks": checks,
        "attack_loop": loop,
        "data_on_device": on_device,
        "resident_split_bytes": resident_split_bytes(steps.device_data, len(target.devices)),
        "eval": {
            "batch": eval_batch,
            "memory": compiled_memory(eval_compiled),
            "cost": cost_fn(eval_lowered, eval_compiled),
        },
        "estimate": {
            "step_s": step_s,
            "images_per_s": images_per_s,
            "epoch_s": optimizer.steps_per_epoch * step_s,
            "total_s": optimizer.num_steps * step_s,
            "input_images_per_s_per_host": per_host,
            "input_bytes_per_s_per_host": per_host * per_image,
            "input_bound_on_2_cores": not on_device and per_host > INPUT_IMAGES_PER_S_2_CORES,
        },
    }


def plan_preset(
    method: str,
    preset: str,
    precision: str,
    overrides: Sequence[str],
    target: Slice,
    **kwargs: Any,
) -> dict:
    """:func:`plan_steps` of ``method``'s ``preset`` with the runner's ``overrides``;
    the row names the overrides it was planned with."""
    row = plan_steps(preset_config(method, preset, precision, overrides), target, **kwargs)
    return {**row, "overrides": overrides_label(overrides)}


def listed(text: str) -> list[str]:
    """The values of a comma-separated flag (``ce,oe``)."""
    return [t for t in (s.strip() for s in text.split(",")) if t]


def check_choices(names: Mapping[str, Sequence[str]], allowed: Mapping, *, preset: str) -> None:
    """Values of a flag (``names[flag]``) outside ``allowed[flag]``, or a method without
    ``preset``, are a :class:`~experiments.cli.UsageError` naming the choices."""

    for flag, choices in allowed.items():
        unknown = [n for n in names[flag] if n not in choices]
        if unknown:
            raise cli.UsageError(f"--{flag} {','.join(unknown)}: choose from {','.join(choices)}.")
    for method in names["method"]:
        if preset not in methods.presets_of(method):
            raise cli.UsageError(f"--preset {preset!r}: {method} has {methods.presets_of(method)}.")


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f}"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _memory_cell(m: dict) -> str:
    """args / temp / peak / XLA peak GiB (rows planned before XLA's peak was kept lack it)."""
    xla_peak = gib(m["xla_peak_bytes"]) if "xla_peak_bytes" in m else "-"
    return (
        f"{gib(m['argument_bytes'])} / {gib(m['temp_bytes'])} / {gib(m['peak_bytes'])} / {xla_peak}"
    )


def _split_cell(row: dict) -> str:
    """The resident split's MiB per device ("-": the host pipeline, or a row planned
    before data on the device existed)."""
    return f"{row['resident_split_bytes'] / 2**20:.1f}" if row.get("data_on_device") else "-"


def _input_cell(row: dict) -> str:
    """What each host must provide a second: decoded images, or with the data on the
    device only the steps' plans."""
    e = row["estimate"]
    if row.get("data_on_device"):
        return (
            f"plans of {e['input_images_per_s_per_host']:,.0f} images "
            f"({e['input_bytes_per_s_per_host'] / 1e6:.1f} MB/s; no pixels)"
        )
    bound = " (input-bound on 2 cores)" if e["input_bound_on_2_cores"] else ""
    return f"{e['input_images_per_s_per_host']:,.0f}{bound}"


def markdown(rows: Sequence[dict], header: dict, *, title: str) -> str:
    """The plans as a Markdown table under ``title`` (failures as one line each)."""
    note = (
        "memory, FLOPs and bytes are XLA's, per device per train step (peak: arguments + "
        "outputs - donated + temp; XLA peak: the compiled program's peak_memory_in_bytes; "
        "the larger must fit); step time, images/s "
        "and run time are **roofline estimates** (max of FLOPs / peak bf16 FLOP/s and bytes "
        "/ HBM bandwidth, published per-chip figures), not measurements: real steps are "
        "slower (latency, collectives, input). compile s: wall seconds of XLA's TPU/GPU "
        "compiler on the 2-core machine that built the row, with whatever else ran there "
        "(1-4 min for a paper preset when idle; rows built beside another job at nice 19 "
        "took up to 40 min): a cost of planning, not of the run."
    )
    notes = [note]
    if any(r.get("attack_loop") for r in rows):
        notes.append(
            "ACET: its training attack is a loop on TPU/GPU (as the runner builds it there) "
            "and XLA's cost analysis counts a loop body once, so GFLOP and GB add the other "
            "attack_steps - 1 trips, each costed as the difference of the step compiled "
            "with a 2-step and a 1-step attack, unrolled (the row's attack_loop in the JSON); "
            "memory is the loop program's."
        )
    if any(r.get("data_on_device") for r in rows):
        notes.append(
            "data on device (`--config.data.on_device=true`): the training split (and the "
            "objective's outliers) resident on the devices as uint8, sharded over `data`, "
            "each batch gathered, cropped, flipped and normalized inside the step; the "
            "resident split's MiB per device are part of the arguments, and the host hands "
            "each step only its plan (16 bytes an image: row, crop corner, flip)."
        )
    lines = [
        *plan_table.heading(title, header, notes),
        "| method | preset | topology | devices (hosts) | precision | batch | compile s "
        "| args / temp / peak / XLA peak GiB | split on device MiB | HBM GiB | GFLOP "
        "| GB accessed | all-reduce (ops, MB) | est. step | est. images/s | est. epoch "
        "| est. run | input/host needed |",
        "|" + "---|" * 18,
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['method']} | {preset_cell(r)} | {r['topology']} | | {r['precision']} | "
                f"| | | | | | | | | | | | **{r['error']}** |"
            )
            continue
        c, e = r["cost"], r["estimate"]
        ar = next(
            (x for x in r["collectives"] if x["op"] == "all-reduce"), {"count": 0, "bytes": 0}
        )
        lines.append(
            f"| {r['method']} | {preset_cell(r)} | {r['topology']} "
            f"| {r['devices']} ({r['processes']}) "
            f"| {r['precision']} | {r['global_batch']} | {r['compile_s']:.0f} "
            f"| {_memory_cell(r['memory'])} | {_split_cell(r)} "
            f"| {gib(r['hbm_per_device'])} | {c['flops'] / 1e9:.1f} "
            f"| {c['bytes_accessed'] / 1e9:.2f} "
            f"| {ar['count']}, {ar['bytes'] / 1e6:.1f} | {e['step_s'] * 1e3:.2f} ms "
            f"| {e['images_per_s']:,.0f} | {duration(e['epoch_s'])} | {duration(e['total_s'])} "
            f"| {_input_cell(r)} |"
        )
    return "\n".join(lines) + "\n"
