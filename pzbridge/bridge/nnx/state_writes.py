"""Which Variables a traced NNX call writes, and the lifted ``StateVariable`` s their new values go to.

Traced lifting (:mod:`pzbridge.bridge.nnx.tracing`) runs ``__call__`` on a
module rebuilt on *fresh* Variables, so a write (``self.count.set_value(...)``,
``self.mean.value = ...``) changes only the fresh Variable: comparing each
one's value with the tracer it was given tells what the call wrote, without
touching the user's module. The written values become extra outputs of the
traced function, and :class:`~pzbridge.bridge.tracing.state_writes.WritesState`
stores them into the lifted variables, so the lifted model updates its state
exactly as the module does. Lowering rebuilds the original class, whose code
writes its (new, same-typed) Variables in place again.

What is not expressed, and stays an :class:`Untraceable` reason (the module
is then ``Foreign``, whose calls write NNX's updates back):

- writing an ``nnx.Param`` (trainable arrays are not state);
- writing a Variable reached under two names (``self.b = self.a``): the
  traced code reads each name as its own input, so a read after the write
  would not see it;
- writing a Variable that holds no array, or writing something that is not an
  array;
- a new value whose axes differ from the variable's (a cache that grows).

See ``docs/architecture.md`` ("The lift / lower contract").

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> fresh = nnx.BatchStat(jnp.zeros(2))
    >>> given = fresh.get_raw_value()
    >>> fresh.set_value(given + 1)
    >>> [w.key for w in written_variables([("mean", fresh, given)], [(nnx.BatchStat(given), ("mean",))])]
    ['mean']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from pzbridge.bridge.tracing.graph_types import Untraceable
from pzbridge.bridge.tracing.state_writes import Written


@dataclasses.dataclass
class Writes:
    """The writes found by the first trace of a call (later traces at other sizes must write the same).

    Example:
        >>> Writes().known is None
        True
    """

    known: list[Written] | None = None


def written_variables(fresh: Sequence[tuple[str, nnx.Variable, Any]],
                      origins: Sequence[tuple[Any, tuple[str | int, ...]]]) -> list[Written]:
    """The fresh Variables whose value is no longer the one they were given, with their sources.

    Args:
      fresh: ``(key, fresh Variable, value it was given)`` per Variable of the traced module.
      origins: ``(user's Variable, key path)`` for each entry of ``fresh``.

    Returns:
      The writes, in ``fresh`` order.

    Raises:
      Untraceable: For writes traced lifting cannot express (see the module docstring).
    """
    found: list[Written] = []
    counts: dict[int, int] = {}
    for source, _ in origins:
        counts[id(source)] = counts.get(id(source), 0) + 1
    for (key, variable, given), (source, keys) in zip(fresh, origins):
        value = variable.get_raw_value()
        if value is given:
            continue
        kind = type(source).__name__
        if isinstance(source, nnx.Param):
            raise Untraceable(f"it writes its {kind} {key!r} in place (trainable parameters are not state)")
        if counts[id(source)] > 1:
            raise Untraceable(f"it writes the {kind} {key!r}, which it also reaches under another name")
        if not isinstance(given, jax.Array) or not isinstance(value, jax.Array):
            raise Untraceable(f"it writes the {kind} {key!r} with a value that is not an array "
                              f"(found {type(value).__name__})")
        found.append(Written(key, tuple(keys), source, value))
    return found
