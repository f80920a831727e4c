"""Compile-only GPU plans of a preset's real steps: XLA's CUDA compiler without a GPU.

    pip install "jax-cuda12-plugin==0.10.2"   # the plugin alone: no CUDA wheels, no driver
    python -m experiments.plan.gpu --method ce --preset cpu --gpu h100 --count 8
    python -m experiments.plan.gpu --method logitnorm,l2norm --preset paper --gpu h100,a100 \
        --precision bfloat16,float32 --output results/plans/gpu_plan

The CUDA plugin's PJRT client builds compile-only devices from a deviceless target
description (``jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=<GpuTargetConfigProto text>, topology="1x1xN")``), and
``jax.jit(...).lower(...).compile()`` then runs XLA's GPU pipeline for them (fusion,
cuDNN convolutions, SPMD partitioning, buffer assignment, code generation). The rest is
:func:`experiments.plan.core.plan_steps`, as for TPUs: the runner's own train and eval
steps of the preset's config, the same checks of the design's sharding promises,
per-device memory against the GPU's memory and a **roofline estimate** of the step
time, never a measurement.

The GPU compiler reports no cost analysis; the FLOPs are XLA's count of the step as
written (before optimization, over the global batch) divided by the devices, and the
bytes are those of the compiled per-device program plus the operands and results of
its cuDNN and cuBLAS calls (which XLA's count leaves out). The FLOPs so count the
replicated optimizer update once over all devices, a few FLOPs per parameter short.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from collections.abc import Sequence

# The CUDA backend itself is never opened (there is no GPU), only its compiler; without
# this jax would also try to start it and stop at the missing CUDA libraries.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

from experiments import cli, methods
from experiments.plan import core as plan_core
from experiments.plan import table as plan_table
from experiments.plan.core import PRECISIONS, Slice, listed, preset_config
from experiments.plan.program import DTYPE_BYTES, PlanError

TITLE = "Compile-only GPU plans of the presets' train steps"

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
    return Slice(f"{gpu}:{count}", gpu, tuple(topology.devices), 1, GPUS[gpu]["device_memory_size"])


# One instruction of an HLO module's text: name, result shape(s), opcode, operands.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (.+?) ([\w-]+)\((.*?)\)")


def _shape_bytes(shape: str) -> int:
    return sum(
        DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
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


def plan(
    method: str,
    preset: str,
    gpu: str,
    count: int,
    precision: str = "bfloat16",
    overrides: Sequence[str] = (),
) -> dict:
    """Compiles ``method``'s ``preset`` train and eval steps for ``count`` ``gpu``s, with
    the runner's ``--config.<field>=<value>`` ``overrides``."""
    return plan_core.plan_preset(
        method,
        preset,
        precision,
        overrides,
        gpu_slice(gpu, count),
        chips=GPUS,
        cost_fn=functools.partial(gpu_cost, devices=count),
        versions=_versions(),
    )


def _versions() -> str:
    from importlib import metadata

    try:
        plugin = metadata.version("jax-cuda12-plugin")
    except metadata.PackageNotFoundError:
        plugin = "unknown"
    return f"jax {jax.__version__}, jax-cuda12-plugin {plugin}"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any --config.<field>=<value> the runner takes changes the planned preset "
        "the same way.",
    )
    parser.add_argument("--method", default="ce", help="a method, or several: ce,oe")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--gpu", default="h100", help=f"one or several of {','.join(GPUS)}")
    parser.add_argument("--count", type=int, default=8, help="GPUs on the one host")
    parser.add_argument("--precision", default="bfloat16", help="bfloat16, float32 or both")
    parser.add_argument("--output", default="", help="write (or add to) OUTPUT.md, OUTPUT.json")
    args, overrides = parser.parse_known_args(argv)
    cli.split_overrides(overrides)  # anything but --config.<field>=<value> is refused
    names = {flag: listed(getattr(args, flag)) for flag in ("method", "gpu", "precision")}
    allowed = {"method": methods.METHODS, "gpu": tuple(GPUS), "precision": PRECISIONS}
    plan_core.check_choices(names, allowed, preset=args.preset)
    if args.count < 1:
        raise cli.UsageError(f"--count {args.count}: at least one GPU.")
    for method in names["method"]:  # a bad override: one line, before any compile
        preset_config(method, args.preset, names["precision"][0], overrides)
    key_fields = ("method", "preset", "topology", "precision", "overrides")
    label = plan_core.overrides_label(overrides)
    jobs = [
        (
            dict(zip(key_fields, (m, args.preset, f"{g}:{args.count}", p, label), strict=True)),
            functools.partial(plan, m, args.preset, g, args.count, p, tuple(overrides)),
        )
        for m in names["method"]
        for g in names["gpu"]
        for p in names["precision"]
    ]
    return plan_table.run_rows(
        jobs,
        key_fields=key_fields,
        markdown=functools.partial(plan_core.markdown, title=TITLE),
        output=args.output,
        command="python -m experiments.plan.gpu " + " ".join(argv or sys.argv[1:]),
        versions=_versions(),
    )


if __name__ == "__main__":
    cli.run_main(main, sys.argv[1:])
