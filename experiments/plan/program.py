"""What a compiled TPU program says: memory, cost, collectives, and the design's promises.

Helpers of :mod:`experiments.plan.core`, on the ``jax.stages.Compiled`` object of a
train step compiled for compile-only devices (TPU, and GPU: :mod:`experiments.plan.gpu`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

# Published per-chip figures (Google Cloud TPU documentation, "System architecture"
# pages of v4, v5e and v6e): peak bf16 FLOP/s, HBM bytes, HBM bytes/s.
CHIPS = {
    "v4": {"peak_flops": 275e12, "hbm_bytes": 32 * 2**30, "hbm_bw": 1200e9},
    "v5e": {"peak_flops": 197e12, "hbm_bytes": 16e9, "hbm_bw": 819e9},
    "v6e": {"peak_flops": 918e12, "hbm_bytes": 32e9, "hbm_bw": 1640e9},
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


class PlanError(ValueError):
    """A preset that cannot run as planned on a topology (one line: what to change)."""


FLOAT_DTYPES = ("f32", "bf16", "f16", "f64")


def collectives(hlo: str, *, dtypes: tuple[str, ...] | None = None) -> list[dict]:
    """The collectives of a compiled HLO module: op, count and bytes of their results
    (only the results of ``dtypes``, e.g. :data:`FLOAT_DTYPES`, when given)."""
    found: dict[str, dict] = {}
    for line in hlo.splitlines():
        match = re.search(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not match or "-done(" in line:
            continue
        shapes = re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", match.group(1))
        if dtypes is not None:
            shapes = [(dtype, dims) for dtype, dims in shapes if dtype in dtypes]
            if not shapes:
                continue
        sizes = [
            (dtype, int(np.prod([int(d) for d in dims.split(",") if d]))) for dtype, dims in shapes
        ]
        entry = found.setdefault(
            match.group(2), {"op": match.group(2), "count": 0, "elements": 0, "bytes": 0}
        )
        entry["count"] += 1
        entry["elements"] += sum(n for _, n in sizes)
        entry["bytes"] += sum(DTYPE_BYTES.get(dtype, 4) * n for dtype, n in sizes)
    return list(found.values())


def _nbytes(tree: Any) -> int:
    return int(
        sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    )


def check_program(compiled, state, *, bn_channels: int, name: str) -> dict:
    """What the design promises, read from the compiled train step; a broken promise is
    a :class:`PlanError`. Returns the facts checked."""
    # (state, batch, outliers), and with the data on the device the splits: the batch is
    # then the steps' plans, split over ``data`` as a batch is.
    (state_in, batch_in, *_), _ = compiled.input_shardings
    for leaf in jax.tree.leaves(batch_in):
        if tuple(leaf.spec)[:1] != ("data",):
            raise PlanError(f"{name}: the batch is not sharded over 'data' (got {leaf.spec}).")
    for leaf in jax.tree.leaves(state_in):
        if not leaf.is_fully_replicated:
            raise PlanError(
                f"{name}: the train state must be replicated, found a leaf sharded as "
                f"{leaf.spec}; shard only the batch (ood_jax.sharding.replicated for the state)."
            )
    num_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(state.params))
    # Elements, not bytes: with bf16 compute XLA may all-reduce the gradients in bf16.
    # Floating-point ones only: a step with the data on the device also sums the batch's
    # rows (integer words), which XLA's TPU compiler makes an all-reduce.
    reduced = sum(
        c["elements"]
        for c in collectives(compiled.as_text(), dtypes=FLOAT_DTYPES)
        if c["op"] == "all-reduce"
    )
    if reduced < num_params:
        raise PlanError(f"{name}: no gradient all-reduce ({reduced} < {num_params} elements).")
    if reduced >= 2 * num_params:
        raise PlanError(
            f"{name}: the gradients are all-reduced more than once ({reduced} elements)."
        )
    # BatchNorm over the global batch: its forward pass all-reduces a mean and a mean of
    # squares per channel. XLA merges the backward pass's per-channel sums with the
    # scale and bias gradients they equal, and in float32 folds a few more (ResNet-18:
    # 8,708 elements beyond the 11.17M parameters for 4,800 channels, against 13,508 in
    # bf16), so at least one element per channel beyond the parameters is required;
    # without the reduction nothing but the gradients (and a few metrics) is reduced.
    if reduced - num_params < bn_channels:
        raise PlanError(f"{name}: BatchNorm statistics are not reduced across devices.")
    memory = compiled.memory_analysis()
    params_bytes = _nbytes(state.params)
    if memory.alias_size_in_bytes < params_bytes:
        raise PlanError(
            f"{name}: the train state is not donated (aliased {memory.alias_size_in_bytes})."
        )
    return {
        "batch_sharded": True,
        "state_replicated": True,
        "all_reduced_elements": reduced,
        "params": num_params,
        "donated_bytes": memory.alias_size_in_bytes,
    }


def lowered_arguments(stablehlo: str) -> list[dict]:
    """The entry function's arguments of a lowered (Shardy) StableHLO module: each one's
    ``dims`` (the mesh axes each dimension is split over, ``[]`` when not split) and
    whether it is donated (``aliased``: paired with an output, or a buffer donor)."""
    header = re.search(r"func\.func public @main\((.*?)\)\s*->", stablehlo, re.S)
    if header is None:
        raise ValueError("no public @main function in the lowered module")
    out = []
    for attrs in re.split(r"%arg\d+:", header.group(1))[1:]:
        spec = re.search(r"#sdy\.sharding<@\w+, \[(.*?)\]>", attrs)
        dims = re.findall(r"\{([^{}]*)\}", spec.group(1)) if spec else []
        out.append(
            {
                "dims": [re.findall(r'"(\w+)"', d) for d in dims],
                # Donated: aliased to an output now, or left for XLA to pair.
                "aliased": "tf.aliasing_output" in attrs or "jax.buffer_donor = true" in attrs,
            }
        )
    return out


def check_lowered(lowered, state, *, name: str) -> dict:
    """The design's promises read from a lowered train step ``(state, batch, outliers)``
    (with the data on the device: ``(state, plan, outliers' plan, splits)``), before any
    compile: every state leaf replicated and donated, every batch, plan and split leaf
    split over ``data`` along its first dimension. A broken one is a :class:`PlanError`."""
    args = lowered_arguments(lowered.as_text())
    (state_info, *_), _ = lowered.args_info
    n_state = len(jax.tree.leaves(state_info))
    if n_state != len(jax.tree.leaves(state)) or len(args) != len(
        jax.tree.leaves(lowered.args_info)
    ):
        raise PlanError(f"{name}: the lowered step's arguments are not (state, batch, outliers).")
    split = next((a["dims"] for a in args[:n_state] if any(a["dims"])), None)
    if split is not None:
        raise PlanError(
            f"{name}: a train state leaf is split as {split}; the state must be "
            "replicated (ood_jax.sharding.replicated)."
        )
    if not all(a["aliased"] for a in args[:n_state]):
        raise PlanError(f"{name}: a train state leaf is not donated to the new state.")
    for arg in args[n_state:]:
        if not arg["dims"] or arg["dims"][0] != ["data"] or any(arg["dims"][1:]):
            raise PlanError(f"{name}: a batch leaf is split as {arg['dims']}, not over 'data'.")
    return {"state_leaves": n_state, "batch_leaves": len(args) - n_state}


def bn_channels(batch_stats: Any) -> int:
    """BatchNorm channels: the size of every running ``mean`` (spectral norm's power
    iteration vectors ``u`` live beside them but are not reduced across devices)."""
    leaves = jax.tree_util.tree_flatten_with_path(batch_stats)[0]
    return sum(int(np.prod(np.shape(x))) for path, x in leaves if "mean" in str(path[-1]))


def compiled_memory(compiled) -> dict:
    m = compiled.memory_analysis()
    return {
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "peak_bytes": m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes,
        # XLA's own peak: on TPU, temp_size is 0 for some programs that do need scratch
        # memory (an eval-mode forward, ODIN) while this counts it.
        "xla_peak_bytes": getattr(m, "peak_memory_in_bytes", 0),
    }


def compiled_cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
    }


def required_bytes(memory: dict) -> float:
    """The memory a program needs per device: the larger of its two peaks (rows planned
    before XLA's own peak was kept lack it)."""
    return max(memory["peak_bytes"], memory.get("xla_peak_bytes", 0))


def roofline(cost: dict, chip: str, *, chips: Mapping[str, dict] = CHIPS) -> float:
    """Estimated seconds per step per device: max(compute-bound, memory-bound), from
    ``chips[chip]``'s ``peak_flops`` and ``hbm_bw``."""
    spec = chips[chip]
    return max(cost["flops"] / spec["peak_flops"], cost["bytes_accessed"] / spec["hbm_bw"])
