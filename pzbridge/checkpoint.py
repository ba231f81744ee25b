"""``pzb.checkpoint``: save and restore a lifted model's variables with orbax.

The public face of :mod:`pzbridge.toolshed.checkpointing` (see there for the
format and the all-or-nothing restore, and
:mod:`pzbridge.toolshed.checkpoint_store` for the commit protocol). In short:
only *committed* versions count (a commit marker, written last, lists every
file with its size and sha256), old versions are renamed to a hidden trash
name before they are deleted, so a save killed at any moment leaves the
latest committed version restorable, and every failure is a
:class:`CheckpointError` (also ``pzb.errors.CheckpointError``) naming the
directory, what was expected and found, and the fix.

Example:
    >>> import tempfile, jax.numpy as jnp, pzbridge as pzb
    >>> from pzbridge import checkpoint
    >>> root = tempfile.mkdtemp()
    >>> _ = checkpoint.save(root, [pzb.Parameter(jnp.ones(2), "w")])
    >>> model = checkpoint.restore(root, [pzb.Parameter(jnp.zeros(2), "w")])
    >>> model[0].value.tolist()
    [1.0, 1.0]
    >>> checkpoint.versions(root)
    [1]
"""

from __future__ import annotations

from pzbridge.toolshed.checkpointing import (
    CheckpointError,
    describe,
    load_variables,
    read_description,
    restore,
    save,
    structure_of,
    versions,
)

__all__ = [
    "CheckpointError",
    "describe",
    "load_variables",
    "read_description",
    "restore",
    "save",
    "structure_of",
    "versions",
]
