"""Importing ood_jax changes nothing; the commands (experiments) and an explicit
ood_jax.use_cpu_xla_flag() add the XLA CPU flag, only when it can take effect."""

import os
import subprocess
import sys

FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"


def _clean_env() -> dict[str, str]:
    own = ("XLA_FLAGS", "OOD_JAX_DEFAULT_XLA_FLAGS", "OOD_JAX_DATA_DIR", "OOD_JAX_PRETRAINED")
    return {k: v for k, v in os.environ.items() if k not in own}


def _flags_after(code: str, **env: str) -> str:
    clean = _clean_env()
    done = subprocess.run(
        [sys.executable, "-c", code + "\nimport os; print(os.environ.get('XLA_FLAGS', ''))"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


OPT_IN = "import ood_jax; ood_jax.use_cpu_xla_flag()"


def test_importing_the_library_leaves_the_process_alone():
    assert _flags_after("import ood_jax, ood_jax.data, ood_jax.pretrained") == ""
    assert _flags_after("import ood_jax", XLA_FLAGS="--xla_foo=1") == "--xla_foo=1"


def test_the_opt_in_and_the_commands_append_the_flag_to_existing_flags():
    assert _flags_after(OPT_IN) == FLAG
    assert _flags_after(OPT_IN, XLA_FLAGS="--xla_foo=1") == f"--xla_foo=1 {FLAG}"
    assert _flags_after("import experiments") == FLAG


def test_users_choice_and_opt_out_are_left_alone():
    own = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert _flags_after(OPT_IN, XLA_FLAGS=own) == own
    assert _flags_after(OPT_IN, OOD_JAX_DEFAULT_XLA_FLAGS="0") == ""
    assert _flags_after("import experiments", OOD_JAX_DEFAULT_XLA_FLAGS="0") == ""


def test_not_added_once_a_backend_has_started():
    # XLA reads its flags when the first backend starts; adding one later would
    # claim a setting that is not in force.
    code = "import jax; jax.numpy.zeros(1).block_until_ready(); " + OPT_IN
    assert _flags_after(code) == ""


def _paths_after(code: str, **env: str) -> list[str]:
    show = "import os; print(os.environ.get('OOD_JAX_DATA_DIR', '-'), "
    show += "os.environ.get('OOD_JAX_PRETRAINED', '-'))"
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\n{show}"],
        env={**_clean_env(), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


def test_the_library_finds_data_and_checkpoints_only_where_it_is_told(tmp_path):
    # Importing the library sets nothing, and without the variables it refuses to guess.
    code = (
        "import ood_jax.data as D, ood_jax.pretrained as P\n"
        "assert D.default_data_dir() is None\n"
        "try:\n    P.available()\nexcept P.PretrainedError as e:\n    print('refused:', e)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "refused: no folder of published checkpoints" in done.stdout
    assert "OOD_JAX_PRETRAINED" in done.stdout
    assert _paths_after("import ood_jax") == ["-", "-"]
    # The commands, run from this checkout, use its folders; a user's choice stays.
    import experiments

    data, published = _paths_after("import experiments")
    folders = experiments.CHECKOUT_DEFAULTS["OOD_JAX_PRETRAINED"]
    assert published.split(os.pathsep) == [str(f) for f in folders if f.is_dir()]
    assert str(folders[0]) in published  # the 5-epoch study's, always in the checkout
    expected = experiments.CHECKOUT_DEFAULTS["OOD_JAX_DATA_DIR"][0]
    assert data == (str(expected) if expected.is_dir() else "-")
    mine = str(tmp_path)
    assert _paths_after("import experiments", OOD_JAX_DATA_DIR=mine)[0] == mine
