"""Compile-only GPU plans of a preset's real steps: XLA's CUDA compiler without a GPU.

    pip install "jax-cuda12-plugin==0.10.2"   # the plugin alone: no CUDA wheels, no driver
    python -m benchmarks.gpu_plan --method ce --preset cpu --gpu h100 --count 8

The CUDA plugin's PJRT client builds compile-only devices from a deviceless target
description (``jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=<GpuTargetConfigProto text>, topology="1x1xN")``), and
``jax.jit(...).lower(...).compile()`` then runs XLA's GPU pipeline for them (fusion,
cuDNN convolutions, SPMD partitioning, buffer assignment, code generation). The rest is
:mod:`benchmarks.tpu_plan`'s: the runner's own train and eval steps of the preset's
config, the same checks of the design's sharding promises, per-device memory against
the GPU's memory and a **roofline estimate** of the step time, never a measurement.

The GPU compiler reports no cost analysis; the FLOPs are XLA's count of the step as
written (before optimization, over the global batch) divided by the devices, and the
bytes are those of the compiled per-device program plus the operands and results of
its cuDNN and cuBLAS calls (which XLA's count leaves out). The FLOPs so count the
replicated optimizer update once over all devices, a few FLOPs per parameter short.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence

# The CUDA backend itself is never opened (there is no GPU), only its compiler; without
# this jax would also try to start it and stop at the missing CUDA libraries.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

from benchmarks.tpu_plan import (
    CIFAR_TRAIN_IMAGES,
    INPUT_IMAGES_PER_S_2_CORES,
    PRECISIONS,
    Slice,
    _batch,
    abstract,
    check_batch,
    markdown,
    preset_config,
)
from benchmarks.tpu_program import (
    _DTYPE_BYTES,
    PlanError,
    bn_channels,
    check_program,
    collectives,
    compiled_memory,
)
from experiments import cli

# Per GPU: published peak dense bf16 FLOP/s and memory bandwidth (NVIDIA's H100 SXM5 and
# A100 SXM4 80GB data sheets), and what the CUDA driver reports (the target description
# XLA compiles for: SMs, shared memory, L2, clock, memory size, compute capability).
GPUS = {
    "h100": {
        "name": "NVIDIA H100 80GB HBM3",
        "peak_flops": 989e12,
        "hbm_bw": 3.35e12,
        "compute_capability": (9, 0),
        "core_count": 132,
        "fpus_per_core": 128,
        "shared_memory_per_core": 233472,
        "shared_memory_per_block_optin": 232448,
        "l2_cache_size": 52428800,
        "clock_rate_ghz": 1.98,
        "device_memory_size": 84942979072,
    },
    "a100": {
        "name": "NVIDIA A100-SXM4-80GB",
        "peak_flops": 312e12,
        "hbm_bw": 2.039e12,
        "compute_capability": (8, 0),
        "core_count": 108,
        "fpus_per_core": 64,
        "shared_memory_per_core": 167936,
        "shared_memory_per_block_optin": 166912,
        "l2_cache_size": 41943040,
        "clock_rate_ghz": 1.41,
        "device_memory_size": 85100068864,
    },
}
# The same on every NVIDIA GPU since Volta.
_COMMON_LIMITS = {
    "threads_per_block_limit": 1024,
    "threads_per_warp": 32,
    "shared_memory_per_block": 49152,
    "threads_per_core_limit": 2048,
    "block_dim_limit_x": 2147483647,
    "block_dim_limit_y": 65535,
    "block_dim_limit_z": 65535,
    "registers_per_core_limit": 65536,
    "registers_per_block_limit": 65536,
}
_DEVICE_INFO_FIELDS = (
    "core_count",
    "fpus_per_core",
    "shared_memory_per_core",
    "shared_memory_per_block_optin",
    "l2_cache_size",
    "clock_rate_ghz",
    "device_memory_size",
)


def target_config(gpu: str) -> str:
    """``gpu``'s deviceless target description, a ``stream_executor.GpuTargetConfigProto``
    in text format (the fields XLA's GPU compiler reads)."""
    spec = GPUS[gpu]
    info = {**_COMMON_LIMITS, **{k: spec[k] for k in _DEVICE_INFO_FIELDS}}
    info["memory_bandwidth"] = int(spec["hbm_bw"])
    major, minor = spec["compute_capability"]
    lines = [f"  {key}: {value}" for key, value in info.items()]
    return (
        "gpu_device_info {\n"
        + "\n".join(lines)
        + f"\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
        f'platform_name: "CUDA"\n'
        # cuDNN 9.8, the oldest the CUDA 12 plugin of jax 0.10.2 accepts.
        "dnn_version_info { major: 9 minor: 8 patch: 0 }\n"
        f'device_description_str: "{spec["name"]}"\n'
    )


def gpu_slice(gpu: str, count: int) -> Slice:
    """``count`` compile-only CUDA devices of one host; needs ``jax-cuda12-plugin``."""
    from jax.experimental import topologies

    if gpu not in GPUS:
        raise PlanError(f"--gpu {gpu!r}: choose from {','.join(GPUS)}.")
    try:
        topology = topologies.get_topology_desc(
            gpu, "cuda", target_config=target_config(gpu), topology=f"1x1x{count}"
        )
    except Exception as err:  # NotImplementedError without the plugin, XlaRuntimeError
        raise PlanError(
            f"--gpu {gpu}: XLA's CUDA compiler is not available or refused the target "
            f"({str(err).splitlines()[0][:160]}); install it with pip install "
            '"jax-cuda12-plugin==0.10.2", and without CUDA libraries start jax with '
            "JAX_PLATFORMS=cpu (the plugin's CUDA check then skips)."
        ) from None
    return Slice(f"{gpu}:{count}", gpu, tuple(topology.devices), 1)


# One instruction of an HLO module's text: name, result shape(s), opcode, operands.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (.+?) ([\w-]+)\((.*?)\)")


def _shape_bytes(shape: str) -> int:
    return sum(
        _DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape)
        if dtype not in ("u8", "s8")  # cuDNN's and cuBLAS's scratch, not data they access
    )


def custom_call_bytes(hlo: str) -> int:
    """Bytes of the operands and results of a compiled GPU program's library calls (cuDNN
    convolutions, cuBLAS matmuls): XLA's cost model counts none for a custom call."""
    results, total = {}, 0
    for line in hlo.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, operands = match.groups()
        results[name] = _shape_bytes(shape)
        if opcode == "custom-call":
            names = re.findall(r"%([\w.-]+)", operands)
            total += results[name] + sum(results[n] for n in names)
    return total


def gpu_cost(lowered, compiled, devices: int) -> dict:
    """FLOPs and bytes per device per step (see the module docstring for why this way)."""
    from jax._src.lib import xla_client

    cpu = jax.devices("cpu")[0].client  # only XLA's cost model runs on it
    written = xla_client._xla.hlo_module_cost_analysis(
        cpu, lowered.compiler_ir("hlo").get_hlo_module()
    )
    optimized = xla_client._xla.hlo_module_cost_analysis(
        cpu, compiled.runtime_executable().hlo_modules()[0]
    )
    library = custom_call_bytes(compiled.as_text())
    return {
        "flops": float(written["flops"]) / devices,
        "bytes_accessed": float(optimized["bytes accessed"]) + library,
    }


def plan(method: str, preset: str, gpu: str, count: int, precision: str = "bfloat16") -> dict:
    """Compiles ``method``'s ``preset`` train and eval steps for ``count`` ``gpu``s."""
    from experiments.run_config import eval_batch_size
    from experiments.steps import make_run_optimizer, make_run_steps
    from experiments.workdir import model_identity
    from ood_jax import sharding
    from ood_jax.models import build_model
    from ood_jax.train import create_train_state, get_objective

    config = preset_config(method, preset, precision)
    gpus = gpu_slice(gpu, count)
    check_batch(config, gpus)
    mesh = sharding.make_mesh(devices=gpus.devices)
    batch = config.train.batch_size
    optimizer = make_run_optimizer(config, CIFAR_TRAIN_IMAGES // batch)
    model_def, state = create_train_state(
        build_model(model_identity(config, 10), 0), optimizer.tx, seed=0
    )
    train_step, eval_step = make_run_steps(config, model_def, optimizer, mesh)
    state_abs = abstract(state, sharding.replicated(mesh))
    data = sharding.batch_sharding(mesh)
    outliers = get_objective(config.objective.name).uses_outliers
    aux = _batch(batch * config.data.outliers.ratio, data, labels=False) if outliers else None
    start = time.perf_counter()
    lowered = train_step.jitted.lower(state_abs, _batch(batch, data), aux)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    name = f"{method}/{preset} on {gpus.name}"
    checks = check_program(compiled, state, bn_channels=bn_channels(state.batch_stats), name=name)
    memory, cost, spec = compiled_memory(compiled), gpu_cost(lowered, compiled, count), GPUS[gpu]
    if memory["peak_bytes"] > spec["device_memory_size"]:
        raise PlanError(
            f"{name}: needs {memory['peak_bytes'] / 2**30:.1f} GiB per device, the GPU has "
            f"{spec['device_memory_size'] / 2**30:.1f} GiB; lower --config.train.batch_size."
        )
    eval_batch = eval_batch_size(config, mesh)
    eval_lowered = eval_step.lower(state_abs, _batch(eval_batch, data))
    eval_compiled = eval_lowered.compile()
    step_s = max(cost["flops"] / spec["peak_flops"], cost["bytes_accessed"] / spec["hbm_bw"])
    return {
        "method": method,
        "preset": preset,
        "topology": gpus.name,
        "versions": _versions(),
        "devices": count,
        "processes": 1,
        "precision": precision,
        "global_batch": batch,
        "compile_s": compile_s,
        "memory": memory,
        "hbm_per_device": spec["device_memory_size"],
        "cost": cost,
        "collectives": collectives(compiled.as_text()),
        "checks": checks,
        "eval": {
            "batch": eval_batch,
            "memory": compiled_memory(eval_compiled),
            "cost": gpu_cost(eval_lowered, eval_compiled, count),
        },
        "estimate": {
            "step_s": step_s,
            "images_per_s": batch / step_s,
            "epoch_s": optimizer.steps_per_epoch * step_s,
            "total_s": optimizer.num_steps * step_s,
            "input_images_per_s_per_host": batch / step_s,
            "input_bound_on_2_cores": batch / step_s > INPUT_IMAGES_PER_S_2_CORES,
        },
    }


def _versions() -> str:
    from importlib import metadata

    try:
        plugin = metadata.version("jax-cuda12-plugin")
    except metadata.PackageNotFoundError:
        plugin = "unknown"
    return f"jax {jax.__version__}, jax-cuda12-plugin {plugin}"


def main(argv: Sequence[str] | None = None) -> dict:
    from experiments.configs import methods

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="ce", choices=methods.METHODS)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--gpu", default="h100", choices=tuple(GPUS))
    parser.add_argument("--count", type=int, default=8, help="GPUs on the one host")
    parser.add_argument("--precision", default="bfloat16", choices=PRECISIONS)
    args = parser.parse_args(argv)
    if args.preset not in methods.presets_of(args.method):
        raise cli.UsageError(
            f"--preset {args.preset!r}: {args.method} has {methods.presets_of(args.method)}."
        )
    if args.count < 1:
        raise cli.UsageError(f"--count {args.count}: at least one GPU.")
    try:
        row = plan(args.method, args.preset, args.gpu, args.count, args.precision)
    except PlanError as err:
        raise cli.UsageError(str(err)) from None
    header = {
        "command": "python -m benchmarks.gpu_plan " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": row["versions"],
    }
    table = markdown([row], header).splitlines()[1:]  # tpu_plan's table under a GPU title
    print("\n".join(["# Compile-only GPU plan of a preset's train step", *table]))
    return row


if __name__ == "__main__":
    cli.run_main(main, sys.argv[1:])
