"""Compile-only TPU plans of a preset's real steps: does it fit, shard, and how long would it take?

    pip install "jax[tpu]==0.10.2"        # or: pip install -e ".[tpu]" (adds libtpu)
    python -m experiments.plan.tpu --method logitnorm --preset paper --topology v5e:4x4
    python -m experiments.plan.tpu --all --output results/plans/tpu_plan
    python -m experiments.plan.tpu --method l2norm --topology v5e:4x4 \
        --config.train.batch_size=2048     # the runner's overrides: plan your own run
    python -m experiments.plan.tpu --eval --method logitnorm,l2norm \
        --output results/plans/tpu_eval_plan    # the evaluation's functions

XLA's TPU compiler (libtpu) runs on a CPU-only machine through its compile-only
client: ``jax.experimental.topologies.get_topology_desc`` describes a slice of
any size, and ``jax.jit(...).lower(...).compile()`` builds the real TPU program
for it. What is compiled (:func:`experiments.plan.core.plan_steps`, as for GPUs by
:mod:`experiments.plan.gpu`) is the runner's own train and eval step
(:mod:`experiments.steps`, the functions ``python -m experiments.cifar10_<method>``
executes) with the preset's real config: model, batch, outliers, attack steps,
spectral norm, dropout, precision. From the compiled program this reports
per-device memory against the chip's HBM, XLA's FLOP and byte counts, the
collectives, and checks the sharding the design promises (batch split over
``data``, state replicated and donated, one gradient all-reduce, BatchNorm
statistics reduced over the global batch). The step time is a **roofline
estimate** (max of FLOPs / peak FLOP/s and bytes / HBM bandwidth, from the
chips' published figures), never a measurement. ``--eval`` compiles the
evaluation's jitted functions instead (:mod:`experiments.plan.tpu_eval`).

Multi-host slices (``v5e:4x4``: 4 hosts, ``v6e:2x4``: 2) cannot be fed the way the
runner feeds them, so the per-host data path is checked, not run. The runner hands
each host's slice of the batch to ``jax.make_array_from_process_local_data``
(:func:`ood_jax.sharding.global_batch`); here there is one real process
(``jax.process_count() == 1``), where that function requires the global shape to be
the local one and then places the data with ``device_put``, which the compile-only
client refuses ("MakeArraysFromHostBufferShards not available with compile-only
client": it has no device memory). The step is therefore lowered from
``ShapeDtypeStruct`` s of the global batch with the batch sharding (the array that
function returns), and :func:`experiments.plan.core.check_process_rows` checks what
the per-host path rests on: under that sharding, every host's devices (their
``process_index`` in the topology) hold exactly the per-host batch (global batch /
hosts) each host reads, which is the local shape ``make_array_from_process_local_data``
maps onto them.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence

# Compile-only: no TPU is opened, so several plans (or a plan beside a test) may load
# libtpu at once; without this, the second one stops at libtpu's process lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax

from experiments import cli, methods
from experiments.plan import core as plan_core
from experiments.plan import table as plan_table
from experiments.plan import tpu_eval
from experiments.plan.core import PRECISIONS, listed, preset_config, tpu_slice
from experiments.plan.program import CHIPS, compiled_cost

TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5e:4x4", "v6e:2x4")
TITLE = "Compile-only TPU plans of the presets' train steps"


def plan(
    method: str,
    preset: str,
    topology: str,
    precision: str = "bfloat16",
    overrides: Sequence[str] = (),
) -> dict:
    """Compiles ``method``'s ``preset`` train and eval steps for ``topology``, with the
    runner's ``--config.<field>=<value>`` ``overrides``."""
    return plan_core.plan_preset(
        method,
        preset,
        precision,
        overrides,
        tpu_slice(topology),
        chips=CHIPS,
        cost_fn=lambda lowered, compiled: compiled_cost(compiled),
        versions=f"jax {jax.__version__}, libtpu {plan_table.libtpu_version()}",
    )


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any --config.<field>=<value> the runner takes (python -m "
        "experiments.cifar10_<method> --help) changes the planned preset the same way.",
    )
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
        help="the evaluation's jitted functions instead (experiments.plan.tpu_eval), one row "
        "per model of the methods' presets",
    )
    parser.add_argument("--output", default="", help="write (or add to) OUTPUT.md, OUTPUT.json")
    parser.add_argument(
        "--in_process",
        action="store_true",
        help="plan every row in this process (default with several rows: one process per "
        "row, so that a compiler crash is an error row, not the end of the table)",
    )
    args, overrides = parser.parse_known_args(argv)
    cli.split_overrides(overrides)  # anything but --config.<field>=<value> is refused
    names = {
        "method": methods.METHODS if args.all else listed(args.method),
        "topology": TOPOLOGIES if args.all else listed(args.topology),
        "precision": listed(args.precision),
    }
    preset = "paper" if args.all else args.preset
    allowed = {"method": methods.METHODS, "precision": PRECISIONS}
    plan_core.check_choices(names, allowed, preset=preset)
    overrides = tuple(overrides)
    for method in names["method"]:  # a bad override: one line, before any compile
        preset_config(method, preset, names["precision"][0], overrides)
    runs = [
        (m, preset, t, p, overrides)
        for m in names["method"]
        for t in names["topology"]
        for p in names["precision"]
    ]
    command = "python -m experiments.plan.tpu " + " ".join(argv or sys.argv[1:])
    if args.eval:
        key_fields, table = tpu_eval.KEY, tpu_eval.markdown
        keyed, plan_here = tpu_eval.keyed_runs(runs), tpu_eval.plan_eval
    else:
        key_fields = ("method", "preset", "topology", "precision", "overrides")
        table = functools.partial(plan_core.markdown, title=TITLE)
        keyed = [
            (dict(zip(key_fields, (*run[:4], plan_core.overrides_label(run[4])), strict=True)), run)
            for run in runs
        ]
        plan_here = plan
    # With several rows, each row in a process of its own unless --in_process.
    isolate = len(keyed) > 1 and not args.in_process
    jobs = [
        (
            fields,
            _isolated(*run, eval_=args.eval) if isolate else functools.partial(plan_here, *run),
        )
        for fields, run in keyed
    ]
    return plan_table.run_rows(
        jobs, key_fields=key_fields, markdown=table, output=args.output, command=command
    )


def _isolated(
    method: str,
    preset: str,
    topology: str,
    precision: str,
    overrides: Sequence[str],
    *,
    eval_: bool,
):
    """The plan of one row in a process of its own (:func:`plan_table.isolated`)."""
    args = ["--method", method, "--preset", preset, "--topology", topology]
    args += ["--precision", precision, *overrides] + (["--eval"] if eval_ else [])
    return plan_table.isolated("experiments.plan.tpu", args)


if __name__ == "__main__":
    cli.run_main(main, sys.argv[1:])
