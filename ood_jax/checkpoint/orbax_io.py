"""Orbax's I/O quirks: its threads' stderr noise, their settling after a failure, the
free-space check before a save and recognising a full disk in what orbax raises."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

# Room kept free beyond the arrays' bytes: orbax's metadata files and the JSON.
SPACE_MARGIN = 256 << 10


def space_shortfall(directory: str, state: Any) -> str | None:
    """Why ``state`` does not fit in ``directory``'s free space, or None if it does."""
    needed = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
    free = shutil.disk_usage(directory).free
    if free < needed + SPACE_MARGIN:
        return f"it needs about {_mb(needed + SPACE_MARGIN)}, {_mb(free)} are free"
    return None


def is_no_space(err: BaseException | None) -> bool:
    """Did ``err`` (or what caused it) fail for lack of space? Orbax wraps tensorstore's
    ``RESOURCE_EXHAUSTED ... [os_error_code='28']`` in various exception types."""
    while err is not None:
        if getattr(err, "errno", None) == errno.ENOSPC:
            return True
        text = str(err)
        if "No space left on device" in text or "os_error_code='28'" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def settle() -> None:
    """After a failed orbax call its threads go on reporting for a moment, and its
    failed tasks report themselves when collected: let that happen while captured."""
    time.sleep(0.5)
    gc.collect()


def first_line(err: BaseException) -> str:
    """The first line of an error's message, at most 300 characters."""
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


class Captured:
    """What :func:`quiet_stderr` held back."""

    def __init__(self):
        self.chunks: list[bytes] = []

    def replay(self) -> None:
        """Write what was captured to the real stderr (a successful save's warnings)."""
        if self.chunks:
            sys.stderr.write(b"".join(self.chunks).decode(errors="replace"))
            sys.stderr.flush()
            self.chunks.clear()


@contextlib.contextmanager
def quiet_stderr() -> Iterator[Captured]:
    """Holds back what is written to file descriptor 2 while orbax saves.

    A save that fails for lack of space makes orbax's and tensorstore's threads print
    hundreds of lines (tracebacks, ``Event loop is closed``) straight to the
    descriptor; they are kept in memory and dropped when the failure becomes one
    clear error, and replayed otherwise.
    """
    captured = Captured()
    try:
        sys.stderr.flush()
        saved_fd = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2 (some embedded runtimes)
        yield captured
        return
    read_fd, write_fd = os.pipe()

    def drain():
        while chunk := os.read(read_fd, 65536):
            captured.chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield captured
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        reader.join(timeout=5)
        os.close(read_fd)
