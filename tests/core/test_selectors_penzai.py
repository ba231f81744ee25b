"""Penzai 0.2.5 selector features: select_and_set_by_path, at_subtrees_where(absolute_keypath=True)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.tree_util import DictKey, SequenceKey

import pzbridge as pzb
from pzbridge.core.errors import SelectionError


def test_select_and_set_by_path_uses_keypaths_relative_to_each_selection():
    tree = {"blocks": [{"b": 1, "w": 2}, {"b": 3, "w": 4}], "head": {"b": 5, "w": 6}}
    out = pzb.select(tree).at(lambda t: t["blocks"]).at_children().select_and_set_by_path(
        {(DictKey("w"),): 0})
    assert out == {"blocks": [{"b": 1, "w": 0}, {"b": 3, "w": 0}], "head": {"b": 5, "w": 6}}
    whole = pzb.select(tree).select_and_set_by_path({(DictKey("head"), DictKey("b")): -1})
    assert whole["head"] == {"b": -1, "w": 6} and whole["blocks"] == tree["blocks"]


def test_select_and_set_by_path_errors():
    tree = [{"b": 1}, {"b": 2, "c": 3}]
    with pytest.raises(SelectionError, match="at_keypaths: no node at"):
        pzb.select(tree).at_children().select_and_set_by_path({(DictKey("c"),): 0})
    with pytest.raises(SelectionError, match="lie inside another replaced keypath"):
        pzb.select({"a": {"b": 1}}).select_and_set_by_path({(DictKey("a"),): 0, (DictKey("a"), DictKey("b")): 1})


def test_absolute_keypath_passes_root_relative_paths():
    tree = {"x": [10, 20], "y": [30]}
    seen = []

    def pred(path, node):
        seen.append(path)
        return path == (DictKey("x"), SequenceKey(1))

    sel = pzb.select(tree).at(lambda t: t["x"]).at_subtrees_where(pred, with_keypath=True, absolute_keypath=True)
    assert sel.get_keypaths() == ((DictKey("x"), SequenceKey(1)),) and sel.get() == 20
    assert seen[0] == (DictKey("x"),)
    relative = pzb.select(tree).at(lambda t: t["x"]).at_subtrees_where(
        lambda p, n: p == (SequenceKey(1),), with_keypath=True)
    assert relative.get() == 20
    innermost = pzb.select(tree).at_children().at_subtrees_where(
        lambda p, n: p[:1] == (DictKey("y"),), with_keypath=True, absolute_keypath=True, innermost=True)
    assert innermost.get_sequence() == (30,)
    with pytest.raises(SelectionError, match="with_keypath is False"):
        pzb.select(tree).at_subtrees_where(lambda n: True, absolute_keypath=True)


@settings(max_examples=20, derandomize=True)
@given(st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=3), min_size=1, max_size=4), st.integers(0, 3))
def test_absolute_keypath_selects_what_a_root_search_selects(rows, target):
    tree = {"rows": rows}
    wanted = lambda path, node: isinstance(node, int) and path[-1] == SequenceKey(target % 3)
    from_rows = pzb.select(tree).at(lambda t: t["rows"]).at_children().at_subtrees_where(
        wanted, with_keypath=True, absolute_keypath=True)
    from_root = pzb.select(tree).at_subtrees_where(wanted, with_keypath=True)
    assert from_rows.get_keypaths() == from_root.get_keypaths()
