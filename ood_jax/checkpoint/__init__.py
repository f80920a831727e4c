"""Checkpoints: the only package that talks to orbax.

A checkpoint directory holds one sub-directory per saved step, each with two
items: ``state`` (the :class:`~ood_jax.train.TrainState` pytree, saved with
orbax's StandardSave, one file set per array) and ``metadata`` (JSON: the model
identity ``{"name", "num_classes", "options"}``, the config, the data iterator
state, anything else the caller records).

One job per module: :mod:`~ood_jax.checkpoint.manager` (the :class:`Checkpointer`:
orbax save/restore, steps, metadata), :mod:`~ood_jax.checkpoint.integrity` (hashes,
verification, the structure check, setting corrupt steps aside),
:mod:`~ood_jax.checkpoint.orbax_io` (orbax's stderr noise, free space, full disks)
and :mod:`~ood_jax.checkpoint.errors`.

Guarantees:

- Atomic saves: orbax writes into a temporary directory and renames it when the
  write is complete, so killing the process at any moment leaves the newest
  *complete* checkpoint readable; leftover temporary directories are ignored and
  cleaned up. Saves are synchronous (the next train step donates the state's
  buffers, and a blocking save of a CIFAR model takes well under a second).
- Keep the last ``max_to_keep`` checkpoints.
- Restore onto any mesh: the target gives each array's sharding.
- Never silently start from scratch: a directory that holds files but no
  readable checkpoint, a checkpoint of another model (metadata differs) or of
  another state layout (tree structure or shapes differ) raise
  :class:`CheckpointError` (a ``ValueError``) that says what differs.
- Corruption is detected: every save records the SHA-256 of each array's bytes
  in the metadata, and a restore recomputes them. A checkpoint with unreadable
  files or changed bytes raises :class:`CorruptCheckpointError` naming the step
  and the arrays; :meth:`Checkpointer.restore_newest_intact` then falls back to
  the newest intact checkpoint (moving the corrupt one aside, with a warning).
- A full disk is one clear error: a save first checks that the state fits in the
  free space, and a save that still fails for lack of space raises
  :class:`DiskFullError` (an ``OSError`` with ``errno.ENOSPC``) instead of orbax's
  hundreds of lines of thread noise. The newest complete checkpoint stays intact;
  the unfinished one is cleaned up on the next start.
"""

from ood_jax.checkpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    DiskFullError,
    ModelMismatchError,
)
from ood_jax.checkpoint.integrity import FILE_HASHES, HASHES_KEY, array_hashes, sha256_file
from ood_jax.checkpoint.manager import Checkpointer, abstract_like

__all__ = [
    "FILE_HASHES",
    "HASHES_KEY",
    "CheckpointError",
    "Checkpointer",
    "CorruptCheckpointError",
    "DiskFullError",
    "ModelMismatchError",
    "abstract_like",
    "array_hashes",
    "sha256_file",
]
