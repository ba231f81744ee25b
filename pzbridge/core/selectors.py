"""Selectors: pick parts of a model tree, then edit them as data.

``pzb.select(tree)`` returns a :class:`Selection` of the whole tree; ``at_*``
methods narrow it (by accessor, keypath, type, predicate, equality, children,
leaves); ``apply`` / ``set`` / ``insert_after`` / ``remove_from_parent`` /
``partition`` / ``deselect`` build the edited tree. The design follows
Penzai's: a selection is itself a pytree (a :class:`Struct`) holding
``selected_by_path`` (keypath -> selected subtree, in traversal order) and
``remainder`` (the tree with a :class:`SelectionHole` where each selected
subtree was), so every edit is "select, transform, rebuild". Selected
subtrees never nest: a selector keeps the outermost match unless asked for
the innermost.

Two departures from Penzai, both deliberate:

* **Speed.** Internally a selection is kept flat (one treedef, its leaves and
  the selected leaf positions; see :mod:`pzbridge.core.selectors_flat`), so a
  predicate selector costs one ``tree_flatten`` with an ``is_leaf`` that stops
  at matches, and an edit costs one ``tree_unflatten``. The ``remainder`` and
  keypaths are built only when read. ``benchmarks/selector_bench.py`` measures
  this against Penzai relative to ``jax.tree_util.tree_flatten``.
* **Sharing.** A :class:`~pzbridge.core.variable_base.AbstractVariable` is an
  identity-carrying leaf. When one variable object is selected at several
  places (``at_instances_of(AbstractVariable)``, ``at_pytree_leaves()``), it is
  one selected *entry*: ``count``, ``get_sequence`` and ``get_by_path`` list it
  once (under its first keypath), ``apply(fn)`` calls ``fn`` once and writes the
  single result to every place, and replacing a selected variable also
  replaces it where it occurs in the unselected part of the tree. Edits keep
  tied variables tied.

Example:
    >>> import pzbridge as pzb
    >>> tree = {"a": [1, 2], "b": 3}
    >>> pzb.select(tree).at(lambda t: t["a"][1]).set(20)
    {'a': [1, 20], 'b': 3}
    >>> pzb.select(tree).at_pytree_leaves().apply(lambda x: x * 10)
    {'a': [10, 20], 'b': 30}
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

import jax
import numpy as np

from pzbridge.core import selectors_flat as fl
from pzbridge.core.errors import SelectionError, format_path
from pzbridge.core.selectors_flat import KeyPath, SelectionHole, SelectionQuote
from pzbridge.core.selectors_splice import splice
from pzbridge.core.state_copy import fresh_state
from pzbridge.core.struct import Struct, pytree_dataclass, register_select
from pzbridge.core.tree_util import tree_equal

__all__ = [
    "KeyPath",
    "NotInThisPartition",
    "Selection",
    "SelectionHole",
    "SelectionQuote",
    "combine",
    "select",
]

_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)


def _describe(flat: fl.Flat, limit: int = 5) -> str:
    """'3 selected nodes at a, b[0], c' for error messages."""
    n = len(flat.values)
    if n == 0:
        return "0 selected nodes"
    keys = [format_path(k) for k in flat.entry_keys()]
    shown = ", ".join(keys[:limit]) + (f", ... ({n - limit} more)" if n > limit else "")
    return f"{n} selected node{'s' if n != 1 else ''} at {shown}"


def _check_bool(result: Any, what: str) -> bool:
    if isinstance(result, (bool, np.bool_)):
        return bool(result)
    raise SelectionError(
        f"{what} must return a Python bool, but returned {type(result).__name__} "
        f"({result!r:.60}). Fix: return a bool, e.g. wrap an array test in bool(...) "
        "or use isinstance checks."
    )


def _check_keypaths_found(wanted: set[KeyPath], found: set[KeyPath], within: fl.Flat) -> None:
    """Raises for keypaths that are neither selected nor inside a selected keypath."""
    missing = [p for p in wanted if not any(p[:i] in found for i in range(len(p), -1, -1))]
    if not missing:
        return
    shown = sorted(format_path(p) for p in missing)
    raise SelectionError(
        f"at_keypaths: no node at {shown[:5]}{' ...' if len(shown) > 5 else ''} in {_describe(within)}; "
        "expected keypaths of existing nodes, relative to each selected subtree, found none there. Fix: build "
        "them from the tree itself (pzb.select(tree).at_pytree_leaves().get_keypaths(), or "
        "jax.tree_util.tree_flatten_with_path), or pass allow_missing=True to skip them."
    )


@pytree_dataclass
class Selection(Struct):
    """A set of non-overlapping selected subtrees of a tree, plus the rest.

    A selection is a pytree: its children are the selected subtrees (in
    ``selected_by_path``) and the remainder, so it can pass through
    ``jax.tree_util`` functions and come back a valid selection. Build one
    with :func:`select`; do not construct it by hand.

    Attributes:
      selected_by_path: ``OrderedDict`` from keypath (a tuple of JAX key
        entries) to selected subtree, in traversal order. A variable selected
        at several places appears once, under its first keypath.
      remainder: The tree with a :class:`SelectionHole` at every selected
        place (holes and quotes already in the data are wrapped in
        :class:`SelectionQuote`).

    Example:
        >>> sel = select([1, (2, 3)]).at(lambda t: t[1][0])
        >>> sel.get_keypaths()
        ((SequenceKey(idx=1), SequenceKey(idx=0)),)
        >>> sel.remainder
        [1, (SelectionHole(path=(SequenceKey(idx=1), SequenceKey(idx=0))), 3)]
    """

    selected_by_path: collections.OrderedDict
    remainder: Any

    # -- Internal: the flat form, and lazy fields ---------------------------
    @classmethod
    def _from_flat(cls, flat: fl.Flat) -> Selection:
        sel = object.__new__(cls)
        object.__setattr__(sel, "_flat_form", flat)
        return sel

    def _flat(self) -> fl.Flat:
        flat = self.__dict__.get("_flat_form")
        if flat is None:
            flat = fl.flat_from_fields(self.selected_by_path, self.remainder)
            object.__setattr__(self, "_flat_form", flat)
        return flat

    def __getattr__(self, name: str) -> Any:
        # Only reached when a field was never set: a selection built from its
        # flat form materialises its fields on first read.
        if name in ("selected_by_path", "remainder"):
            flat = self.__dict__.get("_flat_form")
            if flat is not None:
                value = flat.selected_by_path() if name == "selected_by_path" else flat.remainder()
                object.__setattr__(self, name, value)
                return value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getstate__(self) -> dict:
        # Pickle / deepcopy the fields, not the internal flat form (it holds closures).
        return {"selected_by_path": self.selected_by_path, "remainder": self.remainder}

    def _refine(self, sub: Callable[[Any], fl.Flat]) -> Selection:
        return Selection._from_flat(fl.refine(self._flat(), sub))

    # -- Inspecting ----------------------------------------------------------
    def _detach(self, result: Any, share_state: bool) -> Any:
        """An edit's result with fresh copies of the state variables it shares with the source (see state_copy)."""
        return result if share_state else fresh_state(result, source=self._flat().rebuild())

    def count(self) -> int:
        """Number of selected entries (a shared variable counts once).

        Example:
            >>> select([1, 2, 3]).at_pytree_leaves().count()
            3
        """
        return len(self._flat().values)

    def __len__(self) -> int:
        return self.count()

    def is_empty(self) -> bool:
        """True when nothing is selected.

        Example:
            >>> select([1, 2]).at_instances_of(str).is_empty()
            True
        """
        return not self._flat().values

    def assert_count_is(self, n: int) -> Selection:
        """Returns this selection if it selects exactly ``n`` entries.

        Raises:
          SelectionError: Naming the count and paths found otherwise.

        Example:
            >>> select([1, 2]).at_pytree_leaves().assert_count_is(2).count()
            2
        """
        flat = self._flat()
        if len(flat.values) != n:
            raise SelectionError(
                f"Expected {n} selected node(s), found {_describe(flat)}. "
                "Fix: adjust the selector (e.g. .where(...), .pick_nth_selected(...)) or the "
                "expected count."
            )
        return self

    def get(self) -> Any:
        """The single selected subtree.

        Raises:
          SelectionError: If the selection does not have exactly one entry.

        Example:
            >>> select({"w": 1, "b": 2}).at(lambda t: t["b"]).get()
            2
        """
        flat = self._flat()
        if len(flat.values) != 1:
            raise SelectionError(
                f"Selection.get() needs exactly one selected node, found {_describe(flat)}. "
                "Fix: use .get_sequence() / .get_by_path(), or narrow the selection with "
                ".pick_nth_selected(i) or .where(...)."
            )
        return flat.values[0]

    def get_sequence(self) -> tuple[Any, ...]:
        """The selected subtrees in traversal order.

        Example:
            >>> select([1, (2, 3)]).at_pytree_leaves().get_sequence()
            (1, 2, 3)
        """
        return tuple(self._flat().values)

    def get_keypaths(self) -> tuple[KeyPath, ...]:
        """The keypaths of the selected entries, in traversal order.

        Example:
            >>> select({"a": 1}).at_pytree_leaves().get_keypaths()
            ((DictKey(key='a'),),)
        """
        return tuple(self._flat().entry_keys())

    def get_by_path(self) -> collections.OrderedDict:
        """A new ``OrderedDict`` from keypath to selected subtree.

        Example:
            >>> dict(select([7]).at_pytree_leaves().get_by_path())
            {(SequenceKey(idx=0),): 7}
        """
        return self._flat().selected_by_path()

    # -- Rebuilding ----------------------------------------------------------
    def deselect(self) -> Any:
        """Rebuilds the whole tree from the selected subtrees and the remainder.

        Example:
            >>> select([1, 2]).at(lambda t: t[0]).deselect()
            [1, 2]
        """
        return self._flat().rebuild()

    def apply(
        self, fn: Callable[..., Any], *, with_keypath: bool = False, keep_selected: bool = False,
        share_state: bool = False,
    ) -> Any:
        """Replaces each selected entry by ``fn(entry)`` (or ``fn(keypath, entry)``).

        ``fn`` is called once per entry; a variable selected at several places
        gets one call and its result is written to all of them (and to its
        unselected places, so it stays shared).

        Args:
          fn: The replacement function.
          with_keypath: Pass the entry's keypath as the first argument.
          keep_selected: Return the edited :class:`Selection` instead of the tree.
          share_state: Keep the source's ``StateVariable`` objects in the result.
            By default the result gets fresh copies of them (same labels and
            values), so running the edited copy never advances the source's
            state (a KV cache, a counter); parameters are shared either way.

        Returns:
          The rebuilt tree, or the selection with new values.

        Example:
            >>> select([1, 2]).at_pytree_leaves().apply(lambda x: -x)
            [-1, -2]
        """
        flat = self._flat()
        if with_keypath:
            new = [fn(k, v) for k, v in zip(flat.entry_keys(), flat.values)]
        else:
            new = [fn(v) for v in flat.values]
        if keep_selected:
            return self._detach(Selection._from_flat(flat.with_values(new)), share_state)
        return self._detach(flat.rebuild(new), share_state)

    def apply_with_selected_index(
        self, fn: Callable[[int, Any], Any], *, keep_selected: bool = False, share_state: bool = False
    ) -> Any:
        """Like :meth:`apply`, passing each entry's index in the selection.

        Example:
            >>> select(["a", "b"]).at_pytree_leaves().apply_with_selected_index(lambda i, x: x * (i + 1))
            ['a', 'bb']
        """
        flat = self._flat()
        new = [fn(i, v) for i, v in enumerate(flat.values)]
        if keep_selected:
            return self._detach(Selection._from_flat(flat.with_values(new)), share_state)
        return self._detach(flat.rebuild(new), share_state)

    def set(self, value: Any, *, allow_empty: bool = False, share_state: bool = False) -> Any:
        """Replaces every selected entry by ``value``.

        Setting on an empty selection is almost always a selector that
        missed (a wrong class or path), so it raises unless ``allow_empty``.

        Args:
          value: The replacement.
          allow_empty: Return the tree unchanged when nothing is selected.
          share_state: Keep the source's state variables (see :meth:`apply`).

        Raises:
          SelectionError: If nothing is selected and not ``allow_empty``.

        Example:
            >>> select([1, 2]).at(lambda t: t[1]).set(None)
            [1, None]
            >>> select([1, 2]).at_instances_of(str).set(0, allow_empty=True)
            [1, 2]
        """
        flat = self._flat()
        if not flat.values and not allow_empty:
            raise SelectionError(
                f".set(): the selection is empty, expected at least one selected node to replace, found "
                f"{_describe(flat)} (the tree's root is {type(flat.rebuild()).__name__}). Fix: check the "
                "selector (e.g. print pzb.select(tree).at_instances_of(object).get_keypaths()), or pass "
                "allow_empty=True to accept an unchanged tree."
            )
        return self._detach(flat.rebuild([value] * len(flat.values)), share_state)

    def set_sequence(self, values: Iterable[Any], *, share_state: bool = False) -> Any:
        """Replaces the selected entries, in order, by ``values``.

        Raises:
          SelectionError: If the number of values differs from :meth:`count`.

        Example:
            >>> select([1, 2]).at_pytree_leaves().set_sequence(["x", "y"])
            ['x', 'y']
        """
        flat = self._flat()
        new = list(values)
        if len(new) != len(flat.values):
            raise SelectionError(
                f"set_sequence got {len(new)} values for {_describe(flat)}. "
                "Fix: pass exactly one value per selected node (see .count())."
            )
        return self._detach(flat.rebuild(new), share_state)

    def set_by_path(
        self, replacement: Mapping[KeyPath, Any] | Callable[[KeyPath], Any], *, share_state: bool = False
    ) -> Any:
        """Replaces each entry by ``replacement[keypath]`` or ``replacement(keypath)``.

        Raises:
          SelectionError: If the mapping misses a selected keypath or names
            one that is not selected.

        Example:
            >>> sel = select([1, 2]).at_pytree_leaves()
            >>> sel.set_by_path(lambda path: path[0].idx)
            [0, 1]
        """
        flat = self._flat()
        keys = flat.entry_keys()
        if callable(replacement):
            return self._detach(flat.rebuild([replacement(k) for k in keys]), share_state)
        missing = [k for k in keys if k not in replacement]
        extra = [k for k in replacement if k not in set(keys)]
        if missing or extra:
            raise SelectionError(
                f"set_by_path: the mapping must have exactly the selected keypaths ({_describe(flat)}); "
                f"missing {[format_path(k) for k in missing][:5]}, not selected "
                f"{[format_path(k) for k in extra][:5]}. Fix: build it from .get_keypaths() "
                "or .get_by_path()."
            )
        return self._detach(flat.rebuild([replacement[k] for k in keys]), share_state)

    def select_and_set_by_path(self, replacements_by_path: Mapping[KeyPath, Any], *, share_state: bool = False) -> Any:
        """In each selected subtree, replaces the nodes at the given relative keypaths.

        ``at_keypaths`` and ``set_by_path`` in one step, with keypaths relative
        to each selected subtree (the same replacements go into every one).

        Args:
          replacements_by_path: Keypath (relative to a selected subtree) -> new value.

        Raises:
          SelectionError: If a keypath names no node in a selected subtree.

        Example:
            >>> from jax.tree_util import DictKey
            >>> tree = [{"b": 2, "w": 1}, {"b": 4, "w": 3}]
            >>> select(tree).at_children().select_and_set_by_path({(DictKey("b"),): 0})
            [{'b': 0, 'w': 1}, {'b': 0, 'w': 3}]
        """
        replacements = {tuple(k): v for k, v in replacements_by_path.items()}

        def replace_in(node: Any) -> Any:
            chosen = select(node).at_keypaths(replacements)
            # set_by_path keys are absolute within `node`, which is the root here: the relative keypaths.
            covered = {k: replacements[k] for k in chosen.get_keypaths()}
            inside = [k for k in replacements if k not in covered]
            if inside:
                raise SelectionError(
                    f"select_and_set_by_path: {[format_path(k) for k in inside][:5]} lie inside another replaced "
                    "keypath, so their replacement would be lost. Fix: replace only the outermost node."
                )
            return chosen.set_by_path(covered, share_state=True)  # The outer apply copies once, keeping ties.

        return self.apply(replace_in, share_state=share_state)

    # -- Narrowing -----------------------------------------------------------
    def at(self, accessor_fn: Callable[[Any], Any], multiple: bool = False) -> Selection:
        """Selects, in each selected subtree, the node(s) ``accessor_fn`` returns.

        ``accessor_fn`` gets a structural copy in which every leaf and
        childless node is wrapped in a unique marker, so it must only index
        (``t.layers[2]``, ``t["w"]``), not compute.

        Args:
          accessor_fn: Maps a subtree to one of its nodes, or (with
            ``multiple=True``) to a tuple/list of its nodes.
          multiple: Whether ``accessor_fn`` returns several nodes.

        Raises:
          SelectionError: If a returned value is not a node of the subtree.

        Example:
            >>> select({"a": [1, 2]}).at(lambda t: t["a"][0]).get()
            1
        """

        def sub(value: Any) -> fl.Flat:
            wrapped = jax.tree_util.tree_map(_Needle, value, is_leaf=fl.leaf_or_childless)
            try:
                found = accessor_fn(wrapped)
            except Exception as exc:  # noqa: BLE001 - re-raised with guidance.
                raise SelectionError(
                    f"The accessor passed to .at() raised {type(exc).__name__}: {exc}. It runs on a "
                    "structural copy whose leaves are wrapped, so it may only index into the "
                    "tree. Fix: index only (e.g. lambda t: t.layers[2]), or use .at_subtrees_where(pred) to "
                    "select by value."
                ) from exc
            needles = tuple(found) if multiple else (found,)
            ids = {id(n) for n in needles}
            keyed, _ = jax.tree_util.tree_flatten_with_path(wrapped, is_leaf=lambda x: id(x) in ids)
            paths = {id(x): p for p, x in keyed if id(x) in ids}
            missing = [n for n in needles if id(n) not in paths]
            if missing:
                shown = _Needle.unwrap(missing[0])
                raise SelectionError(
                    f".at(): the accessor returned {type(shown).__name__} {shown!r:.80}, which is not "
                    "a node of the selected subtree (or lies inside another returned node). "
                    "Fix: return a part of the argument itself, e.g. lambda t: t.layers[2]"
                    + ("; pass multiple=True to return several nodes." if not multiple else ".")
                )
            return fl.flat_at_paths(value, set(paths.values()))

        return self._refine(sub)

    def at_keypaths(self, keypaths: Collection[KeyPath], *, allow_missing: bool = False) -> Selection:
        """Selects the nodes at ``keypaths``, relative to each selected subtree.

        A keypath inside another selected keypath is covered by it (the
        outermost is selected); one that names no node in any selected
        subtree is an error unless ``allow_missing``.

        Args:
          keypaths: Tuples of JAX key entries (as ``get_keypaths()`` returns).
          allow_missing: Skip keypaths that name no node instead of raising.

        Raises:
          SelectionError: If a keypath names no node and not ``allow_missing``.

        Example:
            >>> from jax.tree_util import SequenceKey
            >>> select([1, 2]).at_keypaths([(SequenceKey(1),)]).get()
            2
            >>> select([1, 2]).at_keypaths([(SequenceKey(5),)], allow_missing=True).count()
            0
        """
        pathset = set(tuple(p) for p in keypaths)
        found: set[KeyPath] = set()

        def sub(value: Any) -> fl.Flat:
            flat = fl.flat_at_paths(value, pathset)
            found.update(tuple(p) for p in flat.occurrence_paths())
            return flat

        refined = self._refine(sub)
        if not allow_missing:
            _check_keypaths_found(pathset, found, self._flat())
        return refined

    def at_instances_of(self, cls: type | tuple[type, ...], innermost: bool = False) -> Selection:
        """Selects the outermost (or innermost) instances of ``cls``.

        Example:
            >>> select([1, "a", (2, "b")]).at_instances_of(str).get_sequence()
            ('a', 'b')
        """
        if innermost:
            return self.at_subtrees_where(lambda x: isinstance(x, cls), innermost=True)
        return self._refine(lambda value: fl.flat_instances(value, cls))

    def at_subtrees_where(
        self,
        pred: Callable[..., bool],
        *,
        with_keypath: bool = False,
        absolute_keypath: bool = False,
        innermost: bool = False,
    ) -> Selection:
        """Selects the subtrees where ``pred`` is true (outermost unless ``innermost``).

        ``pred`` must be deterministic and return a bool; it is not called on
        selection markers. With ``with_keypath`` it gets ``(keypath, subtree)``
        with the keypath relative to the selected subtree being searched, or,
        with ``absolute_keypath`` too, relative to the root of the whole tree.

        Raises:
          SelectionError: If ``absolute_keypath`` is set without ``with_keypath``.

        Example:
            >>> select([1, [2, 3]]).at_subtrees_where(lambda x: isinstance(x, list) and len(x) == 2).get_keypaths()
            ((),)
            >>> select([1, [2, 3]]).at_subtrees_where(
            ...     lambda x: isinstance(x, list) and len(x) == 2, innermost=True).get_keypaths()
            ((SequenceKey(idx=1),),)
        """
        what = "The predicate given to at_subtrees_where"
        if absolute_keypath and not with_keypath:
            raise SelectionError(
                "at_subtrees_where: absolute_keypath=True changes the keypath passed to the predicate, but "
                "with_keypath is False so none is passed. Fix: pass with_keypath=True too (pred(keypath, subtree))."
            )
        if absolute_keypath:
            # refine() calls `sub` once per entry, in entry order: pair each call with its entry's keypath.
            entry_keys = iter(self._flat().entry_keys())
            prefix: list[KeyPath] = [()]
            relative = pred

            def pred(path: KeyPath, x: Any) -> bool:
                return relative(prefix[0] + tuple(path), x)

            def with_prefix(sub: Callable[[Any], fl.Flat]) -> Callable[[Any], fl.Flat]:
                def run(value: Any) -> fl.Flat:
                    prefix[0] = tuple(next(entry_keys))
                    return sub(value)

                return run
        else:

            def with_prefix(sub: Callable[[Any], fl.Flat]) -> Callable[[Any], fl.Flat]:
                return sub

        if innermost:
            call = pred if with_keypath else (lambda p, x: pred(x))

            def sub(value: Any) -> fl.Flat:
                found: list[KeyPath] = []

                def walk(path: KeyPath, node: Any) -> bool:
                    if fl.is_marker(node):
                        return False
                    hit_below = False
                    for key, child in fl.children_with_keys(node) or ():
                        hit_below = walk(path + (key,), child) or hit_below
                    if not hit_below and _check_bool(call(path, node), what):
                        found.append(path)
                        return True
                    return hit_below

                walk((), value)
                return fl.flat_at_paths(value, set(found))

            return self._refine(with_prefix(sub))
        if with_keypath:

            def sub(value: Any) -> fl.Flat:
                hits: set = set()

                def stop(path: KeyPath, x: Any) -> bool:
                    if fl.is_marker(x):
                        return True
                    if _check_bool(pred(path, x), what):
                        hits.add(path)
                        return True
                    return False

                jax.tree_util.tree_flatten_with_path(value, is_leaf=stop, is_leaf_takes_path=True)
                return fl.flat_at_paths(value, hits)

            return self._refine(with_prefix(sub))

        def sub(value: Any) -> fl.Flat:
            hits: set[int] = set()

            def stop(x: Any) -> bool:
                if fl.is_marker(x):
                    return True
                if _check_bool(pred(x), what):
                    hits.add(id(x))
                    return True
                return False

            return fl.flat_where(value, stop, lambda x: id(x) in hits)

        return self._refine(sub)

    def at_equal_to(self, template: Any) -> Selection:
        """Selects the outermost subtrees equal to ``template``.

        Equality is structural (:func:`~pzbridge.core.tree_util.tree_equal`)
        between objects of the same type; arrays compare by shape, dtype and
        values, so ``at_equal_to(jnp.zeros(3))`` finds zero vectors.

        Example:
            >>> select([1, (1, 2), (1, 2)]).at_equal_to((1, 2)).count()
            2
        """
        if isinstance(template, _ARRAY_TYPES):
            return self.at_subtrees_where(lambda x: isinstance(x, _ARRAY_TYPES) and tree_equal(x, template))
        kind = type(template)
        return self.at_subtrees_where(lambda x: type(x) is kind and tree_equal(x, template))

    def at_children(self) -> Selection:
        """Selects the direct pytree children of each selected subtree.

        Example:
            >>> select({"a": [1], "b": 2}).at_children().get_sequence()
            ([1], 2)
        """

        def sub(value: Any) -> fl.Flat:
            keyed = fl.children_with_keys(value) or ()
            return fl.flat_at_paths(value, {(k,) for k, _ in keyed})

        return self._refine(sub)

    def at_pytree_leaves(self) -> Selection:
        """Selects every JAX leaf (variables included, each variable once).

        Example:
            >>> select({"a": [1, None], "b": 2}).at_pytree_leaves().get_sequence()
            (1, 2)
        """
        return self._refine(lambda value: fl.flat_where(value, fl.is_marker, lambda x: not fl.is_marker(x)))

    def at_childless(self) -> Selection:
        """Selects JAX leaves and childless nodes (``None``, ``()``, empty structs).

        Example:
            >>> select({"a": [1, None], "b": ()}).at_childless().get_sequence()
            (1, None, ())
        """
        stop = lambda x: fl.is_marker(x) or fl.leaf_or_childless(x)  # noqa: E731
        return self._refine(lambda value: fl.flat_where(value, stop, lambda x: not fl.is_marker(x)))

    def where(self, pred: Callable[..., bool], *, with_keypath: bool = False) -> Selection:
        """Keeps only the selected entries where ``pred(entry)`` (or ``pred(keypath, entry)``) holds.

        Example:
            >>> select([1, 2, 3]).at_pytree_leaves().where(lambda x: x > 1).get_sequence()
            (2, 3)
        """
        flat = self._flat()
        what = "The predicate given to where"
        if with_keypath:
            keep = [_check_bool(pred(k, v), what) for k, v in zip(flat.entry_keys(), flat.values)]
        else:
            keep = [_check_bool(pred(v), what) for v in flat.values]
        return Selection._from_flat(fl.keep_entries(flat, keep))

    def pick_nth_selected(self, n: int | Sequence[int]) -> Selection:
        """Keeps only the entries with index ``n`` (negative counts from the end).

        Raises:
          SelectionError: If an index is out of range.

        Example:
            >>> select([1, 2, 3]).at_pytree_leaves().pick_nth_selected([0, -1]).get_sequence()
            (1, 3)
        """
        flat = self._flat()
        count = len(flat.values)
        wanted = [n] if isinstance(n, (int, np.integer)) else list(n)
        chosen = set()
        for i in wanted:
            if not -count <= i < count:
                raise SelectionError(
                    f"pick_nth_selected({n!r}): index {i} is out of range for {_describe(flat)}. "
                    f"Fix: pass indices in [-{count}, {count})."
                )
            chosen.add(i % count)
        return Selection._from_flat(fl.keep_entries(flat, [i in chosen for i in range(count)]))

    def invert(self) -> Selection:
        """Selects the largest subtrees that contain no selected place.

        These are the siblings of the selected subtrees and of their
        ancestors. Inverting twice covers the same leaves and childless nodes,
        though it may select a parent instead of all of its children.

        Example:
            >>> select([1, (2, 3)]).at(lambda t: t[1][0]).invert().get_sequence()
            (1, 3)
        """
        flat = self._flat()
        tree = flat.rebuild()
        selected = set(flat.occurrence_paths())
        prefixes = {p[:i] for p in selected for i in range(len(p))}
        keyed, _ = jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda p, x: p in selected or p not in prefixes, is_leaf_takes_path=True
        )
        inverse = {p for p, _ in keyed if p not in selected and p not in prefixes}
        return Selection._from_flat(fl.flat_at_paths(tree, inverse))

    def refine(self, fn: Callable[[Any], Selection]) -> Selection:
        """Selects, in each selected subtree, what ``fn(subtree)`` selects.

        ``fn`` returns a :class:`Selection` of (a possibly edited version of)
        its argument; the results are combined into one selection of the
        whole tree.

        Example:
            >>> sel = select([[1, 2], [3]]).at_children()
            >>> sel.refine(lambda l: select(l).at(lambda t: t[0])).get_sequence()
            (1, 3)
        """

        def sub(value: Any) -> fl.Flat:
            result = fn(value)
            if not isinstance(result, Selection):
                raise SelectionError(
                    f"refine(fn): fn must return a Selection, but returned {type(result).__name__}. "
                    "Fix: return e.g. pzb.select(subtree).at(...)."
                )
            return result._flat()

        return self._refine(sub)

    # -- Structural edits (parents must be lists or tuples) ------------------
    def apply_and_inline(
        self, fn: Callable[..., Sequence[Any]], *, with_keypath: bool = False, share_state: bool = False
    ) -> Any:
        """Replaces each selected list/tuple element by the elements ``fn`` returns.

        ``fn`` is called once per entry; its result is spliced into the
        parent at every place the entry occupies. See
        :mod:`pzbridge.core.selectors_splice` for what counts as a parent.

        Raises:
          SelectionError: If a selected node is not an element of a list or
            tuple, or ``fn`` does not return a list or tuple.

        Example:
            >>> select([1, 2, 3]).at(lambda t: t[1]).apply_and_inline(lambda x: (x, x))
            [1, 2, 2, 3]
        """
        flat = self._flat()
        results: dict[int, Sequence[Any]] = {}

        def items(entry: int) -> Sequence[Any]:
            if entry not in results:
                value = flat.values[entry]
                out = fn(flat.entry_keys()[entry], value) if with_keypath else fn(value)
                if not isinstance(out, (list, tuple)):
                    raise SelectionError(
                        f"apply_and_inline: fn must return a list or tuple of elements, but returned "
                        f"{type(out).__name__} for the node at {format_path(flat.entry_keys()[entry])}. "
                        "Fix: return [new] for a one-for-one replacement, or use .apply(fn)."
                    )
                results[entry] = out
            return results[entry]

        return self._detach(splice(flat, items, "apply_and_inline"), share_state)

    def remove_from_parent(self, *, share_state: bool = False) -> Any:
        """Removes every selected node from its parent list or tuple.

        Example:
            >>> select([1, 2, 3]).at(lambda t: t[0]).remove_from_parent()
            [2, 3]
        """
        return self._detach(splice(self._flat(), lambda entry: (), "remove_from_parent"), share_state)

    def insert_before(self, value: Any, *, and_select: bool = False, share_state: bool = False) -> Any:
        """Inserts ``value`` before each selected node in its parent list or tuple.

        Args:
          value: The element to insert (the same object at every place).
          and_select: Return a selection of the inserted elements instead of
            the tree.
          share_state: Keep the source's state variables (see :meth:`apply`).

        Example:
            >>> select((1, 2)).at(lambda t: t[1]).insert_before(9)
            (1, 9, 2)
        """
        return self._detach(self._insert(value, before=True, and_select=and_select), share_state)

    def insert_after(self, value: Any, *, and_select: bool = False, share_state: bool = False) -> Any:
        """Inserts ``value`` after each selected node in its parent list or tuple.

        Args:
          value: The element to insert (the same object at every place).
          and_select: Return a selection of the inserted elements instead of
            the tree.
          share_state: Keep the source's state variables (see :meth:`apply`).

        Example:
            >>> select([1, 2]).at(lambda t: t[0]).insert_after(9)
            [1, 9, 2]
        """
        return self._detach(self._insert(value, before=False, and_select=and_select), share_state)

    def _insert(self, value: Any, before: bool, and_select: bool) -> Any:
        flat = self._flat()
        name = "insert_before" if before else "insert_after"
        values = flat.values
        if and_select:
            new = lambda: fl.Mark(value)  # noqa: E731 - one boundary per inserted place.
        else:
            new = lambda: value  # noqa: E731
        if before:
            tree = splice(flat, lambda e: (new(), values[e]), name)
        else:
            tree = splice(flat, lambda e: (values[e], new()), name)
        return Selection._from_flat(fl.flat_from_marked(tree)) if and_select else tree

    # -- Partitioning ----------------------------------------------------------
    def partition(self, at_leaves: bool = False) -> tuple[Any, Any]:
        """Splits the tree into ``(selected_part, unselected_part)``.

        Contract: both parts are pytrees shaped like the original tree.
        ``selected_part`` keeps the selected subtrees and has
        ``NotInThisPartition()`` in place of every maximal unselected subtree
        (those of :meth:`invert`); ``unselected_part`` is the original tree with
        ``NotInThisPartition()`` in place of each selected subtree. With
        ``at_leaves=True`` the replacement is made leaf by leaf, so both parts
        have exactly the original structure with each JAX leaf present in
        one part and ``NotInThisPartition()`` in the other. Because
        ``NotInThisPartition`` has no pytree children, each part can go through
        ``jax.grad`` / ``jax.jit`` on its own; :func:`combine` puts them back
        together (``combine(*sel.partition()) == sel.deselect()``).

        Example:
            >>> sel, rest = select({"w": 1, "b": 2}).at(lambda t: t["w"]).partition()
            >>> sel, rest
            ({'b': NotInThisPartition(), 'w': 1}, {'b': 2, 'w': NotInThisPartition()})
            >>> combine(sel, rest)
            {'b': 2, 'w': 1}
        """
        hole = NotInThisPartition()
        inverse = self.invert()
        if at_leaves:
            inverse = inverse.at_pytree_leaves()
            own = self.at_pytree_leaves()
        else:
            own = self
        inverse_flat, own_flat = inverse._flat(), own._flat()
        selected_part = inverse_flat.fill([hole] * len(inverse_flat.values))
        unselected_part = own_flat.fill([hole] * len(own_flat.values))
        return selected_part, unselected_part

    # -- Display ----------------------------------------------------------------
    def show_selection(self) -> None:
        """Displays the tree with selected parts highlighted (treescope).

        In IPython this shows an interactive treescope rendering; elsewhere it
        prints the text rendering. Use
        :func:`pzbridge.core.selectors_treescope.render_selection_to_text` to get
        the text.

        Example:
            >>> select({"w": 1}).at(lambda t: t["w"]).show_selection()  # doctest: +ELLIPSIS
            pzb.select(...) with 1 selected node:
            ...
        """
        from pzbridge.core import selectors_treescope

        selectors_treescope.show_selection(self)

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        from pzbridge.core import selectors_treescope

        return selectors_treescope.render_selection(self, subtree_renderer)


class _Needle:
    """Wraps a leaf so the accessor of :meth:`Selection.at` returns a unique object."""

    __slots__ = ("wrapped",)

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    @staticmethod
    def unwrap(x: Any) -> Any:
        return jax.tree_util.tree_map(
            lambda y: y.wrapped if isinstance(y, _Needle) else y, x,
            is_leaf=lambda y: isinstance(y, _Needle),
        )


@pytree_dataclass
class NotInThisPartition(Struct):
    """Stands for a part of the tree that lives in another partition.

    It has no pytree children, so JAX transformations see nothing there.
    Produced by :meth:`Selection.partition`; consumed by :func:`combine`.

    Example:
        >>> jax.tree_util.tree_leaves([NotInThisPartition(), 1])
        [1]
    """

    def __repr__(self) -> str:
        return "NotInThisPartition()"


def select(tree: Any) -> Selection:
    """Starts a selection of the whole ``tree`` (keypath ``()``).

    Works on any pytree: lists, tuples, dicts, :class:`Struct` instances and
    other registered nodes (Equinox modules, ...).

    Example:
        >>> select([1, 2]).get()
        [1, 2]
    """
    return Selection._from_flat(fl.flat_root(tree))


# Struct.select() starts a selection; struct.py cannot import this module (a
# Selection is a Struct), so it is told which function to call.
register_select(select)


def _one_level(x: Any) -> tuple[list, Any]:
    children, _ = jax.tree_util.flatten_one_level(x)
    treedef = jax.tree_util.tree_structure(x, is_leaf=lambda y: y is not x)
    return list(children), treedef


def combine(*parts: Any) -> Any:
    """Merges trees made by :meth:`Selection.partition` back into one tree.

    At every place exactly one part holds something other than
    :class:`NotInThisPartition`; parts may hold a whole subtree where the
    others hold nodes with holes further down.

    Raises:
      SelectionError: If two parts both hold a value at the same place, or
        their structures disagree.

    Example:
        >>> combine([1, NotInThisPartition()], [NotInThisPartition(), 2])
        [1, 2]
    """
    if not parts:
        raise SelectionError("combine() needs at least one tree, found no arguments. Fix: pass the parts from "
                             ".partition(), e.g. combine(*sel.partition()).")

    def merge(path: KeyPath, nodes: list) -> Any:
        present = [n for n in nodes if not isinstance(n, NotInThisPartition)]
        if not present:
            return NotInThisPartition()
        if len(present) == 1:
            return present[0]
        try:
            split = [_one_level(n) for n in present]
        except ValueError:
            split = None
        if split is None or any(td != split[0][1] for _, td in split):
            raise SelectionError(
                f"combine(): {len(present)} parts hold a value at {format_path(path)} "
                f"({', '.join(type(n).__name__ for n in present)}); each place must be filled by "
                "exactly one part. Fix: combine parts of one .partition() call (or of repeated "
                "partitions of the same tree)."
            )
        keys = [k for k, _ in jax.tree_util.flatten_one_level_with_keys(present[0])[0]]
        children = [
            merge(path + (key,), [s[0][i] for s in split]) for i, key in enumerate(keys)
        ]
        return split[0][1].unflatten(children)

    return merge((), list(parts))
