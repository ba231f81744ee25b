"""Named axes a layer mixes across (a worlds axis), and running per-example code on the whole axis.

Equinox models, and the adapters lowering puts inside them, run on one
example at a time; the caller's ``jax.vmap`` makes the batch. Some layers
need every entry of a named axis at once: an interchange intervention on a
``worlds`` axis reads world 0's activation *and* its source world's, and
Equinox's BatchNorm takes statistics of the batch. Such a layer says which
axes it mixes with a ``reads_across()`` method (:func:`axes_read_across`
finds them). Called under a ``vmap`` that *names* the axis, an adapter
gathers the axis (:func:`gathered_inputs`), runs its layer once on all the
entries, named, and keeps its own row: per-example code around it stays
per-example. Outside such a ``vmap`` there is nothing to gather, which the
adapter reports (:func:`require_bound`).

Example:
    >>> import jax, jax.numpy as jnp
    >>> xs, row = gathered_inputs([jnp.ones(3)], "batch")  # no vmap names "batch": a batch of one
    >>> xs[0].shape, row
    ((1, 3), 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LowerError
from pzbridge.core.selectors import select
from pzbridge.nn.layer import Layer

__all__ = ["axes_read_across", "axis_bound", "gathered_inputs", "require_bound", "require_entries_kept"]


def axes_read_across(layer: Any) -> tuple[str, ...]:
    """The named axes some layer in ``layer`` mixes across (its ``reads_across()``), in first-seen order.

    Example:
        >>> import pzbridge as pzb
        >>> from pzbridge.toolshed.worlds import RouteWorlds
        >>> axes_read_across(pzb.nn.Sequential([pzb.nn.Identity(), RouteWorlds((1, 1))]))
        ('worlds',)
    """
    found: list[str] = []
    readers = select(layer).at_subtrees_where(
        lambda node: isinstance(node, Layer) and callable(getattr(node, "reads_across", None)))
    for reader in readers.get_sequence():
        for axis in reader.reads_across():
            if axis not in found:
                found.append(axis)
    return tuple(found)


def require_bound(axis_name: str, where: str, what: str) -> None:
    """Raises a ``LowerError`` naming the fix unless a ``vmap`` names ``axis_name`` around the call.

    Example:
        >>> require_bound("worlds", "<root>", "an interchange")
        Traceback (most recent call last):
        ...
        pzbridge.core.errors.LowerError: <root>: an interchange reads across the axis 'worlds', which this per-example module sees only under jax.vmap(..., axis_name='worlds'); found a call outside such a vmap. Fix: stack the inputs on a leading axis and call jax.vmap(model, axis_name='worlds')(stacked) (the worlds of pzb.toolshed.stack_worlds, in that order).
    """
    if not axis_bound(axis_name):
        raise LowerError(
            f"{where or '<root>'}: {what} reads across the axis {axis_name!r}, which this per-example module sees "
            f"only under jax.vmap(..., axis_name={axis_name!r}); found a call outside such a vmap. Fix: stack the "
            f"inputs on a leading axis and call jax.vmap(model, axis_name={axis_name!r})(stacked) (the worlds of "
            "pzb.toolshed.stack_worlds, in that order)."
        )


def gathered_inputs(inputs: Sequence[Any], axis_name: str) -> tuple[list[Any], Any]:
    """The batched inputs of one per-example call, and the row of this example in them.

    Under a ``vmap`` (or another transformation) that names ``axis_name``
    every input is gathered over it, so the batched computation sees the
    whole batch (unmapped: it runs once); else each input gets a leading axis
    of size one and the row is 0.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> rows = jax.vmap(lambda x: gathered_inputs([x], "batch")[0][0].sum(), axis_name="batch")
        >>> rows(jnp.arange(3.0)).tolist()  # every example sees the whole batch
        [3.0, 3.0, 3.0]
    """
    if not axis_bound(axis_name):  # No transformation names the axis: this call is a batch of one.
        return [jnp.asarray(a)[None] if hasattr(a, "shape") else a for a in inputs], 0
    gathered = [jax.lax.all_gather(a, axis_name) if hasattr(a, "shape") else a for a in inputs]
    return gathered, jax.lax.axis_index(axis_name)




def axis_bound(axis_name: str) -> bool:
    """Whether an enclosing transformation (``jax.vmap(..., axis_name=...)``, ``shard_map``) names ``axis_name``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> seen = []
        >>> _ = jax.vmap(lambda x: seen.append(axis_bound("batch")) or x, axis_name="batch")(jnp.ones(2))
        >>> axis_bound("batch"), seen
        (False, [True])
    """
    try:
        jax.lax.axis_index(axis_name)
    except NameError:
        return False
    return True


def require_entries_kept(out: Any, axis: str, size: int) -> None:
    """Raises a ``LowerError`` unless every output leaf has ``size`` entries along ``axis`` (one row per caller).

    A layer adding or dropping worlds (path patching's helper worlds) cannot
    hand each vmapped call its own row.

    Example:
        >>> import pzbridge as pzb
        >>> require_entries_kept(pzb.nx.zeros({"worlds": 2, "f": 3}), "worlds", 2)  # kept: no error
    """
    for leaf in jax.tree_util.tree_leaves(out, is_leaf=nx.is_namedarray):
        found = leaf.named_shape.get(axis) if nx.is_namedarray(leaf) else None
        if found != size:
            raise LowerError(
                f"<root>: this adapter gathered {size} entries of the vmap axis {axis!r}, its layer returned "
                f"{found} (a layer adding or dropping worlds, as path patching's helper worlds do). Fix: keep "
                "such a model lifted and call it on stack_worlds([...]), or patch activations (patch_worlds), "
                "which keeps the number of worlds.")
