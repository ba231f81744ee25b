"""The ``eqx.nn.StateIndex`` fields of a traced custom module, holding their State entries as variables.

A custom Equinox module may keep state of its own: an ``eqx.nn.StateIndex``
field, read with ``state.get(self.index)`` and replaced with
``state = state.set(self.index, new)`` (a step counter, an EMA buffer, a
cache). Traced lifting reads each entry's current value from the lift's
``eqx.nn.State`` as a ``StateVariable`` (one per array of the entry) and the
traced body writes the new values into it (see
:mod:`pzbridge.bridge.equinox.state_threading`). The field itself becomes a
:class:`StateEntry` holding those same variables, so lowering rebuilds the
``StateIndex`` (same marker, the current values as its initial value) and
:func:`~pzbridge.bridge.equinox.state.lower_with_state` puts the current
values in the State.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> from pzbridge.bridge.equinox.traversal import new_lift_context, new_lower_context
    >>> index = eqx.nn.StateIndex(jnp.zeros(2))
    >>> state = eqx.nn.State(index)
    >>> entry = lift_state_entry(index, state, new_lift_context().child("count"))
    >>> [v.label for v in entry.variables]
    ['count']
    >>> rebuilt = new_lower_context().lower_node(entry, new_lower_context())
    >>> rebuilt.marker == index.marker, rebuilt.init.tolist()
    (True, [0.0, 0.0])
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.traversal import EQUINOX, new_module
from pzbridge.bridge.tracing.state_writes import storage_names
from pzbridge.core import named_axes as nx
from pzbridge.core.struct import Struct, pytree_dataclass, static_field
from pzbridge.core.variables import StateVariable

__all__ = ["STATE_OUT_KEY", "StateEntry", "entry_label", "entry_variable", "lift_state_entry"]

STATE_OUT_KEY = "equinox_state_out"
"""Where lowering collects each ``StateIndex`` marker's current value (``ctx.shared.extras``)."""


@pytree_dataclass
class StateEntry(Struct):
    """An ``eqx.nn.StateIndex`` of a traced module: its entry's arrays as ``StateVariable`` s.

    The variables are the very ones the traced body reads and writes, so
    the entry always holds the current value.

    Attributes:
      variables: One ``StateVariable`` per array of the entry, in leaf order.
      marker: The index's marker (its key in the ``eqx.nn.State``) (static).
      treedef: The structure of the entry's value (static).

    Example:
        >>> import jax.numpy as jnp
        >>> count = StateVariable(nx.wrap(jnp.array(3)), "count")
        >>> StateEntry((count,), "count", jax.tree_util.tree_structure(0)).value().tolist()
        3
    """

    variables: tuple[StateVariable, ...]
    marker: Any = static_field()
    treedef: Any = static_field()

    def value(self, ctx: LowerContext | None = None) -> Any:
        """The entry's current value (its pytree of raw arrays), lowered through ``ctx`` when given."""
        arrays = [ctx.array(v, storage_names(v)) if ctx is not None else _raw(v.value) for v in self.variables]
        return jax.tree_util.tree_unflatten(self.treedef, arrays)


def _raw(value: Any) -> Any:
    return value.unwrap(*value.named_shape) if nx.is_namedarray(value) and not value.positional_shape else value


def entry_label(ctx: LiftContext, leaf: int, count: int) -> str:
    """The label of array ``leaf`` of an entry with ``count`` arrays, lifted at ``ctx`` (``cache``, ``cache.0``).

    Example:
        >>> from pzbridge.bridge.equinox.traversal import new_lift_context
        >>> ctx = new_lift_context().child("cache")
        >>> entry_label(ctx, 0, 1), entry_label(ctx, 1, 2)
        ('cache', 'cache.1')
    """
    return ctx.label() if count == 1 else ctx.label(str(leaf))


def entry_variable(ctx: LiftContext, array: Any, names: tuple[str, ...] | None, leaf: int,
                   count: int) -> StateVariable:
    """The ``StateVariable`` of one array of a State entry (shared by the array's identity).

    Args:
      ctx: The context of the ``StateIndex`` field.
      array: The State's array (its identity defines sharing).
      names: Its axis names in storage order, or None to keep the raw array (a value the code never read).
      leaf: Its position among the entry's arrays.
      count: How many arrays the entry has.

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.bridge.equinox.traversal import new_lift_context
        >>> v = entry_variable(new_lift_context().child("ema"), jnp.zeros(3), ("features",), 0, 1)
        >>> v.label, dict(v.value.named_shape)
        ('ema', {'features': 3})
    """
    make = (lambda: array) if names is None else (lambda: nx.wrap(array, *names))
    return ctx.variable(StateVariable, array, make, entry_label(ctx, leaf, count), None)


def lift_state_entry(index: eqx.nn.StateIndex, state: eqx.nn.State, ctx: LiftContext) -> StateEntry:
    """The :class:`StateEntry` of ``index``, its variables shared with the traced body's.

    Args:
      index: The module's ``StateIndex`` field.
      state: The lift's ``eqx.nn.State`` (holds the entry's current value).
      ctx: The field's lift context.

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.bridge.equinox.traversal import new_lift_context
        >>> index = eqx.nn.StateIndex((jnp.zeros(2), jnp.ones(3)))
        >>> entry = lift_state_entry(index, eqx.nn.State(index), new_lift_context().child("pair"))
        >>> [v.label for v in entry.variables]
        ['pair.0', 'pair.1']
    """
    leaves, treedef = jax.tree_util.tree_flatten(state.get(index))
    variables = tuple(entry_variable(ctx, leaf, None, i, len(leaves)) for i, leaf in enumerate(leaves))
    return StateEntry(variables, index.marker, treedef)


@EQUINOX.rule(lifted=(StateEntry,))
class StateEntryRule:
    """A :class:`StateEntry` lowers to its ``eqx.nn.StateIndex``: same marker, the current value as ``init``."""

    def lower(self, entry: StateEntry, ctx: LowerContext) -> Any:
        value = entry.value(ctx)
        ctx.shared.extras.setdefault(STATE_OUT_KEY, {})[entry.marker] = value
        return new_module(eqx.nn.StateIndex, marker=entry.marker, init=value)
