"""Importing ood_jax adds its default XLA CPU flag, only when it can take effect."""

import os
import subprocess
import sys

FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"


def _flags_after(code: str, **env: str) -> str:
    clean = {
        k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OOD_JAX_DEFAULT_XLA_FLAGS")
    }
    done = subprocess.run(
        [sys.executable, "-c", code + "\nimport os; print(os.environ.get('XLA_FLAGS', ''))"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def test_import_appends_the_flag_to_existing_flags():
    assert _flags_after("import ood_jax") == FLAG
    assert _flags_after("import ood_jax", XLA_FLAGS="--xla_foo=1") == f"--xla_foo=1 {FLAG}"
    assert _flags_after("import experiments") == FLAG


def test_users_choice_and_opt_out_are_left_alone():
    own = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert _flags_after("import ood_jax", XLA_FLAGS=own) == own
    assert _flags_after("import ood_jax", OOD_JAX_DEFAULT_XLA_FLAGS="0") == ""


def test_not_added_once_a_backend_has_started():
    # XLA reads its flags when the first backend starts; adding one later would
    # claim a setting that is not in force.
    code = "import jax; jax.numpy.zeros(1).block_until_ready(); import ood_jax"
    assert _flags_after(code) == ""
