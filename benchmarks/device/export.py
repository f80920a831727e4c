"""A training workdir's newest checkpoint as an ``ood_jax.pretrained`` file: the weights
that come back from the GPU machine (an orbax checkpoint with its optimizer state is
twice as large, and a WRN-40-2 one is over the 16 MiB a returned file may have)::

    python -m benchmarks.device.export --to $OUT/weights --run ce=WORK/ce --run logitnorm=WORK/ln

Back here, ``OOD_JAX_PRETRAINED=<folder> python -m experiments.evaluate --pretrained ce``
writes its OOD report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def export(workdir: str, folder: str, name: str) -> dict:
    """Writes ``<folder>/<name>.npz`` and its ``manifest.json`` entry; returns the entry."""
    from experiments.study.publish import export_weights
    from experiments.workdir import Workdir
    from ood_jax import data as D

    with Workdir(workdir) as run:
        _, params, batch_stats, metadata, step = run.restore()
    config = metadata["config"]
    spec = D.get_dataset_spec(config["data"]["dataset"])
    final_path = Path(workdir) / Workdir.FINAL
    final = json.loads(final_path.read_text()) if final_path.is_file() else {}
    return export_weights(
        folder,
        name,
        params,
        batch_stats,
        metadata,
        step,
        normalization={"mean": list(spec.mean), "std": list(spec.std)},
        method=config["objective"]["name"],
        seed=config["seed"],
        # A run stopped by its time limit has no final test pass.
        test_accuracy=final.get("test_accuracy") if final.get("step") == step else None,
        test_examples=final.get("test_examples"),
        run=f"gpu/{name}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.device.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--to", required=True, help="the pretrained folder (manifest.json)")
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        help="NAME=WORKDIR, repeated; NAME flat (no folders below --to)",
    )
    args = parser.parse_args(argv)
    failed = 0
    # One after another in one process: the runs share manifest.json.
    for item in args.run:
        name, _, workdir = item.partition("=")
        try:
            entry = export(workdir, args.to, name)
        except Exception as err:  # the other runs are still exported
            print(f"{name}: not exported: {type(err).__name__}: {err}", file=sys.stderr)
            failed += 1
            continue
        where = Path(args.to) / entry["file"]
        print(f"{name}: exported step {entry['step']} to {where} ({entry['bytes']:,} B)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
