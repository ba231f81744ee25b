"""Penzai 0.2.5 variable features: automatic and scoped labels, predicates, subscriptable kinds."""

import typing

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import VariableConflictError, VariableError
from pzbridge.core.variables import (
    Parameter,
    ParameterValue,
    StateVariable,
    StateVariableValue,
    freeze_params,
    freeze_state_vars,
    scoped_auto_state_var_labels,
    unbind_params,
    unbind_state_vars,
    unbind_variables,
)


def test_state_variable_without_label_gets_a_unique_auto_label():
    a, b = StateVariable(0), StateVariable(jnp.zeros(2))
    assert a.label.startswith("auto:") and b.label.startswith("auto:") and a.label != b.label
    slots, values = unbind_state_vars([a, b, a], freeze=True)
    assert [s.label for s in slots] == [a.label, b.label, a.label] and len(values) == 2


def test_parameter_still_needs_a_label():
    with pytest.raises(VariableError, match="a label is required .*only a StateVariable may omit it"):
        Parameter(jnp.zeros(2))


def test_scoped_labels_count_from_zero_per_scope_and_restore_on_exit():
    with scoped_auto_state_var_labels():
        assert [StateVariable(i).label for i in range(3)] == ["scoped:0", "scoped:1", "scoped:2"]
        with scoped_auto_state_var_labels("kv"):
            assert StateVariable(0).label == "scoped:kv:0"
        assert StateVariable(0).label == "scoped:3"
    assert StateVariable(0).label.startswith("auto:")
    assert StateVariable(0, "explicit").label == "explicit"


def test_two_scopes_with_one_group_conflict_when_mixed():
    with scoped_auto_state_var_labels("g"):
        a = StateVariable(0)
    with scoped_auto_state_var_labels("g"):
        b = StateVariable(1)
    with pytest.raises(VariableConflictError, match="share the label 'scoped:g:0'"):
        unbind_variables([a, b])


def _build_counters(n):
    with scoped_auto_state_var_labels("model"):
        return [StateVariable(jnp.int32(i)) for i in range(n)]


@settings(max_examples=10, derandomize=True)
@given(st.integers(1, 6))
def test_rebuilding_in_a_scope_gives_equal_unbound_structure(n):
    first, _ = unbind_variables(_build_counters(n))
    second, _ = unbind_variables(_build_counters(n))
    assert jax.tree_util.tree_structure(first) == jax.tree_util.tree_structure(second)
    assert [s.label for s in first] == [f"scoped:model:{i}" for i in range(n)]


def test_predicates_on_unbind_and_freeze():
    w, b, n, m = Parameter(1.0, "w"), Parameter(2.0, "b"), StateVariable(0, "n"), StateVariable(1, "m")
    tree = {"w": w, "b": b, "n": n, "m": m}
    slots, params = unbind_params(tree, lambda p: p.label == "w", freeze=True)
    assert params == (ParameterValue(1.0, "w"),)
    assert slots["b"] is b and slots["n"] is n and type(slots["w"]).__name__ == "ParameterSlot"
    slots, state = unbind_state_vars(tree, lambda v: v.label == "m")
    assert state == (m,) and slots["n"] is n
    frozen = freeze_params(tree, lambda p: p.label == "b")
    assert frozen["w"] is w and frozen["b"] == ParameterValue(2.0, "b")
    frozen = freeze_state_vars(tree, lambda v: v.label == "n")
    assert frozen["n"] == StateVariableValue(0, "n") and frozen["m"] is m and frozen["w"] is w


@pytest.mark.parametrize("fn", [unbind_params, unbind_state_vars, unbind_variables])
def test_freeze_is_keyword_only_and_a_bool_predicate_is_explained(fn):
    with pytest.raises(VariableError, match=r"pass freeze= as a keyword \(`freeze` is keyword-only\)\. Fix: call"):
        fn([Parameter(1.0, "w")], True)
    with pytest.raises(TypeError):
        fn([Parameter(1.0, "w")], None, True)


@pytest.mark.parametrize("fn", [freeze_params, freeze_state_vars])
def test_freeze_helpers_reject_a_non_callable_predicate(fn):
    with pytest.raises(VariableError, match="predicate"):
        fn([], "w")


def test_variable_kinds_are_subscriptable_for_annotations():
    alias = Parameter[jax.Array]
    assert typing.get_origin(alias) is Parameter and typing.get_args(alias) == (jax.Array,)
    assert typing.get_origin(StateVariable[int]) is StateVariable
    assert typing.get_origin(ParameterValue[jax.Array]) is ParameterValue

    @pzb.pytree_dataclass
    class Annotated(pzb.Struct):
        weight: Parameter[jax.Array]

    assert Annotated(Parameter(1.0, "w")).weight.label == "w"
