"""Property tests of the selector laws, against a naive recursive reference walk."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pzbridge.core.selectors import NotInThisPartition, Selection, combine, select
from pzbridge.core.tree_util import tree_equal
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.testing.trees import Layer, Pair, Sequential, random_struct_trees, sequential_like_trees


class Var(AbstractVariable):
    """A test-only variable: a mutable box with identity equality."""

    def __init__(self, value: Any, label: str = "v") -> None:
        self._value = value
        self.label = label

    @property
    def value(self) -> Any:
        return self._value


# -- An independent reference: naive recursion over one-level flattening. --


def ref_children(x: Any):
    try:
        keyed, _ = jax.tree_util.flatten_one_level_with_keys(x)
    except ValueError:
        return None
    return list(keyed)


def ref_outermost(node: Any, pred, path=()) -> list:
    if pred(node):
        return [(path, node)]
    out = []
    for key, child in ref_children(node) or ():
        out += ref_outermost(child, pred, path + (key,))
    return out


def ref_all_nodes(node: Any, path=()) -> list:
    out = [(path, node)]
    for key, child in ref_children(node) or ():
        out += ref_all_nodes(child, path + (key,))
    return out


def dedupe_variables(pairs: list) -> list:
    seen, out = set(), []
    for path, node in pairs:
        if isinstance(node, AbstractVariable):
            if id(node) in seen:
                continue
            seen.add(id(node))
        out.append((path, node))
    return out


def is_jax_leaf(x: Any) -> bool:
    return ref_children(x) is None


def is_childless(x: Any) -> bool:
    kids = ref_children(x)
    return kids is None or not kids


def same_tree(a: Any, b: Any) -> bool:
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and tree_equal(a, b)


trees = random_struct_trees(max_depth=4, max_leaves=10)
shared_trees = random_struct_trees(max_depth=4, max_leaves=10, variable_factory=Var)

SELECTORS = {
    "instances_of_pair": lambda s: s.at_instances_of(Pair),
    "instances_of_layer_innermost": lambda s: s.at_instances_of((Layer, Pair), innermost=True),
    "pytree_leaves": lambda s: s.at_pytree_leaves(),
    "children": lambda s: s.at_children(),
    "childless": lambda s: s.at_childless(),
    "lists": lambda s: s.at_subtrees_where(lambda x: isinstance(x, list)),
    "lists_then_children": lambda s: s.at_subtrees_where(lambda x: isinstance(x, (list, tuple))).at_children(),
    "variables": lambda s: s.at_instances_of(AbstractVariable),
    "inverted_leaves": lambda s: s.at_pytree_leaves().pick_nth_selected(0).invert()
    if s.at_pytree_leaves().count()
    else s,
}
selector_names = st.sampled_from(sorted(SELECTORS))


@given(shared_trees, selector_names)
def test_apply_identity_returns_the_same_tree(tree, name):
    result = SELECTORS[name](select(tree)).apply(lambda x: x)
    assert same_tree(result, tree)


@given(shared_trees, selector_names)
def test_deselect_of_any_selection_is_the_original(tree, name):
    assert same_tree(SELECTORS[name](select(tree)).deselect(), tree)


@given(shared_trees, st.data())
def test_set_of_get_returns_the_tree(tree, data):
    nodes = ref_all_nodes(tree)
    path, node = data.draw(st.sampled_from(nodes))
    sel = select(tree).at_keypaths([path])
    assert sel.get_keypaths() == (path,)
    assert sel.get() is node
    assert same_tree(sel.set(sel.get()), tree)


@given(shared_trees)
def test_count_and_keypaths_of_instances_match_a_naive_walk(tree):
    expected = dedupe_variables(ref_outermost(tree, lambda x: isinstance(x, (Pair, Sequential))))
    sel = select(tree).at_instances_of((Pair, Sequential))
    assert sel.count() == len(expected)
    assert sel.get_keypaths() == tuple(p for p, _ in expected)
    assert all(a is b for a, b in zip(sel.get_sequence(), (n for _, n in expected)))


@given(shared_trees)
def test_leaves_are_selected_once_per_variable(tree):
    expected = dedupe_variables([(p, n) for p, n in ref_all_nodes(tree) if is_jax_leaf(n)])
    sel = select(tree).at_pytree_leaves()
    assert sel.count() == len(expected)
    assert all(kp == p and v is n for (kp, v), (p, n) in zip(sel.get_by_path().items(), expected))


@given(shared_trees)
def test_childless_selection_matches_a_naive_walk(tree):
    expected = dedupe_variables(ref_outermost(tree, is_childless))
    assert select(tree).at_childless().get_keypaths() == tuple(p for p, _ in expected)


@given(trees)
def test_apply_on_leaves_matches_jax_tree_map(tree):
    def f(x):
        return x * 2 + 1

    assert same_tree(select(tree).at_pytree_leaves().apply(f), jax.tree_util.tree_map(f, tree))


@given(trees, st.data())
def test_at_subtrees_where_with_keypath_matches_naive_walk(tree, data):
    depth = data.draw(st.integers(0, 3))
    expected = ref_outermost_with_path(tree, lambda p, x: len(p) == depth)
    got = select(tree).at_subtrees_where(lambda p, x: len(p) == depth, with_keypath=True)
    assert got.get_keypaths() == tuple(p for p, _ in expected)


def ref_outermost_with_path(node, pred, path=()):
    if pred(path, node):
        return [(path, node)]
    out = []
    for key, child in ref_children(node) or ():
        out += ref_outermost_with_path(child, pred, path + (key,))
    return out


def covered_childless(tree: Any, keypaths) -> set:
    """Childless positions at or under any of ``keypaths``."""
    spots = {p for p, n in ref_all_nodes(tree) if is_childless(n)}
    return {s for s in spots if any(s[: len(k)] == k for k in keypaths)}


@given(shared_trees, selector_names)
def test_double_invert_covers_the_same_places(tree, name):
    sel = SELECTORS[name](select(tree))
    twice = sel.invert().invert()
    # Occurrence places of sel (a shared variable fills several).
    places = [p for p, n in ref_all_nodes(tree) if any(p[: len(k)] == k for k in sel.get_keypaths())]
    shared_ids = {id(v) for v in sel.get_sequence() if isinstance(v, AbstractVariable)}
    places += [p for p, n in ref_all_nodes(tree) if id(n) in shared_ids]
    assert covered_childless(tree, twice.get_keypaths()) == covered_childless(tree, places)


@given(shared_trees, selector_names)
def test_triple_invert_equals_single_invert(tree, name):
    sel = SELECTORS[name](select(tree))
    assert sel.invert().invert().invert().get_keypaths() == sel.invert().get_keypaths()


@given(trees, st.data())
def test_invert_of_a_node_with_a_sibling_is_an_involution(tree, data):
    # Exact keypath involution holds when the selected node has a sibling.
    candidates = [
        (p, n) for p, n in ref_all_nodes(tree) if p and len(ref_children(select(tree).at_keypaths([p[:-1]]).get())) > 1
    ]
    if not candidates:
        return
    path, _ = data.draw(st.sampled_from(candidates))
    sel = select(tree).at_keypaths([path])
    assert sel.invert().invert().get_keypaths() == (path,)


@given(sequential_like_trees(nested=True), st.data())
def test_insert_after_then_remove_inserted_returns_the_original(model, data):
    layers = select(model).at_instances_of(Layer)
    if layers.is_empty():
        return
    picks = data.draw(st.lists(st.integers(0, layers.count() - 1), min_size=1, max_size=3, unique=True))
    new = Layer(np.zeros(1, np.float32), np.ones(1, np.float32), name="inserted")
    inserted = layers.pick_nth_selected(picks).insert_after(new, and_select=True)
    assert inserted.count() == len(picks)
    grown = inserted.deselect()
    assert select(grown).at_instances_of(Layer).count() == layers.count() + len(picks)
    assert same_tree(inserted.remove_from_parent(), model)
    # Also by selecting the inserted layers afresh, by name.
    again = select(grown).at_subtrees_where(lambda x: isinstance(x, Layer) and x.name == "inserted")
    assert same_tree(again.remove_from_parent(), model)


@given(sequential_like_trees(nested=True), st.data())
def test_insert_before_matches_a_list_reference(model, data):
    index = data.draw(st.integers(0, len(model.sublayers) - 1))
    new = Layer(1, 2, name="new")
    got = select(model).at(lambda m: m.sublayers[index]).insert_before(new)
    expected = Sequential(model.sublayers[:index] + [new] + model.sublayers[index:])
    assert same_tree(got, expected)


@given(shared_trees)
def test_apply_keeps_shared_variables_shared(tree):
    places = [(p, n) for p, n in ref_all_nodes(tree) if isinstance(n, Var)]
    calls = []

    def bump(v):
        calls.append(v)
        return Var(v.value + 1, label=v.label)

    result = select(tree).at_instances_of(AbstractVariable).apply(bump)
    assert len(calls) == len({id(n) for _, n in places})
    new_at = {p: n for p, n in ref_all_nodes(result) if isinstance(n, Var)}
    assert set(new_at) == {p for p, _ in places}
    for p1, old1 in places:
        for p2, old2 in places:
            assert (new_at[p1] is new_at[p2]) == (old1 is old2)
        np.testing.assert_array_equal(new_at[p1].value, old1.value + 1)


@given(shared_trees, st.data())
def test_replacing_a_variable_at_one_place_replaces_it_everywhere(tree, data):
    places = [(p, n) for p, n in ref_all_nodes(tree) if isinstance(n, Var)]
    if not places:
        return
    path, var = data.draw(st.sampled_from(places))
    fresh = Var(0.0)
    result = select(tree).at_keypaths([path]).set(fresh)
    for p, n in ref_all_nodes(result):
        if p in {q for q, m in places if m is var}:
            assert n is fresh
    assert not any(n is var for _, n in ref_all_nodes(result))


@given(shared_trees, selector_names, st.booleans())
def test_partition_then_combine_is_the_original(tree, name, at_leaves):
    sel = SELECTORS[name](select(tree))
    selected_part, rest = sel.partition(at_leaves=at_leaves)
    assert same_tree(combine(selected_part, rest), tree)
    if at_leaves:
        is_hole = lambda x: isinstance(x, NotInThisPartition)  # noqa: E731
        s1 = jax.tree_util.tree_structure(jax.tree_util.tree_map(lambda _: 0, selected_part, is_leaf=is_hole))
        s2 = jax.tree_util.tree_structure(jax.tree_util.tree_map(lambda _: 0, rest, is_leaf=is_hole))
        assert s1 == s2


@given(shared_trees, selector_names)
def test_selection_survives_a_jax_tree_map_round_trip(tree, name):
    sel = SELECTORS[name](select(tree))
    again = jax.tree_util.tree_map(lambda x: x, sel)
    assert isinstance(again, Selection)
    assert again.get_keypaths() == sel.get_keypaths()
    assert same_tree(again.deselect(), tree)


@given(trees, selector_names)
def test_selection_of_a_selection_deselects_both_levels(tree, name):
    inner = SELECTORS[name](select(tree))
    outer = select(inner).at_instances_of(Pair)
    rebuilt = outer.deselect()
    assert isinstance(rebuilt, Selection)
    assert same_tree(rebuilt.deselect(), tree)


@given(trees, st.data())
def test_where_and_pick_keep_the_expected_entries(tree, data):
    sel = select(tree).at_pytree_leaves()
    n = sel.count()
    if n == 0:
        return
    keep = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    flags = iter(keep)
    filtered = sel.where(lambda _: next(flags))
    expected = tuple(k for k, f in zip(sel.get_keypaths(), keep) if f)
    assert filtered.get_keypaths() == expected
    picked = sel.pick_nth_selected([i for i, f in enumerate(keep) if f])
    assert picked.get_keypaths() == expected
