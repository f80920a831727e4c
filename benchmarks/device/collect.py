"""Here, after the call: puts what came back from the GPU machine where it is committed::

    python -m benchmarks.device.collect /work/.device/<call>   # the reply's files_at

- ``benchmarks/results/check_device_<chip>.md`` and ``.json``: the check (issue 32);
- ``results/regime_study/gpu/<method>/``: each run's ``config.json``, ``metrics.jsonl``,
  ``final.json``, ``regime.jsonl`` (issue 31), beside the CPU study; ``summary.md``,
  ``steps.json`` and ``run.log`` of the command in ``results/regime_study/gpu/``;
- ``runs/gpu/weights/``: the exported weights (git-ignored; for
  ``OOD_JAX_PRETRAINED=runs/gpu/weights python -m experiments.evaluate --pretrained ce``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

RUN_FILES = ("config.json", "metrics.jsonl", "final.json", "regime.jsonl", "changes.jsonl")


def chip_name(device_kind: str) -> str:
    """``h100`` for "NVIDIA H100 80GB HBM3" (the plans' chip names), else the kind in
    lower case with ``_`` for anything but letters and digits."""
    from experiments.check_device import chip_of

    return chip_of(device_kind) or re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_")


def collect(files: Path, repo: Path) -> list[Path]:
    """Copies the returned ``files`` into ``repo``; returns the paths written."""
    written = []

    def put(src: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        written.append(dest)

    gpu = repo / "results" / "regime_study" / "gpu"
    with tempfile.TemporaryDirectory() as tmp:
        unpacked = Path(tmp)
        with tarfile.open(files / "results.tar.gz") as tar:
            tar.extractall(unpacked, filter="data")
        report = unpacked / "check_device" / "check_device.json"
        if report.is_file():
            chip = chip_name(json.loads(report.read_text())["environment"]["device_kind"])
            for suffix in (".md", ".json"):
                put(
                    unpacked / "check_device" / f"check_device{suffix}",
                    repo / "benchmarks" / "results" / f"check_device_{chip}{suffix}",
                )
        steps = json.loads((unpacked / "steps.json").read_text())
        put(unpacked / "steps.json", gpu / "steps.json")
        for method in steps["methods"]:
            for name in RUN_FILES:
                if (unpacked / method / name).is_file():
                    put(unpacked / method / name, gpu / method / name)
    for name in ("summary.md", "run.log"):
        if (files / name).is_file():
            put(files / name, gpu / name)
    for src in sorted((files / "weights").glob("*")):
        put(src, repo / "runs" / "gpu" / "weights" / src.name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.device.collect", description=__doc__.split("\n")[0]
    )
    parser.add_argument("files", help="the folder the returned files are in (files_at)")
    parser.add_argument("--repo", default=".", help="the checkout to put them in")
    args = parser.parse_args(argv)
    for path in collect(Path(args.files), Path(args.repo)):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
