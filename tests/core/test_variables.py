"""Tests for the variable kinds and bind / unbind / freeze (pzbridge.core.variables)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from pzbridge.core.errors import VariableConflictError, VariableError, format_path
from pzbridge.core.struct import Struct, pytree_dataclass
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.core.variables import (
    FrozenMetadata,
    FrozenVariableError,
    Parameter,
    ParameterSlot,
    ParameterValue,
    StateVariable,
    StateVariableSlot,
    StateVariableValue,
    bind_variables,
    freeze_params,
    freeze_state_vars,
    freeze_variables,
    unbind_params,
    unbind_state_vars,
    unbind_variables,
)

pytestmark = pytest.mark.oldest  # also run against .ci/oldest-constraints.txt


@pytree_dataclass
class Box(Struct):
    content: Any


# ---------------------------------------------------------------- strategies


@st.composite
def variable_pools(draw: st.DrawFn) -> list[Any]:
    """Distinct variables with distinct labels and small array values."""
    n = draw(st.integers(1, 6))
    pool = []
    for i in range(n):
        cls = draw(st.sampled_from([Parameter, StateVariable]))
        value = jnp.asarray(draw(st.lists(st.integers(-5, 5), min_size=1, max_size=3)), jnp.float32)
        pool.append(cls(value, label=f"v{i}", metadata={"i": i} if draw(st.booleans()) else None))
    return pool


def trees_over(pool: list[Any]) -> st.SearchStrategy[Any]:
    """Random pytrees of lists / tuples / dicts / structs whose leaves are
    variables drawn (with repetition, i.e. random sharing) from ``pool`` or
    small arrays."""
    leaf = st.one_of(
        st.sampled_from(pool),
        st.integers(-3, 3).map(lambda i: jnp.full((2,), i, jnp.int32)),
    )
    return st.recursive(
        leaf,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(st.sampled_from("abcd"), children, max_size=3),
            children.map(Box),
        ),
        max_leaves=12,
    )


@st.composite
def pools_and_trees(draw: st.DrawFn) -> tuple[list[Any], Any]:
    pool = draw(variable_pools())
    return pool, draw(trees_over(pool))


def _reference_distinct_variables(tree: Any) -> list[Any]:
    """Independent reference: dedupe variable leaves by id, first occurrence order."""
    seen: dict[int, Any] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, AbstractVariable) and id(leaf) not in seen:
            seen[id(leaf)] = leaf
    return list(seen.values())


def _leaves_with_slots(tree: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, (ParameterSlot, StateVariableSlot)))


# ---------------------------------------------------------------- kinds


def test_labels_must_be_non_empty_strings() -> None:
    for bad in ["", 3, None]:
        with pytest.raises(VariableError, match="non-empty string"):
            Parameter(jnp.zeros(()), label=bad)
        with pytest.raises(VariableError, match="non-empty string"):
            StateVariableValue(0, bad)
        with pytest.raises(VariableError, match="non-empty string"):
            ParameterSlot(bad)


def test_variables_compare_by_identity() -> None:
    a, b = Parameter(jnp.zeros(2), "w"), Parameter(jnp.zeros(2), "w")
    assert a == a and a != b and len({a, b, a}) == 2


def test_value_is_reassignable_and_rejects_a_variable() -> None:
    w = Parameter(jnp.zeros(2), "w")
    w.value = {"kernel": jnp.ones(2)}  # Any pytree of arrays is fine.
    assert w.value["kernel"].tolist() == [1.0, 1.0]
    with pytest.raises(VariableError, match="assign `other.value`"):
        w.value = StateVariable(0, "n")


def test_label_is_read_only() -> None:
    with pytest.raises(AttributeError):
        Parameter(1.0, "w").label = "v"  # type: ignore[misc]


def test_metadata_is_copied_at_construction() -> None:
    meta = {"out_sharding": None}
    w = Parameter(1.0, "w", metadata=meta)
    meta["x"] = 1
    assert w.metadata == {"out_sharding": None}


@given(st.dictionaries(st.sampled_from(["a", "b", "sharding"]), st.integers() | st.text(max_size=3), max_size=3))
def test_freeze_then_unfreeze_as_copy_gives_equal_but_distinct_variable(metadata: dict) -> None:
    for cls, value_cls in [(Parameter, ParameterValue), (StateVariable, StateVariableValue)]:
        var = cls(jnp.arange(3.0), label="x", metadata=metadata)
        frozen = var.freeze()
        assert type(frozen) is value_cls
        assert frozen.label == "x" and dict(frozen.metadata) == metadata
        assert frozen.value.tolist() == [0.0, 1.0, 2.0]
        copy = frozen.unfreeze_as_copy()
        assert type(copy) is cls and copy is not var
        assert copy.label == "x" and copy.metadata == metadata
        assert copy.value.tolist() == [0.0, 1.0, 2.0]
        copy.value = jnp.zeros(3)  # Editing the copy leaves the original alone.
        assert var.value.tolist() == [0.0, 1.0, 2.0]


def test_frozen_value_is_a_pytree_with_static_label_and_metadata() -> None:
    pv = ParameterValue({"a": jnp.ones(2)}, "w", {"tag": ("x", 1)})
    leaves, treedef = jax.tree_util.tree_flatten(pv)
    assert len(leaves) == 1 and leaves[0].tolist() == [1.0, 1.0]
    rebuilt = jax.tree_util.tree_unflatten(treedef, [jnp.zeros(2)])
    assert rebuilt.label == "w" and rebuilt.metadata == {"tag": ("x", 1)}
    # Metadata with unhashable values still gives a usable treedef.
    unhashable = ParameterValue(1.0, "w", {"list": [1, 2]})
    assert hash(jax.tree_util.tree_structure(unhashable)) == hash(jax.tree_util.tree_structure(unhashable))
    doubled = jax.jit(lambda v: jax.tree_util.tree_map(lambda x: 2 * x, v))(pv)
    assert doubled.value["a"].tolist() == [2.0, 2.0] and doubled.metadata == {"tag": ("x", 1)}


def test_frozen_metadata_is_a_read_only_hashable_mapping() -> None:
    m = FrozenMetadata({"b": 2, "a": 1})
    assert list(m) == ["b", "a"] and m["a"] == 1 and len(m) == 2
    assert m == {"a": 1, "b": 2} and hash(m) == hash(FrozenMetadata({"a": 1, "b": 2}))
    with pytest.raises(FrozenVariableError):
        m.x = 1  # type: ignore[attr-defined]


def test_assigning_a_frozen_value_raises_with_fix() -> None:
    pv = ParameterValue(1.0, "w")
    with pytest.raises(FrozenVariableError, match="unfreeze_as_copy") as info:
        pv.value = 2.0
    assert isinstance(info.value, dataclasses.FrozenInstanceError) and pv.value == 1.0


def test_slot_value_raises_unbound_error() -> None:
    with pytest.raises(VariableError, match="'w' is unbound"):
        ParameterSlot("w").value  # noqa: B018
    assert ParameterSlot("w") == ParameterSlot("w") and ParameterSlot("w") != ParameterSlot("v")
    assert jax.tree_util.tree_leaves(StateVariableSlot("n")) == []


def test_layers_read_value_on_variable_and_frozen_value_alike() -> None:
    def layer(w: Any, x: jax.Array) -> jax.Array:
        return w.value * x

    w = Parameter(jnp.float32(3.0), "w")
    assert float(layer(w, 2.0)) == float(layer(w.freeze(), 2.0)) == 6.0


# ---------------------------------------------------------------- unbind / bind laws


@given(pools_and_trees())
def test_bind_after_unbind_is_identity_and_keeps_sharing(case: tuple[list[Any], Any]) -> None:
    _, tree = case
    slots, variables = unbind_variables(tree)
    assert not any(isinstance(x, AbstractVariable) for x in jax.tree_util.tree_leaves(slots))
    rebound = bind_variables(slots, variables)
    assert jax.tree_util.tree_structure(rebound) == jax.tree_util.tree_structure(tree)
    before, after = jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(rebound)
    assert len(before) == len(after)
    assert all(a is b for a, b in zip(before, after))  # Same objects, so same sharing pattern.


@given(pools_and_trees())
def test_unbind_returns_each_distinct_variable_once_in_first_occurrence_order(case: tuple[list[Any], Any]) -> None:
    _, tree = case
    slots, variables = unbind_variables(tree)
    expected = _reference_distinct_variables(tree)
    assert len(variables) == len(expected) and all(a is b for a, b in zip(variables, expected))
    # Each occurrence became a slot of the right kind and label.
    originals = [x for x in jax.tree_util.tree_leaves(tree) if isinstance(x, AbstractVariable)]
    new_slots = [x for x in _leaves_with_slots(slots) if isinstance(x, (ParameterSlot, StateVariableSlot))]
    assert [s.label for s in new_slots] == [v.label for v in originals]
    assert [type(s).__name__ for s in new_slots] == [type(v).__name__ + "Slot" for v in originals]


@given(pools_and_trees())
def test_unbind_with_freeze_gives_current_values(case: tuple[list[Any], Any]) -> None:
    _, tree = case
    _, frozen = unbind_variables(tree, freeze=True)
    expected = _reference_distinct_variables(tree)
    assert [f.label for f in frozen] == [v.label for v in expected]
    for f, v in zip(frozen, expected):
        assert type(f).__name__ == type(v).__name__ + "Value"
        assert np.array_equal(f.value, v.value) and dict(f.metadata) == v.metadata


@given(pools_and_trees())
def test_unbind_params_and_state_vars_partition_the_variables(case: tuple[list[Any], Any]) -> None:
    _, tree = case
    no_params, params = unbind_params(tree)
    assert all(isinstance(p, Parameter) for p in params)
    remaining = [x for x in jax.tree_util.tree_leaves(no_params) if isinstance(x, AbstractVariable)]
    assert all(isinstance(x, StateVariable) for x in remaining)
    neither, state = unbind_state_vars(no_params)
    expected = _reference_distinct_variables(tree)
    assert {id(v) for v in params + state} == {id(v) for v in expected}
    assert bind_variables(neither, params + state) is not None
    # Binding one kind at a time needs allow_missing for the other kind's slots.
    half = bind_variables(neither, state, allow_missing=True)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(bind_variables(half, params)), jax.tree_util.tree_leaves(tree)))


@given(pools_and_trees())
def test_bind_frozen_values_inserts_them_read_only_or_as_shared_copies(case: tuple[list[Any], Any]) -> None:
    _, tree = case
    slots, frozen = unbind_variables(tree, freeze=True)
    as_is = bind_variables(slots, frozen)
    frozen_leaves = [x for x in jax.tree_util.tree_leaves(as_is, is_leaf=lambda x: isinstance(x, (ParameterValue, StateVariableValue))) if isinstance(x, (ParameterValue, StateVariableValue))]
    assert all(any(x is f for f in frozen) for x in frozen_leaves)
    copied = bind_variables(slots, frozen, unfreeze_as_copy=True)
    originals = [x for x in jax.tree_util.tree_leaves(tree)]
    copies = jax.tree_util.tree_leaves(copied)
    by_label: dict[str, Any] = {}
    for orig, new in zip(originals, copies):
        if isinstance(orig, AbstractVariable):
            assert type(new) is type(orig) and new is not orig and new.label == orig.label
            assert np.array_equal(new.value, orig.value)
            # One fresh copy per label, shared wherever the label's slots were.
            assert by_label.setdefault(new.label, new) is new


@given(pools_and_trees())
def test_freeze_variables_replaces_shared_objects_by_equal_values(case: tuple[list[Any], Any]) -> None:
    _, tree = case
    frozen_tree = freeze_variables(tree)
    frozen_leaves = jax.tree_util.tree_leaves(frozen_tree, is_leaf=lambda x: isinstance(x, (ParameterValue, StateVariableValue)))
    originals = jax.tree_util.tree_leaves(tree)
    assert len(frozen_leaves) == len(originals)
    first: dict[int, Any] = {}
    for orig, new in zip(originals, frozen_leaves):
        if isinstance(orig, AbstractVariable):
            assert new.label == orig.label and np.array_equal(new.value, orig.value)
            assert new == first.setdefault(id(orig), new)
        else:
            assert new is orig


def test_freeze_params_and_state_vars_freeze_one_kind() -> None:
    w, n = Parameter(jnp.ones(2), "w"), StateVariable(jnp.zeros(()), "n")
    only_params = freeze_params({"w": w, "n": n})
    only_state = freeze_state_vars({"w": w, "n": n})
    assert isinstance(only_params["w"], ParameterValue) and only_params["n"] is n
    assert isinstance(only_state["n"], StateVariableValue) and only_state["w"] is w


# ---------------------------------------------------------------- errors


@given(st.integers(2, 6), st.data())
def test_conflict_error_names_both_paths(size: int, data: st.DataObject) -> None:
    i, j = data.draw(st.lists(st.integers(0, size - 1), min_size=2, max_size=2, unique=True).map(sorted))
    fillers = [jnp.zeros(1) for _ in range(size)]
    fillers[i] = Parameter(jnp.zeros(1), "dup")
    fillers[j] = StateVariable(jnp.zeros(1), "dup")
    tree = {"layers": fillers}
    with pytest.raises(VariableConflictError) as info:
        unbind_variables(tree)
    message = str(info.value)
    for k in (i, j):
        assert format_path((DictKey("layers"), SequenceKey(k))) in message
    assert "'dup'" in message and "relabel" in message


def test_unbind_conflicts_with_a_slot_already_in_the_tree() -> None:
    tree = Box([ParameterSlot("w"), Parameter(1.0, "w")])
    with pytest.raises(VariableConflictError, match=r"content\[0\].*already in the tree|content\[1\].*content\[0\]"):
        unbind_variables(tree)


def test_bind_missing_slot_names_path_label_and_available_labels() -> None:
    tree = Box({"q": ParameterSlot("q"), "k": ParameterSlot("k")})
    with pytest.raises(VariableError) as info:
        bind_variables(tree, [ParameterValue(1.0, "q"), ParameterValue(2.0, "v")], allow_unused=True)
    message = str(info.value)
    assert format_path((GetAttrKey("content"), DictKey("k"))) in message
    assert "'k'" in message and "['q', 'v']" in message


def test_bind_unused_variable_raises_unless_allowed() -> None:
    tree = [ParameterSlot("w")]
    extra = [ParameterValue(1.0, "w"), StateVariableValue(0, "orphan")]
    with pytest.raises(VariableError, match="orphan"):
        bind_variables(tree, extra)
    assert bind_variables(tree, extra, allow_unused=True)[0] is extra[0]


def test_bind_duplicate_labels_raise_conflict() -> None:
    with pytest.raises(VariableConflictError, match="two entries labelled 'w'"):
        bind_variables([ParameterSlot("w")], [ParameterValue(1.0, "w"), Parameter(2.0, "w")])


def test_bind_kind_mismatch_names_path_and_both_kinds() -> None:
    with pytest.raises(VariableError) as info:
        bind_variables({"bn": [ParameterSlot("stat")]}, [StateVariable(0, "stat")])
    message = str(info.value)
    assert "['bn'][0]" in message and "expects a Parameter" in message and "StateVariable" in message


def test_bind_rejects_non_variables() -> None:
    with pytest.raises(VariableError, match="found int"):
        bind_variables([ParameterSlot("w")], [3])


def test_failed_bind_leaves_inputs_untouched() -> None:
    w = Parameter(jnp.ones(2), "w")
    tree = [ParameterSlot("w"), ParameterSlot("missing")]
    with pytest.raises(VariableError):
        bind_variables(tree, [w])
    assert tree == [ParameterSlot("w"), ParameterSlot("missing")] and w.value.tolist() == [1.0, 1.0]


def test_frozen_values_and_variables_survive_pickle() -> None:
    import pickle

    var = StateVariable(jnp.arange(2.0), "n", metadata={"axis": "batch"})
    restored = pickle.loads(pickle.dumps(var.freeze()))
    assert restored == var.freeze() and restored.metadata == {"axis": "batch"}
    restored_var = pickle.loads(pickle.dumps(var))
    assert restored_var is not var and restored_var.label == "n" and restored_var.value.tolist() == [0.0, 1.0]
