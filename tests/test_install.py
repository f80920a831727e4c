"""A non-editable install (``pip install .``) holds every command the docs name.

The package is built from a copy of the sources and installed into a folder of its
own, then imported from there, away from the checkout: a module the docs name but
the package does not ship (the planner once lived in an unpackaged ``benchmarks/``)
fails here.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    *sorted((ROOT / "results").rglob("README.md")),
]


def documented_commands() -> list[str]:
    """Every ``python -m experiments.<module>`` the README and docs show."""
    found = set()
    for page in DOCUMENTED:
        found.update(
            re.findall(r"python -m (experiments(?:\.[a-z_0-9]+)+)(?![a-z_0-9<.])", page.read_text())
        )
    return sorted(found)


def test_the_docs_name_the_commands_users_run():
    commands = documented_commands()
    for expected in (
        "experiments.cifar10_logitnorm",
        "experiments.evaluate",
        "experiments.plan.tpu",
    ):
        assert expected in commands


@pytest.mark.slow
def test_a_non_editable_install_runs_every_documented_command(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("ood_jax", "experiments"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(target), str(source)], check=True, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(target)}
    for variable in ("OOD_JAX_DATA_DIR", "OOD_JAX_PRETRAINED"):
        env.pop(variable, None)
    commands = documented_commands()
    code = (
        "import importlib, sys\n"
        f"for name in {commands!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(target)!r}), module.__file__\n"
        "print('imported', len(sys.argv))\n"
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=work, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for command in (
        "experiments.cifar10_energy_ft",
        "experiments.evaluate",
        "experiments.plan.tpu",
    ):
        help_ = subprocess.run(
            [sys.executable, "-m", command, "--help"],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
        )
        assert help_.returncode == 0 and "usage:" in help_.stdout, (command, help_.stderr[-2000:])
