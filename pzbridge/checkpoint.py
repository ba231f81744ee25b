"""``pzb.checkpoint``: save and restore a lifted model's variables with orbax.

The public face of :mod:`pzbridge.toolshed.checkpointing` (see there for the
format, the all-or-nothing restore and the atomic saves).

Example:
    >>> import tempfile, jax.numpy as jnp, pzbridge as pzb
    >>> from pzbridge import checkpoint
    >>> root = tempfile.mkdtemp()
    >>> _ = checkpoint.save(root, [pzb.Parameter(jnp.ones(2), "w")])
    >>> model = checkpoint.restore(root, [pzb.Parameter(jnp.zeros(2), "w")])
    >>> model[0].value.tolist()
    [1.0, 1.0]
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
