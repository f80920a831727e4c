"""The notebooks' install decision on each Colab runtime, the supported versions, and
the quick-start notebook's data / OOD-set choice."""

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ood_jax
from experiments import colab_setup as C
from experiments.configs import eval_presets
from experiments.run_config import ood_set_names
from experiments.train import parse_args
from ood_jax import data as D

ROOT = Path(__file__).resolve().parents[1]


def packages(jax, *plugins, **others):
    """Installed distributions: jax and jaxlib of version ``jax``, plugins of the same."""
    found = {"jax": jax, "jaxlib": jax, **{p: jax for p in plugins}}
    found.update({name.replace("_", "-"): v for name, v in others.items()})
    return found


def commands(accelerator, installed, *, tensorflow, prepare=True):
    runtime = C.Runtime(accelerator, installed, tensorflow)
    return C.install_commands(runtime, ROOT, prepare=prepare)


def ood_jax_install(target="", *extra):
    return ["install", "-q", "-e", f"{ROOT}{target}", "jax==0.10.2", *extra]


# setup.cfg's prepare extra without TensorFlow, read by hand: importlib_resources>=6.
PREPARE_REST = "importlib_resources>=6"


def test_tpu_runtime_keeps_its_tested_jax_and_adds_tensorflow_only_there():
    tpu = packages("0.10.2", libtpu="0.0.42.1")
    assert commands("tpu", tpu, tensorflow=False) == [ood_jax_install("[prepare]")]
    assert commands("tpu", tpu, tensorflow=False, prepare=False) == [ood_jax_install()]


@pytest.mark.parametrize(
    "installed",
    [
        packages("0.4.38", libtpu="0.0.8"),  # older than the floor
        packages("0.11.0", libtpu="0.0.50"),  # a minor release nothing here tested
        packages("0.10.2"),  # a CPU build: no libtpu
        {**packages("0.10.2", libtpu="0.0.42.1"), "jaxlib": "0.10.1"},
    ],
)
def test_tpu_runtime_with_another_jax_gets_the_tested_tpu_build(installed):
    assert commands("tpu", installed, tensorflow=False) == [
        ["install", "-q", "jax[tpu]==0.10.2"],
        ood_jax_install("[prepare]"),
    ]


def test_gpu_runtime_keeps_its_cuda_jax_and_its_tensorflow():
    gpu = packages("0.10.2", "jax-cuda12-plugin", "jax-cuda12-pjrt", tensorflow="2.19.0")
    assert commands("gpu", gpu, tensorflow=True) == [ood_jax_install("", PREPARE_REST)]


@pytest.mark.parametrize(
    "installed",
    [
        packages("0.7.2", "jax-cuda12-plugin", "jax-cuda12-pjrt"),
        packages("0.10.2"),  # no CUDA plugin: jax would run on the CPU
        {**packages("0.10.2", "jax-cuda12-pjrt"), "jax-cuda12-plugin": "0.7.2"},
    ],
)
def test_gpu_runtime_with_another_jax_gets_the_tested_cuda_build(installed):
    assert commands("gpu", installed, tensorflow=True) == [
        ["install", "-q", "jax[cuda12]==0.10.2"],
        ood_jax_install("", PREPARE_REST),
    ]


def test_cpu_runtime():
    assert commands("cpu", packages("0.10.2"), tensorflow=True) == [
        ood_jax_install("", PREPARE_REST)
    ]
    assert commands("cpu", packages("0.5.3", "jax-cuda12-plugin"), tensorflow=True) == [
        ["uninstall", "-y", "jax-cuda12-plugin"],  # built for the old jaxlib
        ["install", "-q", "jax==0.10.2"],
        ood_jax_install("", PREPARE_REST),
    ]
    assert commands("cpu", {}, tensorflow=False) == [
        ["install", "-q", "jax==0.10.2"],
        ood_jax_install("[prepare]"),
    ]


@pytest.mark.parametrize("accelerator", ["tpu", "gpu", "cpu"])
@pytest.mark.parametrize("jax", ["0.4.38", "0.10.2"])
def test_never_a_second_tensorflow(accelerator, jax):
    installed = packages(jax, "jax-cuda12-plugin", "jax-cuda12-pjrt", libtpu="0.0.42.1")
    for command in commands(accelerator, installed, tensorflow=True):
        assert not any("tensorflow" in arg or "[prepare]" in arg for arg in command)


@pytest.mark.parametrize(
    "environ, dev, expected",
    [
        ({}, ["null", "accel0", "accel1"], "tpu"),  # TPU v4 VM
        ({}, ["null", "vfio", "vfio/0", "vfio/vfio"], "tpu"),  # TPU v5e / v6e VM
        ({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, ["null"], "tpu"),
        ({}, ["null", "nvidiactl", "nvidia0"], "gpu"),
        ({}, ["null", "nvidiactl", "vfio", "vfio/vfio"], "cpu"),
    ],
)
def test_detect_accelerator(environ, dev, expected):
    assert C.detect_accelerator(environ, dev) == expected


def test_declared_ranges_are_the_tested_versions():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = cfg["options"]["install_requires"].split()
    assert "jax>=0.10.2,<0.11" in declared and "flax>=0.12.8,<0.13" in declared
    assert ood_jax.SUPPORTED_VERSIONS == {"jax": ">=0.10.2,<0.11", "flax": ">=0.12.8,<0.13"}
    pins = (ROOT / "requirements.txt").read_text().split()
    assert "jax==0.10.2" in pins and "flax==0.12.8" in pins
    assert C.tested_version(ROOT, "jax") == "0.10.2"


@pytest.mark.parametrize("version", ["0.12.7", "0.13.0"])
def test_import_warns_outside_the_tested_range(tmp_path, version):
    # A flax distribution of another version, found before the real one.
    dist = tmp_path / f"flax-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: flax\nVersion: {version}\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    code = [sys.executable, "-c", "import ood_jax"]
    warned = subprocess.run(code, env=env, capture_output=True, text=True)
    assert warned.returncode == 0
    assert "UntestedVersionWarning: ood_jax is tested with jax>=0.10.2,<0.11 and flax" in (
        warned.stderr
    )
    assert f"found flax {version}" in warned.stderr and "OOD_JAX_ALLOW_UNTESTED=1" in warned.stderr
    env["OOD_JAX_ALLOW_UNTESTED"] = "1"
    quiet = subprocess.run(code, env=env, capture_output=True, text=True)
    assert quiet.returncode == 0 and "Warning" not in quiet.stderr


def notebook_ood_sets(backend, data):
    argv = ["--workdir=unused", *C.notebook_run_args(backend, data, smoke=False)]
    settings, _ = parse_args(argv, method="logitnorm", description="")
    assert settings.config.data.source == data
    # Resolved once: the sets the report will load are those the config names.
    assert list(settings.ood_sets) == ood_set_names(settings.config)
    return list(settings.ood_sets)


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_notebook_with_tfds_data_reads_only_what_tfds_serves(backend):
    names = notebook_ood_sets(backend, "tfds")
    served = [n for n in names if n in D.SYNTHETIC_OOD_SETS or D.get_dataset_spec(n).tfds_name]
    assert names == served
    assert {"svhn", "textures", "gaussian", "uniform"} <= set(names)


def test_notebook_with_the_offline_files_keeps_the_cpu_preset():
    assert notebook_ood_sets("cpu", "local") == list(eval_presets.CPU_OOD_SETS)
    argv = ["--workdir=unused", *C.notebook_run_args("tpu", "local", smoke=False)]
    assert parse_args(argv, method="logitnorm", description="")[0].config.train.epochs == 30
