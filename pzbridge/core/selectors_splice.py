"""Structural edits of a selection's parents: insert, remove, inline.

The *parent* of a selected node is the container one key above it. These
edits change how many children the parent has, so they are defined only when
the parent is a plain ``list`` or ``tuple`` (the selected keypath ends in a
``SequenceKey``), as in a ``Sequential`` struct whose ``sublayers`` field is a
list of layers: the list is the parent, not the struct. Struct fields, dict
entries and the root have no neighbours to insert next to; selecting one of
those raises :class:`~pzbridge.core.errors.SelectionError` with what to do
instead.

Cost: selected places are swapped for private slot objects with one
``tree_unflatten``, then one ``tree_flatten`` stops at the lists that hold
slots, so an edit of a long layer list near the root touches only that list.

Example:
    >>> from pzbridge.core.selectors_flat import flat_at_paths
    >>> from jax.tree_util import SequenceKey
    >>> flat = flat_at_paths([1, 2, 3], [(SequenceKey(1),)])
    >>> splice(flat, lambda entry: (), "remove_from_parent")
    [1, 3]
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from pzbridge.core.errors import SelectionError, format_path
from pzbridge.core.selectors_flat import Flat, node_at

_flatten = jax.tree_util.tree_flatten


class _Slot:
    """A private stand-in for one selected entry while its parent is rebuilt."""

    __slots__ = ("entry",)

    def __init__(self, entry: int) -> None:
        self.entry = entry


def _holds_slot(x: Any) -> bool:
    return (type(x) is list or type(x) is tuple) and any(type(c) is _Slot for c in x)


def _misplaced_error(marked: Any, operation: str, total: int) -> SelectionError:
    """Explains which selected node has no list/tuple parent."""
    keyed, _ = jax.tree_util.tree_flatten_with_path(marked, is_leaf=lambda x: type(x) is _Slot)
    slot_paths = [p for p, x in keyed if type(x) is _Slot]
    for index, path in enumerate(slot_paths):
        if not path:
            return SelectionError(
                f"{operation} needs each selected node to be an element of a list or tuple, "
                "but the whole tree (the root) is selected, and the root has no parent. "
                "Fix: select inside it first, e.g. .at(lambda t: t.sublayers[0]), or wrap it "
                "yourself with .apply(lambda l: Sequential([l, new]))."
            )
        parent = node_at(marked, path[:-1])
        if type(parent) not in (list, tuple):
            return SelectionError(
                f"{operation} needs each selected node to be an element of a list or tuple, "
                f"but the node selected at {format_path(path)} (selected node {index + 1} of "
                f"{total}) is held by a {type(parent).__name__} at "
                f"{format_path(path[:-1])} (key {path[-1]!r}), which has no neighbours to "
                "insert next to or remove from. Fix: select the whole layer and replace it, "
                "e.g. .apply(lambda l: Sequential([l, new])), or select an element of a "
                "list of layers instead."
            )
    return SelectionError(f"{operation}: a selected node has no list or tuple parent.")


def splice(flat: Flat, items: Callable[[int], Sequence[Any]], operation: str) -> Any:
    """Replaces every selected place by the items ``items(entry)`` in its parent.

    Args:
      flat: The selection.
      items: Called once per selected place with the entry index; returns the
        elements to put in the parent list/tuple where that place was.
      operation: The public method name, for error messages.

    Returns:
      The rebuilt tree.

    Raises:
      SelectionError: If a selected node is the root or is not an element of a
        list or tuple.
    """
    total = len(flat.slots)
    if total == 0:
        return flat.rebuild()
    marked = flat.fill([_Slot(e) for e in range(len(flat.values))])
    consumed = 0

    def process(tree: Any, deep: bool) -> Any:
        nonlocal consumed
        leaves, treedef = _flatten(tree, is_leaf=_holds_slot)
        out = []
        for leaf in leaves:
            kind = type(leaf)
            if kind is _Slot:
                raise _misplaced_error(marked, operation, total)
            if kind is list or kind is tuple:  # Only parents of slots stop as leaves.
                new_items: list = []
                for child in leaf:
                    if type(child) is _Slot:
                        consumed += 1
                        new_items.extend(items(child.entry))
                    else:
                        new_items.append(process(child, deep) if deep else child)
                out.append(kind(new_items))
            else:
                out.append(leaf)
        return treedef.unflatten(out)

    result = process(marked, deep=False)
    if consumed < total:  # Some parents sit inside other parents' elements.
        consumed = 0
        result = process(marked, deep=True)
    return result
