"""JAX's persistent compilation cache for the commands (training and evaluation).

Every start of a command compiles its programs again: a resumed run, each seed of a
study, the evaluation command. With the cache on, a later start with the same
program, jax, jaxlib, XLA flags and devices loads the compiled program instead
(JAX keys each entry by all of them, so nothing compiled for another version,
flag or device is used). Only the commands turn it on; ``import ood_jax`` never
does (a library user calls :func:`use` or sets ``jax_compilation_cache_dir``).

Where: ``config.train.compilation_cache`` (a folder, or ``"off"``); when empty,
``$OOD_JAX_COMPILATION_CACHE`` (a folder, or ``off``); when that is unset too,
``<user cache>/ood_jax/jax`` (``$XDG_CACHE_HOME`` or ``~/.cache``), shared by all runs.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV = "OOD_JAX_COMPILATION_CACHE"
OFF = "off"


def cache_dir(configured: str = "") -> str | None:
    """The cache folder the settings choose, or None when it is off."""
    chosen = configured or os.environ.get(ENV, "")
    if chosen.strip().lower() in (OFF, "0", "false", "none"):
        return None
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ood_jax", "jax")


def use(configured: str = "") -> str | None:
    """Points JAX's persistent cache at :func:`cache_dir` (every program, however quick
    to compile); returns the folder, or None when off (the cache is then left as the
    process had it)."""
    path = cache_dir(configured)
    if path is None:
        return None
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        # The cache is set up at the process's first compile; a later folder needs a reset.
        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
