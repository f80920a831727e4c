"""The errors of a checkpoint that exists but cannot be used, or cannot be written."""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be used (corrupt, or of another model)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files are unreadable or whose arrays differ from their saved hashes."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class ModelMismatchError(CheckpointError):
    """A checkpoint of another model: ``saved`` (its metadata's identity) is not ``expected``."""

    def __init__(self, message: str, step: int, saved: Any, expected: Mapping[str, Any]):
        super().__init__(message)
        self.step, self.saved, self.expected = step, saved, expected


class DiskFullError(OSError):
    """No space left on the device to save a checkpoint (``errno.ENOSPC``)."""

    def __init__(self, message: str, path: str):
        super().__init__(errno.ENOSPC, message, path)

    def __str__(self) -> str:
        return self.strerror
