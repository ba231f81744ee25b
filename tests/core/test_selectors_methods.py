"""Unit tests of every Selection method and every error, on literal trees."""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

import pzbridge as pzb
from pzbridge.core.errors import SelectionError
from pzbridge.core.selectors import (
    NotInThisPartition,
    Selection,
    SelectionHole,
    SelectionQuote,
    combine,
    select,
)
from pzbridge.core.struct import Struct, pytree_dataclass
from pzbridge.core.tree_util import tree_equal
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.testing.trees import Layer, Pair, Sequential, Wrapper


class Var(AbstractVariable):
    def __init__(self, value: Any, label: str = "v") -> None:
        self._value = value
        self.label = label

    @property
    def value(self) -> Any:
        return self._value


@pytree_dataclass
class Block(Struct):
    attn: Any
    mlp: Any


def model() -> Sequential:
    return Sequential([Layer(1, 2, name="a"), Block(Layer(3, 4, name="q"), Layer(5, 6, name="m")), Layer(7, 8, name="z")])


A, S, D = GetAttrKey, SequenceKey, DictKey


# -- Selecting -------------------------------------------------------------------


def test_select_selects_the_root():
    sel = select([1, 2])
    assert sel.get_keypaths() == ((),)
    assert sel.get() == [1, 2]
    assert isinstance(sel.remainder, SelectionHole)


def test_pzb_namespace_exports_select_and_struct_select_method():
    assert pzb.select is select
    assert Layer(1, 2).select().at(lambda l: l.bias).get() == 2


def test_at_selects_one_node_by_accessor():
    sel = select(model()).at(lambda m: m.sublayers[1].attn)
    assert sel.get_keypaths() == ((A("sublayers"), S(1), A("attn")),)
    assert sel.get().name == "q"


def test_at_with_multiple_selects_several_nodes_in_tree_order():
    sel = select(model()).at(lambda m: (m.sublayers[2], m.sublayers[0].weight), multiple=True)
    assert sel.get_keypaths() == ((A("sublayers"), S(0), A("weight")), (A("sublayers"), S(2)))


def test_at_can_select_none_and_empty_containers():
    tree = {"a": None, "b": ()}
    assert select(tree).at(lambda t: t["a"]).set(5) == {"a": 5, "b": ()}
    assert select(tree).at(lambda t: t["b"]).set(6) == {"a": None, "b": 6}


def test_at_refines_each_selected_subtree():
    sel = select(model()).at_instances_of(Block).at(lambda b: b.mlp.bias)
    assert sel.get() == 6


def test_at_rejects_a_value_not_in_the_tree():
    with pytest.raises(SelectionError, match="not a node of the selected subtree"):
        select(model()).at(lambda m: Layer(1, 2))


def test_at_rejects_a_computing_accessor():
    with pytest.raises(SelectionError, match="may only index"):
        select({"a": jnp.ones(2)}).at(lambda t: t["a"] + 1)


def test_at_keypaths_selects_outermost_of_nested_paths():
    sel = select(model()).at_keypaths([(A("sublayers"), S(1)), (A("sublayers"), S(1), A("attn")), (A("sublayers"), S(2))])
    assert sel.get_keypaths() == ((A("sublayers"), S(1)), (A("sublayers"), S(2)))


def test_at_instances_of_outermost_and_innermost():
    m = model()
    assert [l.name for l in select(m).at_instances_of(Layer).get_sequence()] == ["a", "q", "m", "z"]
    assert select(m).at_instances_of((Layer, Block)).count() == 3
    inner = select(Wrapper(Wrapper(Wrapper(1)))).at_instances_of(Wrapper, innermost=True)
    assert inner.get_keypaths() == ((A("inner"), A("inner")),)


def test_at_subtrees_where_checks_the_predicate_returns_bool():
    with pytest.raises(SelectionError, match="must return a Python bool"):
        select([jnp.ones(2)]).at_subtrees_where(lambda x: x)


def test_at_subtrees_where_with_keypath_gets_relative_paths():
    sel = select(model()).at_instances_of(Block).at_subtrees_where(lambda p, x: p == (A("mlp"),), with_keypath=True)
    assert sel.get_keypaths() == ((A("sublayers"), S(1), A("mlp")),)


def test_at_equal_to_matches_structs_and_arrays():
    tree = [Layer(1, 2), Layer(1, 3), (Layer(1, 2),), jnp.zeros(2), np.zeros(2, np.float32)]
    assert select(tree).at_equal_to(Layer(1, 2)).get_keypaths() == ((S(0),), (S(2), S(0)))
    assert select(tree).at_equal_to(jnp.zeros(2)).get_keypaths() == ((S(3),), (S(4),))


def test_at_children_of_struct_and_leaf():
    assert select(Pair(1, [2])).at_children().get_sequence() == (1, [2])
    assert select(3).at_children().is_empty()


def test_at_pytree_leaves_and_at_childless():
    tree = {"a": [1, None], "b": Pair((), 2)}
    assert select(tree).at_pytree_leaves().get_sequence() == (1, 2)
    assert select(tree).at_childless().get_sequence() == (1, None, (), 2)


def test_where_filters_with_and_without_keypath():
    sel = select({"a": 1, "b": 2, "c": 3}).at_pytree_leaves()
    assert sel.where(lambda x: x != 2).get_sequence() == (1, 3)
    assert sel.where(lambda p, x: p == (D("c"),), with_keypath=True).get() == 3


def test_invert_selects_siblings_of_selected_and_of_ancestors():
    sel = select(model()).at(lambda m: m.sublayers[1].attn).invert()
    assert sel.get_keypaths() == ((A("sublayers"), S(0)), (A("sublayers"), S(1), A("mlp")), (A("sublayers"), S(2)))
    assert select([1, 2]).at_instances_of(str).invert().get_keypaths() == ((),)


def test_refine_combines_per_subtree_selections():
    sel = select(model()).at_instances_of(Layer).refine(
        lambda l: select(l).at(lambda x: x.weight if l.name != "m" else x.bias)
    )
    assert sel.get_sequence() == (1, 3, 6, 7)


def test_refine_requires_a_selection():
    with pytest.raises(SelectionError, match="must return a Selection"):
        select([1]).at_children().refine(lambda x: x)


def test_pick_nth_selected_with_negative_and_sequence():
    sel = select([1, 2, 3, 4]).at_pytree_leaves()
    assert sel.pick_nth_selected(-1).get() == 4
    assert sel.pick_nth_selected([3, 0]).get_sequence() == (1, 4)
    with pytest.raises(SelectionError, match="out of range"):
        sel.pick_nth_selected(4)


# -- Reading --------------------------------------------------------------------


def test_count_len_is_empty_and_assert_count_is():
    sel = select([1, 2]).at_pytree_leaves()
    assert (sel.count(), len(sel), sel.is_empty()) == (2, 2, False)
    assert sel.assert_count_is(2) is sel
    with pytest.raises(SelectionError, match=r"Expected 3 selected node\(s\), found 2 selected nodes at \[0\], \[1\]"):
        sel.assert_count_is(3)


def test_get_requires_exactly_one():
    with pytest.raises(SelectionError, match="exactly one selected node, found 2 selected nodes"):
        select([1, 2]).at_pytree_leaves().get()
    with pytest.raises(SelectionError, match="found 0 selected nodes"):
        select([1, 2]).at_instances_of(str).get()


def test_get_by_path_and_fields():
    sel = select({"a": 1, "b": [2]}).at_pytree_leaves()
    assert sel.get_by_path() == collections.OrderedDict([((D("a"),), 1), ((D("b"), S(0)), 2)])
    assert sel.selected_by_path == sel.get_by_path()
    assert sel.remainder == {"a": SelectionHole((D("a"),)), "b": [SelectionHole((D("b"), S(0)))]}


# -- Editing --------------------------------------------------------------------


def test_apply_set_and_sequence_variants():
    sel = select([1, 2, 3]).at_pytree_leaves()
    assert sel.apply(lambda x: x * 10) == [10, 20, 30]
    assert sel.apply(lambda p, x: (p[0].idx, x), with_keypath=True) == [(0, 1), (1, 2), (2, 3)]
    assert sel.apply_with_selected_index(lambda i, x: i) == [0, 1, 2]
    assert sel.set(0) == [0, 0, 0]
    assert sel.set_sequence("abc") == ["a", "b", "c"]
    assert sel.set_by_path({(S(0),): 7, (S(1),): 8, (S(2),): 9}) == [7, 8, 9]
    kept = sel.apply(lambda x: -x, keep_selected=True)
    assert isinstance(kept, Selection) and kept.get_sequence() == (-1, -2, -3)
    assert kept.deselect() == [-1, -2, -3]


def test_set_sequence_and_set_by_path_errors():
    sel = select([1, 2]).at_pytree_leaves()
    with pytest.raises(SelectionError, match="got 1 values for 2 selected nodes"):
        sel.set_sequence([1])
    with pytest.raises(SelectionError, match=r"missing \['\[1\]'\], not selected \['\[5\]'\]"):
        sel.set_by_path({(S(0),): 1, (S(5),): 2})


def test_insert_remove_and_inline_in_a_layer_list():
    m = model()
    new = Layer(0, 0, name="new")
    sel = select(m).at(lambda t: t.sublayers[0])
    assert [l.name for l in sel.insert_after(new).sublayers[:2]] == ["a", "new"]
    assert [getattr(l, "name", "block") for l in sel.insert_before(new).sublayers] == ["new", "a", "block", "z"]
    assert len(sel.remove_from_parent().sublayers) == 2
    doubled = sel.apply_and_inline(lambda l: [l, l])
    assert [getattr(l, "name", "block") for l in doubled.sublayers] == ["a", "a", "block", "z"]
    # Tuples stay tuples.
    assert select((1, 2, 3)).at(lambda t: t[1]).remove_from_parent() == (1, 3)


def test_insert_after_and_select_returns_inserted_places():
    sel = select([1, [2, 3]]).at_pytree_leaves().where(lambda x: x != 1).insert_after(0, and_select=True)
    assert sel.get_keypaths() == ((S(1), S(1)), (S(1), S(3)))
    assert sel.deselect() == [1, [2, 0, 3, 0]]


def test_nested_parents_are_all_edited():
    tree = [1, [2, [3]]]
    got = select(tree).at_pytree_leaves().insert_after("x")
    assert got == [1, "x", [2, "x", [3, "x"]]]


def test_structural_edit_of_a_struct_field_explains_the_fix():
    with pytest.raises(SelectionError) as info:
        select(model()).at(lambda m: m.sublayers[1].attn).insert_after(Layer(0, 0))
    message = str(info.value)
    assert "sublayers[1].attn" in message and "held by a Block" in message
    assert ".apply(lambda l: Sequential([l, new]))" in message


def test_structural_edit_of_the_root_or_dict_entry_raises():
    with pytest.raises(SelectionError, match="the root"):
        select([1]).remove_from_parent()
    with pytest.raises(SelectionError, match=r"held by a dict"):
        select({"a": 1}).at(lambda t: t["a"]).remove_from_parent()


def test_apply_and_inline_requires_a_sequence_result():
    with pytest.raises(SelectionError, match="must return a list or tuple"):
        select([1]).at_pytree_leaves().apply_and_inline(lambda x: x)


# -- Sharing --------------------------------------------------------------------


def test_shared_variable_is_one_entry_edited_once():
    v, w = Var(1.0), Var(2.0)
    tree = {"enc": Layer(v, w), "dec": Layer(v, 3.0)}
    sel = select(tree).at_instances_of(AbstractVariable)
    assert sel.count() == 2
    assert sel.get_keypaths() == ((D("dec"), A("weight")), (D("enc"), A("bias")))
    calls = []
    out = sel.apply(lambda var: calls.append(var) or Var(var.value * 10))
    assert len(calls) == 2
    assert out["enc"].weight is out["dec"].weight and out["enc"].weight.value == 10.0
    assert out["enc"].bias.value == 20.0
    leaves = select(tree).at_pytree_leaves()
    assert leaves.count() == 3
    assert leaves.remainder["enc"].weight == SelectionHole((D("dec"), A("weight")))


def test_insert_after_a_shared_variable_inserts_at_each_place():
    v = Var(0)
    assert select([v, [v]]).at_instances_of(Var).insert_after(1) == [v, 1, [v, 1]]


# -- Partition / combine -----------------------------------------------------------


def test_partition_contract_literal():
    tree = {"a": [1, 2], "b": 3}
    part, rest = select(tree).at(lambda t: t["a"][0]).partition()
    hole = NotInThisPartition()
    assert part == {"a": [1, hole], "b": hole}
    assert rest == {"a": [hole, 2], "b": 3}
    assert combine(part, rest) == tree
    part, rest = select(tree).at(lambda t: t["a"]).partition(at_leaves=True)
    assert part == {"a": [1, 2], "b": hole}
    assert rest == {"a": [hole, hole], "b": 3}
    assert jax.tree_util.tree_leaves(part) == [1, 2]


def test_partition_works_under_jax_grad():
    params = {"w": jnp.array(2.0), "b": jnp.array(1.0)}
    trainable, frozen = select(params).at(lambda p: p["w"]).partition()

    def loss(t):
        p = combine(t, frozen)
        return p["w"] * 3.0 + p["b"]

    grads = jax.grad(loss)(trainable)
    assert float(grads["w"]) == 3.0 and isinstance(grads["b"], NotInThisPartition)


def test_combine_rejects_overlapping_parts():
    with pytest.raises(SelectionError, match=r"2 parts hold a value at \[0\]"):
        combine([1, NotInThisPartition()], [2, NotInThisPartition()])
    with pytest.raises(SelectionError, match="at least one tree"):
        combine()


# -- Selection as data -----------------------------------------------------------


def test_selection_is_a_pytree_whose_leaves_are_the_tree_leaves():
    sel = select({"a": 1, "b": 2}).at(lambda t: t["b"])
    assert sorted(jax.tree_util.tree_leaves(sel)) == [1, 2]
    doubled = jax.tree_util.tree_map(lambda x: x * 2, sel)
    assert doubled.deselect() == {"a": 2, "b": 4}


def test_selection_built_from_fields_and_bad_holes():
    sel = Selection(selected_by_path=collections.OrderedDict({(S(0),): 5}), remainder=[SelectionHole((S(0),)), 1])
    assert sel.deselect() == [5, 1]
    bad = Selection(selected_by_path=collections.OrderedDict(), remainder=[SelectionHole((S(0),))])
    with pytest.raises(SelectionError, match="not a key of selected_by_path"):
        bad.deselect()


def test_markers_in_data_are_quoted_not_filled():
    data = [SelectionHole((S(0),)), 2]
    sel = select(data).at(lambda t: t[1])
    assert sel.remainder == [SelectionQuote(SelectionHole((S(0),))), SelectionHole((S(1),))]
    assert jax.tree_util.tree_map(lambda x: x, sel).deselect() == data


def test_jit_accepts_a_selection():
    sel = select({"w": jnp.ones(2), "b": jnp.zeros(2)}).at(lambda t: t["w"])
    out = jax.jit(lambda s: s.apply(lambda w: w * 3))(sel)
    assert tree_equal(out, {"w": jnp.full(2, 3.0), "b": jnp.zeros(2)})


# -- Other pytree nodes ----------------------------------------------------------


class _Box:
    """A node registered without keys: its children get FlattenedIndexKey paths."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b


jax.tree_util.register_pytree_node(_Box, lambda x: ((x.a, x.b), None), lambda _, c: _Box(*c))


def test_works_on_nodes_with_flattened_index_keys():
    from jax.tree_util import FlattenedIndexKey

    sel = select([_Box(1, 2)]).at_pytree_leaves()
    assert sel.get_keypaths() == ((S(0), FlattenedIndexKey(0)), (S(0), FlattenedIndexKey(1)))
    out = sel.apply(lambda x: x + 1)
    assert (out[0].a, out[0].b) == (2, 3)
    assert select([_Box(1, 2)]).at_keypaths([(S(0), FlattenedIndexKey(1))]).get() == 2


def test_works_on_equinox_modules():
    eqx = pytest.importorskip("equinox")
    lin = eqx.nn.Linear(3, 2, key=jax.random.PRNGKey(0))
    tree = [lin, lin]
    sel = select(tree).at_instances_of(eqx.nn.Linear)
    assert sel.count() == 2
    assert sel.get_keypaths() == ((S(0),), (S(1),))
    zeroed = select(tree).at_instances_of(jax.Array).apply(jnp.zeros_like)
    assert isinstance(zeroed[1], eqx.nn.Linear) and float(jnp.abs(zeroed[1].weight).sum()) == 0.0
    assert select(lin).at(lambda m: m.bias).get() is lin.bias
    assert select(tree).at(lambda t: t[0]).insert_after(lin)[1] is lin


def test_selection_pickles_and_deepcopies_as_its_fields():
    import copy
    import pickle

    sel = select({"a": [1, 2]}).at(lambda t: t["a"][1])
    for clone in (pickle.loads(pickle.dumps(sel)), copy.deepcopy(sel)):
        assert clone.get_keypaths() == ((D("a"), S(1)),)
        assert clone.set(5) == {"a": [1, 5]}
