"""Tests for pzbridge.core.struct: frozen pytree dataclasses with keypaths."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import StructError
from pzbridge.core.struct import Struct, pytree_dataclass, static_field

pytestmark = pytest.mark.oldest  # also run against .ci/oldest-constraints.txt


@pytree_dataclass
class Pair(Struct):
    left: object
    right: object
    tag: str = static_field(default="pair")


@pytree_dataclass
class Validated(Struct):
    size: int = static_field()

    def __post_init__(self):
        if self.size < 0:
            raise ValueError("size must be >= 0")


def test_children_have_attribute_keypaths():
    pair = Pair(jnp.ones(2), [jnp.zeros(3)])
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(pair)[0]]
    assert paths == [
        (jax.tree_util.GetAttrKey("left"),),
        (jax.tree_util.GetAttrKey("right"), jax.tree_util.SequenceKey(0)),
    ]


def test_static_fields_are_in_the_treedef_not_the_leaves():
    a, b = Pair(1, 2, tag="a"), Pair(1, 2, tag="b")
    assert jax.tree_util.tree_leaves(a) == [1, 2]
    assert jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b)


def test_struct_is_frozen():
    pair = Pair(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pair.left = 3  # type: ignore[misc]


def test_forgetting_the_decorator_raises_a_helpful_error():
    class Undecorated(Pair):
        pass

    with pytest.raises(StructError, match=r"@pzb.pytree_dataclass.*Undecorated"):
        Undecorated(1, 2)


def test_decorating_a_non_struct_without_flatten_methods_raises():
    with pytest.raises(StructError, match=r"not a pzbridge.Struct: it must define `tree_flatten_with_keys"):

        @pytree_dataclass
        class NotAStruct:  # noqa: F841
            x: int


def test_frozen_false_is_refused():
    with pytest.raises(StructError, match="always frozen"):

        @pytree_dataclass(frozen=False)
        class Thawed(Struct):  # noqa: F841
            x: int


def test_unflatten_skips_post_init_validation_but_init_runs_it():
    with pytest.raises(ValueError):
        Validated(size=-1)
    ok = Validated(size=2)
    rebuilt = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(ok), [])
    assert rebuilt == ok


def test_structural_equality_compares_array_values():
    assert Pair(jnp.arange(3), "x") == Pair(jnp.arange(3), "x")
    assert Pair(jnp.arange(3), "x") != Pair(jnp.arange(3) + 1, "x")
    assert Pair(1, 2) != (1, 2)
    assert hash(Pair(1, 2)) == hash(Pair(1, 2))


def test_replace_returns_a_modified_copy():
    pair = Pair(1, 2)
    assert pair.replace(right=5) == Pair(1, 5)
    assert pair.right == 2


def test_structs_pass_through_jit_and_grad():
    pair = Pair(jnp.float32(2.0), jnp.float32(3.0))
    grads = jax.jit(jax.grad(lambda p: p.left * p.right))(pair)
    assert isinstance(grads, Pair)
    np.testing.assert_array_equal(np.asarray(grads.left), 3.0)


def test_select_shortcut_starts_a_selection():
    pair = Pair(1, 2)
    assert pair.select().at(lambda p: p.right).get() == 2


@given(st.recursive(st.integers(), lambda inner: st.builds(Pair, inner, inner), max_leaves=20))
def test_flatten_unflatten_round_trip(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    assert jax.tree_util.tree_unflatten(treedef, leaves) == tree
    assert pzb.tree_equal(jax.tree_util.tree_map(lambda x: x, tree), tree)
