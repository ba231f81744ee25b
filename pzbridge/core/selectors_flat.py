"""The flat form behind a :class:`~pzbridge.core.selectors.Selection`.

A selection is data (selected subtrees plus the rest of the tree with holes),
but building that data eagerly costs several tree traversals per selector
call. Internally a selection is kept *flat*: one ``PyTreeDef`` of the whole
tree in which every selected place is a leaf, the list of leaves, the leaf
positions ("slots") that are selected, and which selected entry fills each
slot. Rebuilding the tree after an edit is then a single ``tree_unflatten``,
and building a selection by predicate is a single ``tree_flatten`` with an
``is_leaf`` that stops at the selected nodes. Keypaths are computed only when
someone asks for them.

Invariant of :class:`Flat`: every leaf that is not a slot is a JAX leaf of the
unselected part of the tree, or a selection marker (:class:`SelectionHole` /
:class:`SelectionQuote` found in the data, kept as a leaf so that a selection
of a selection quotes them instead of confusing them with its own holes).

Sharing: a selected :class:`~pzbridge.core.variable_base.AbstractVariable` is
one *entry* however many places it fills, so it is counted, returned and
edited once, so edits keep tied variables tied (see docs/architecture.md,
"How state and sharing are kept").

Example:
    >>> import jax.numpy as jnp
    >>> flat = flat_where([1, (2, "a")], lambda x: isinstance(x, str), lambda x: isinstance(x, str))
    >>> flat.values, flat.occurrence_paths()
    (['a'], [(SequenceKey(idx=1), SequenceKey(idx=1))])
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Collection, Sequence

import jax

from pzbridge.core.errors import SelectionError, format_path
from pzbridge.core.struct import Struct, pytree_dataclass, static_field
from pzbridge.core.variable_base import AbstractVariable

KeyPath = tuple[Any, ...]

_flatten = jax.tree_util.tree_flatten
_MISSING = object()
_flatten_with_path = jax.tree_util.tree_flatten_with_path


@pytree_dataclass
class SelectionHole(Struct):
    """Marks, in a selection's ``remainder``, a place a selected subtree was taken from.

    A hole has no pytree children, so JAX sees nothing where a selected
    subtree was. ``path`` is the key of the selected entry that fills the
    hole: the hole's own keypath, except where one shared variable fills
    several places (every such hole names the variable's first keypath).

    Example:
        >>> from jax.tree_util import GetAttrKey
        >>> SelectionHole((GetAttrKey("w"),)).path
        (GetAttrKey(name='w'),)
    """

    path: KeyPath = static_field()


@pytree_dataclass
class SelectionQuote(Struct):
    """Wraps a hole or quote that belongs to the data, not to this selection.

    When the selected tree itself contains selection markers (a selection of
    a selection), the remainder quotes them so that only this selection's own
    holes are filled on :meth:`~pzbridge.core.selectors.Selection.deselect`.

    Example:
        >>> SelectionQuote(SelectionHole(())).quoted
        SelectionHole(path=())
    """

    quoted: Any = static_field()


MARKER_TYPES = (SelectionHole, SelectionQuote)


def is_marker(x: Any) -> bool:
    """True for selection markers found in data (holes and quotes).

    Example:
        >>> is_marker(SelectionHole(())), is_marker(3)
        (True, False)
    """
    return isinstance(x, MARKER_TYPES)


class Mark:
    """A private boundary object placed in a tree to mark a selected subtree."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class Flat:
    """A selection in flat form; see the module docstring.

    Attributes:
      treedef: Structure of the whole tree with every selected place a leaf.
      leaves: The leaves of ``treedef`` (slot positions hold stale values).
      slots: Ascending leaf positions that are selected places.
      entry_of_slot: For each slot, the index of the entry that fills it.
      values: The selected entries, in order of first occurrence.
      orig_values: ``values`` when the selection was built; a variable entry
        whose value later differs is written through to its unselected places.
    """

    __slots__ = (
        "treedef", "leaves", "slots", "entry_of_slot", "values", "orig_values",
        "_paths", "_paths_fn", "_entry_keys", "source", "has_variables",
    )

    def __init__(
        self,
        treedef: Any,
        leaves: list,
        slots: list[int],
        entry_of_slot: list[int],
        values: list,
        paths_fn: Callable[[], list[KeyPath]] | None = None,
        paths: list[KeyPath] | None = None,
        entry_keys: list[KeyPath] | None = None,
        orig_values: list | None = None,
        source: Any = None,
        has_variables: bool | None = None,
    ) -> None:
        self.treedef = treedef
        self.leaves = leaves
        self.slots = slots
        self.entry_of_slot = entry_of_slot
        self.values = values
        self.orig_values = values if orig_values is None else orig_values
        self._paths = paths
        self._paths_fn = paths_fn
        self._entry_keys = entry_keys
        # The tree this flat deselects to while values are unchanged (or None).
        self.source = source
        if has_variables is None:
            has_variables = any(isinstance(v, AbstractVariable) for v in self.orig_values)
        # Whether an entry was a variable (only then can an edit write through).
        self.has_variables = has_variables

    # -- Keypaths (lazy) -------------------------------------------------
    def occurrence_paths(self) -> list[KeyPath]:
        """Keypath of every slot, in slot order."""
        if self._paths is None:
            self._paths = self._paths_fn()
        return self._paths

    def entry_keys(self) -> list[KeyPath]:
        """Keypath naming each entry: the keypath of its first slot."""
        if self._entry_keys is None:
            paths = self.occurrence_paths()
            keys: list[Any] = [None] * len(self.values)
            for path, entry in zip(paths, self.entry_of_slot):
                if keys[entry] is None:
                    keys[entry] = path
            self._entry_keys = keys
        return self._entry_keys

    # -- Rebuilding ------------------------------------------------------
    def with_values(self, values: list) -> Flat:
        """Same places, new selected values (keeps keypaths and originals)."""
        return Flat(
            self.treedef, self.leaves, self.slots, self.entry_of_slot, values,
            paths=self._paths, paths_fn=self._paths_fn, entry_keys=self._entry_keys,
            orig_values=self.orig_values, has_variables=self.has_variables,
        )

    def fill(self, values: Sequence[Any]) -> Any:
        """Rebuilds the tree with ``values[e]`` in every slot of entry ``e``."""
        leaves = list(self.leaves)
        self._put(leaves, values)
        return self.treedef.unflatten(leaves)

    def _put(self, leaves: list, values: Sequence[Any]) -> None:
        if len(self.slots) == len(values):  # One slot per entry: no shared variable.
            for slot, value in zip(self.slots, values):
                leaves[slot] = value
        else:
            for slot, entry in zip(self.slots, self.entry_of_slot):
                leaves[slot] = values[entry]

    def rebuild(self, values: Sequence[Any] | None = None) -> Any:
        """Rebuilds the tree; a replaced variable entry replaces it everywhere.

        A selected variable that was replaced (``values[e] is not
        orig_values[e]``) is also replaced at the places where it occurs in
        the unselected part of the tree, so tied variables stay tied.
        """
        if values is None:
            values = self.values
            if self.source is not None:
                return self.source
        leaves = list(self.leaves)
        if self.has_variables:
            replaced = {
                id(old): new
                for old, new in zip(self.orig_values, values)
                if new is not old and isinstance(old, AbstractVariable)
            }
            if replaced:
                for i, leaf in enumerate(leaves):
                    new = replaced.get(id(leaf), _MISSING)
                    if new is not _MISSING:
                        leaves[i] = new
        self._put(leaves, values)
        return self.treedef.unflatten(leaves)

    def remainder(self) -> Any:
        """The tree with holes at selected places and data markers quoted."""
        keys = self.entry_keys()
        leaves = [SelectionQuote(x) if isinstance(x, MARKER_TYPES) else x for x in self.leaves]
        for slot, entry in zip(self.slots, self.entry_of_slot):
            leaves[slot] = SelectionHole(keys[entry])
        return self.treedef.unflatten(leaves)

    def selected_by_path(self) -> collections.OrderedDict:
        """Ordered mapping from entry keypath to selected value."""
        return collections.OrderedDict(zip(self.entry_keys(), self.values))


# -- Constructors ---------------------------------------------------------


def _entries(leaves: list, slots: list[int]) -> tuple[list[int], list]:
    """Numbers selected leaves as entries; one entry per distinct variable."""
    entry_of_slot: list[int] = []
    values: list = []
    seen: dict[int, int] = {}
    for slot in slots:
        x = leaves[slot]
        if isinstance(x, AbstractVariable):
            entry = seen.get(id(x))
            if entry is None:
                entry = seen[id(x)] = len(values)
                values.append(x)
        else:
            entry = len(values)
            values.append(x)
        entry_of_slot.append(entry)
    return entry_of_slot, values


def _identity_replay_paths(source: Any, leaves: list, slots: list[int]) -> Callable[[], list[KeyPath]]:
    """Keypaths of the slots, by re-flattening ``source`` stopping at the same objects.

    Valid when the stops were chosen by a deterministic, path-independent rule:
    then an object stops the traversal wherever it occurs, in both traversals.
    """

    def compute() -> list[KeyPath]:
        stop_ids = {id(leaves[s]) for s in slots}
        keyed, _ = _flatten_with_path(
            source, is_leaf=lambda x: id(x) in stop_ids or isinstance(x, MARKER_TYPES)
        )
        if len(keyed) != len(leaves):  # A non-deterministic predicate; fail loudly.
            raise SelectionError(
                "Could not recover the keypaths of the selected nodes: re-traversing the tree "
                f"found {len(keyed)} leaves where selection found {len(leaves)}. "
                "Fix: make the selection predicate deterministic and independent of call order."
            )
        return [keyed[s][0] for s in slots]

    return compute


def flat_where(tree: Any, stop: Callable[[Any], bool], selected: Callable[[Any], bool]) -> Flat:
    """Selects the outermost nodes where ``stop`` holds and ``selected`` confirms.

    ``stop`` is the ``is_leaf`` of a single flatten (it must also stop at
    markers); ``selected`` is asked only about the resulting leaves.
    """
    leaves, treedef = _flatten(tree, is_leaf=stop)
    slots = [i for i, x in enumerate(leaves) if selected(x)]
    entry_of_slot, values = _entries(leaves, slots)
    return Flat(
        treedef, leaves, slots, entry_of_slot, values,
        paths_fn=_identity_replay_paths(tree, leaves, slots), source=tree,
    )


def flat_instances(tree: Any, cls: type | tuple[type, ...]) -> Flat:
    """Outermost instances of ``cls``: the hot path, one flatten, no keypaths."""
    classes = cls if isinstance(cls, tuple) else (cls,)
    stop_types = classes + MARKER_TYPES
    leaves, treedef = _flatten(tree, is_leaf=lambda x: isinstance(x, stop_types))
    if any(issubclass(m, classes) for m in MARKER_TYPES):
        slots = [i for i, x in enumerate(leaves) if isinstance(x, classes) and not isinstance(x, MARKER_TYPES)]
    else:
        slots = [i for i, x in enumerate(leaves) if isinstance(x, classes)]
    # Classes unrelated to variables cannot select one: skip deduplication.
    if any(issubclass(c, AbstractVariable) or issubclass(AbstractVariable, c) for c in classes):
        entry_of_slot, values = _entries(leaves, slots)
        has_variables = None
    else:
        entry_of_slot, values = list(range(len(slots))), [leaves[s] for s in slots]
        has_variables = False
    return Flat(
        treedef, leaves, slots, entry_of_slot, values,
        paths_fn=_identity_replay_paths(tree, leaves, slots), source=tree,
        has_variables=has_variables,
    )


def flat_at_paths(tree: Any, paths: Collection[KeyPath]) -> Flat:
    """Selects the nodes at ``paths`` (outermost wins when one is a prefix of another)."""
    pathset = paths if isinstance(paths, (set, frozenset)) else set(paths)
    keyed, treedef = _flatten_with_path(
        tree,
        is_leaf=lambda p, x: p in pathset or isinstance(x, MARKER_TYPES),
        is_leaf_takes_path=True,
    )
    leaves = [x for _, x in keyed]
    slots = [i for i, (p, _) in enumerate(keyed) if p in pathset]
    entry_of_slot, values = _entries(leaves, slots)
    return Flat(
        treedef, leaves, slots, entry_of_slot, values,
        paths=[keyed[s][0] for s in slots], source=tree,
    )


def flat_from_marked(tree: Any) -> Flat:
    """Selects every :class:`Mark` in ``tree``; one entry per mark (or per variable)."""
    leaves, treedef = _flatten(tree, is_leaf=lambda x: type(x) is Mark or isinstance(x, MARKER_TYPES))
    slots: list[int] = []
    entry_of_slot: list[int] = []
    values: list = []
    seen: dict[int, int] = {}
    for i, x in enumerate(leaves):
        if type(x) is not Mark:
            continue
        key = id(x.value) if isinstance(x.value, AbstractVariable) else id(x)
        entry = seen.get(key)
        if entry is None:
            entry = seen[key] = len(values)
            values.append(x.value)
        slots.append(i)
        entry_of_slot.append(entry)
    return Flat(
        treedef, leaves, slots, entry_of_slot, values,
        paths_fn=_identity_replay_paths(tree, leaves, slots),
    )


def flat_from_fields(selected_by_path: Any, remainder: Any) -> Flat:
    """Reads a selection built from its fields (by a user, or by JAX unflatten)."""
    keys = list(selected_by_path.keys())
    index = {key: i for i, key in enumerate(keys)}
    keyed, treedef = _flatten_with_path(remainder, is_leaf=lambda x: isinstance(x, MARKER_TYPES))
    leaves: list = []
    slots: list[int] = []
    entry_of_slot: list[int] = []
    paths: list[KeyPath] = []
    for i, (path, x) in enumerate(keyed):
        if type(x) is SelectionHole:
            entry = index.get(x.path)
            if entry is None:
                raise SelectionError(
                    f"The remainder has a SelectionHole at {format_path(path)} naming "
                    f"{format_path(x.path)}, which is not a key of selected_by_path "
                    f"(keys: {[format_path(k) for k in keys][:8]}). "
                    "Fix: build selections with pzb.select(...) rather than by hand."
                )
            slots.append(i)
            entry_of_slot.append(entry)
            paths.append(path)
            leaves.append(x)
        elif type(x) is SelectionQuote:
            leaves.append(x.quoted)
        else:
            leaves.append(x)
    return Flat(
        treedef, leaves, slots, entry_of_slot, list(selected_by_path.values()),
        paths=paths, entry_keys=keys,
    )


def flat_root(tree: Any) -> Flat:
    """The selection of the whole tree (root keypath ``()``)."""
    return Flat(
        jax.tree_util.tree_structure(0), [tree], [0], [0], [tree],
        paths=[()], entry_keys=[()], source=tree,
    )


def is_root(flat: Flat) -> bool:
    """True when ``flat`` selects exactly the whole tree."""
    return flat.treedef.num_nodes == 1 and flat.slots == [0]


def refine(flat: Flat, sub: Callable[[Any], Flat]) -> Flat:
    """Selects, inside each selected entry, what ``sub(entry_value)`` selects.

    The sub-selections' keypaths are relative to their entry; the result is a
    selection of the whole tree. Entries are refined once each, so a shared
    variable refines to the same sub-selection at all of its places.
    """
    if is_root(flat):
        return sub(flat.values[0])
    marked_values = []
    for value in flat.values:
        inner = sub(value)
        if not inner.slots:
            marked_values.append(inner.rebuild())
            continue
        marks = [Mark(v) for v in inner.values]
        marked_values.append(inner.fill(marks))
    return flat_from_marked(flat.fill(marked_values))


def keep_entries(flat: Flat, keep: Sequence[bool]) -> Flat:
    """The selection of only the entries where ``keep`` is true."""
    if all(keep):
        return flat
    marked = [Mark(v) if k else v for v, k in zip(flat.values, keep)]
    return flat_from_marked(flat.fill(marked))


def leaf_or_childless(x: Any) -> bool:
    """True for JAX leaves and for pytree nodes without children (``None``, ``()``)."""
    try:
        children, _ = jax.tree_util.flatten_one_level(x)
    except ValueError:
        return True
    return not children


def children_with_keys(x: Any) -> Sequence[tuple[Any, Any]] | None:
    """``(key, child)`` pairs of a pytree node, or ``None`` for a leaf."""
    if isinstance(x, MARKER_TYPES):
        return None
    try:
        keyed, _ = jax.tree_util.flatten_one_level_with_keys(x)
    except ValueError:
        return None
    return keyed


def node_at(tree: Any, path: KeyPath) -> Any:
    """The subtree at ``path`` (used to describe parents in error messages)."""
    node = tree
    for key in path:
        for child_key, child in children_with_keys(node) or ():
            if child_key == key:
                node = child
                break
        else:
            raise SelectionError(f"No node at {format_path(path)} (stopped at {key!r}).")
    return node
