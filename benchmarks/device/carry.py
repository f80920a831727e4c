"""What travels to the lent GPU machine: the offline CIFAR-10 (JPEG) files it trains on, and
whether the working tree plus the carried folder fits the 64 MiB a call may send.

Run by ``benchmarks/device/prepare.sh`` (which also downloads the wheels)::

    python -m benchmarks.device.carry --src ../shared/data --dest .device_carry/data

The training split that travels is the regime study's ``subset10k`` recipe's: the seeded
random 10,000 of the 50,000 training images that ``--config.data.train_limit=10000``
keeps (:func:`ood_jax.data.dataset.subset_indices`, seed 0), in file order, so a run on the
device with that limit trains on the same images in the same order as the CPU pilot.
The test split travels whole. The JPEG bytes are unchanged; the archives are written
with zip deflate (``np.savez_compressed``), which shrinks the 32x32 JPEGs' repeated
headers and which every ``np.load`` reads as it is.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# What one call may send: the working tree (tracked and untracked-not-ignored files) and
# the carried paths together.
TRAVEL_LIMIT = 64 * 2**20
TRAIN_LIMIT = 10_000
SEED = 0
FILES = ("cifar10_train.npz", "cifar10_test.npz")


def subset_rows(src: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The encoded-file arrays (``encoded``, ``offsets``, ``labels``, ``label_names``) of
    ``rows`` (in the order given), each image's bytes unchanged."""
    offsets, encoded = src["offsets"], src["encoded"]
    sizes = offsets[rows + 1] - offsets[rows]
    new_offsets = np.zeros(len(rows) + 1, dtype=offsets.dtype)
    np.cumsum(sizes, out=new_offsets[1:])
    chunks = [encoded[offsets[r] : offsets[r + 1]] for r in rows]
    return {
        "encoded": np.concatenate(chunks) if chunks else encoded[:0],
        "offsets": new_offsets,
        "labels": src["labels"][rows],
        "label_names": src["label_names"],
    }


def write_split(src: Path, dest: Path, limit: int = 0, seed: int = SEED) -> int:
    """Writes ``src``'s images (a seeded random ``limit`` of them if ``0 < limit <`` its
    size, in file order) to ``dest``, compressed; returns the number written. A ``dest``
    newer than ``src`` with that many images is kept (the preparation is idempotent)."""
    from ood_jax.data.dataset import subset_indices

    with np.load(src, allow_pickle=False) as f:
        total = f["labels"].size
        count = limit if 0 < limit < total else total
        if dest.is_file() and dest.stat().st_mtime >= src.stat().st_mtime:
            with np.load(dest, allow_pickle=False) as done:
                if done["labels"].size == count:
                    return count
        arrays = {k: f[k] for k in f.files}
    rows = subset_indices(total, count, seed=seed) if count < total else np.arange(total)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **subset_rows(arrays, rows))
    os.replace(tmp, dest)
    return count


def travelling_bytes(repo: Path) -> int:
    """Bytes of what a call sends besides ``carry``: the tracked files and the untracked
    files git does not ignore (git's own listing)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout
    paths = {repo / p.decode() for p in out.split(b"\0") if p}
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.device.carry", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--src", default=os.path.join("..", "shared", "data"))
    parser.add_argument("--dest", default=os.path.join(".device_carry", "data"))
    parser.add_argument("--carry", default=".device_carry", help="the folder named in carry")
    parser.add_argument(
        "--train_limit", type=int, default=TRAIN_LIMIT, help="training images (0 = all)"
    )
    args = parser.parse_args(argv)
    src, dest = Path(args.src), Path(args.dest)
    for name, limit in zip(FILES, (args.train_limit, 0), strict=True):
        count = write_split(src / name, dest / name, limit)
        size = (dest / name).stat().st_size
        print(f"{dest / name}: {count:,} images, {size / 2**20:.1f} MiB")
    tree, carried = travelling_bytes(Path.cwd()), folder_bytes(Path(args.carry))
    total = tree + carried
    print(
        f"travels: working tree {tree / 2**20:.1f} MiB + {args.carry} {carried / 2**20:.1f} MiB "
        f"= {total / 2**20:.1f} MiB of {TRAVEL_LIMIT / 2**20:.0f} MiB"
    )
    if total > TRAVEL_LIMIT:
        print(
            f"error: over the limit by {(total - TRAVEL_LIMIT) / 2**20:.1f} MiB: lower "
            "--train_limit, ignore the large untracked files (git status --short), or leave "
            "the published checkpoints out of the working tree for the call (benchmarks/"
            "device/README.md: git sparse-checkout)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
