"""What a notebook installs on a Colab runtime, and the run settings that suit it.

The notebooks' first cell calls :func:`install` from a fresh clone, before ood_jax is
installed, so this module imports neither jax nor ood_jax at import time (importing
ood_jax checks the jax and flax versions). The decision is :func:`install_commands`, a
pure function of the runtime (its accelerator, its installed distributions, whether
TensorFlow is importable) and of the checkout's ``setup.cfg`` (the supported ranges)
and ``requirements.txt`` (the tested pins):

- the runtime's jax is kept when it is in the supported range and is the build for the
  runtime's accelerator (``libtpu`` on TPU, a matching ``jax-cuda12-plugin`` on GPU);
- otherwise the tested version's accelerator build is installed
  (``jax[tpu]==0.10.2``, ``jax[cuda12]==0.10.2``, or ``jax==0.10.2`` on CPU);
- ood_jax is installed from the checkout with the kept or installed jax pinned, and
  the ``prepare`` extra (TensorFlow for CPU, to prepare tfds datasets once) only where
  no TensorFlow is importable: Colab's GPU and CPU runtimes have their own.
"""

from __future__ import annotations

import configparser
import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from packaging.requirements import Requirement

# The jax extra that installs each accelerator's build.
JAX_EXTRA = {"tpu": "tpu", "gpu": "cuda12", "cpu": None}
# Distributions an accelerator's jax build needs beside jax and jaxlib; the CUDA
# plugins must have jaxlib's version.
_PLUGINS = {"tpu": (), "gpu": ("jax-cuda12-plugin", "jax-cuda12-pjrt"), "cpu": ()}
_STALE_PLUGIN_PREFIXES = ("jax-cuda", "jax-rocm")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What the install decision looks at.

    Attributes:
      accelerator: ``"tpu"``, ``"gpu"`` or ``"cpu"``.
      packages: installed distributions, canonical name (``jax-cuda12-plugin``) -> version.
      has_tensorflow: whether ``import tensorflow`` would find a package.
    """

    accelerator: str
    packages: Mapping[str, str]
    has_tensorflow: bool


def _canonical_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``Jax_CUDA12.plugin`` ->
    ``jax-cuda12-plugin``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def detect_accelerator(environ: Mapping[str, str], dev_entries: Sequence[str]) -> str:
    """The runtime's accelerator from its environment and the names in ``/dev``.

    Colab's TPU VMs expose ``/dev/accel*`` (v2-v4) or numbered ``/dev/vfio/*`` entries
    (v5e, v6e, listed as ``vfio/0``) and set ``TPU_*`` or ``COLAB_TPU_ADDR``; GPUs
    expose ``/dev/nvidia0``.
    """
    if any(key in environ for key in ("COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE", "TPU_NAME")):
        return "tpu"
    if any(re.fullmatch(r"accel\d+|vfio/\d+", entry) for entry in dev_entries):
        return "tpu"
    if any(re.fullmatch(r"nvidia\d+", entry) for entry in dev_entries):
        return "gpu"
    return "cpu"


def inspect_runtime() -> Runtime:
    """This machine's :class:`Runtime`."""
    dev = Path("/dev")
    entries = [p.name for p in dev.glob("*")] if dev.is_dir() else []
    if (dev / "vfio").is_dir():
        entries += [f"vfio/{p.name}" for p in (dev / "vfio").iterdir()]
    packages = {
        _canonical_name(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions()
        if d.metadata["Name"]
    }
    return Runtime(
        accelerator=detect_accelerator(os.environ, entries),
        packages=packages,
        has_tensorflow=importlib.util.find_spec("tensorflow") is not None,
    )


def _requirements(repo: Path) -> tuple[dict[str, Requirement], list[Requirement]]:
    """``setup.cfg``'s install requirements by name, and its ``prepare`` extra."""
    cfg = configparser.ConfigParser()
    cfg.read(repo / "setup.cfg")

    def parse(text: str) -> list[Requirement]:
        return [Requirement(line) for line in text.splitlines() if line.strip()]

    required = {r.name: r for r in parse(cfg["options"]["install_requires"])}
    return required, parse(cfg["options.extras_require"]["prepare"])


def tested_version(repo: Path, name: str) -> str:
    """The version of ``name`` pinned (``name==X``) in the checkout's requirements.txt."""
    for line in (repo / "requirements.txt").read_text().splitlines():
        requirement, _, _ = line.partition("#")
        if requirement.strip().startswith(f"{name}=="):
            return requirement.strip().split("==", 1)[1]
    raise ValueError(f"{repo / 'requirements.txt'} pins no {name}")


def _keeps_jax(runtime: Runtime, supported: Requirement) -> bool:
    version = runtime.packages.get("jax")
    if version is None or not supported.specifier.contains(version, prereleases=True):
        return False
    if runtime.packages.get("jaxlib") != version:
        return False
    if runtime.accelerator == "tpu" and "libtpu" not in runtime.packages:
        return False
    return all(runtime.packages.get(p) == version for p in _PLUGINS[runtime.accelerator])


def install_commands(
    runtime: Runtime, repo: str | os.PathLike, *, prepare: bool
) -> list[list[str]]:
    """The pip commands (arguments after ``pip``) that install ood_jax on ``runtime``.

    Args:
      runtime: what is installed (:func:`inspect_runtime`).
      repo: the checkout to install, as pip should name it (``"."`` from inside it).
      prepare: whether the notebook prepares tfds datasets (needs TensorFlow once).
    """
    repo_path = Path(repo)
    required, prepare_extra = _requirements(repo_path)
    commands = []
    jax_version = runtime.packages.get("jax")
    if not _keeps_jax(runtime, required["jax"]):
        jax_version = tested_version(repo_path, "jax")
        wanted = set(_PLUGINS[runtime.accelerator])
        stale = sorted(
            name
            for name in runtime.packages
            if name.startswith(_STALE_PLUGIN_PREFIXES) and name not in wanted
        )
        if stale:
            commands.append(["uninstall", "-y", *stale])
        extra = JAX_EXTRA[runtime.accelerator]
        jax = f"jax[{extra}]" if extra else "jax"
        commands.append(["install", "-q", f"{jax}=={jax_version}"])
    target, extras = str(repo), []
    if prepare and not runtime.has_tensorflow:
        target = f"{repo}[prepare]"
    elif prepare:
        # Never a second TensorFlow beside the runtime's: the extra's other packages only.
        extras = [str(r) for r in prepare_extra if not r.name.startswith("tensorflow")]
    commands.append(["install", "-q", "-e", target, f"jax=={jax_version}", *extras])
    return commands


def install(repo: str = ".", *, prepare: bool) -> list[list[str]]:
    """Run :func:`install_commands` for this machine with this interpreter's pip; returns them."""
    runtime = inspect_runtime()
    commands = install_commands(runtime, repo, prepare=prepare)
    print(f"{runtime.accelerator} runtime, jax {runtime.packages.get('jax', 'not installed')}")
    for command in commands:
        print("pip", " ".join(command))
        subprocess.run([sys.executable, "-m", "pip", *command], check=True)
    required, _ = _requirements(Path(repo))
    if "jax" in sys.modules and not _keeps_jax(runtime, required["jax"]):
        print("jax was imported before it changed: restart the session, then run on.")
    return commands


def notebook_run_args(backend: str, data: str, *, smoke: bool) -> list[str]:
    """The quick-start notebook's training flags for a JAX ``backend`` and ``--data``.

    Smoke: the ``smoke`` preset with its file-free OOD sets. Otherwise the ``cpu``
    preset (TPU/GPU: 30 epochs), and the OOD sets that ``data`` can serve: CIFAR-10's
    default suite for that source (from tfds only with tfds data, so that no run
    waits for files it cannot have) plus the synthetic sets.
    """
    from ood_jax import data as D  # here: install() must run before ood_jax is installed

    if smoke:
        return ["--preset=smoke", "--config.eval.ood=true", f"--data={data}"]
    args = ["--preset=cpu"]
    if backend in ("tpu", "gpu"):
        args.append("--config.train.epochs=30")
    ood_sets = (*D.get_dataset_spec("cifar10").default_ood_sets(data), *D.SYNTHETIC_OOD_SETS)
    return [*args, f"--config.eval.ood_sets={','.join(ood_sets)}", f"--data={data}"]
