"""pzb.chk: shape checking with dimension variables, against Penzai 0.2.5's documented behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core import chk
from pzbridge.core.errors import PzbridgeError, StructureMismatchError


def test_var_binds_positional_and_named_sizes():
    x = pzb.nx.wrap(jnp.ones((2, 5))).tag("batch", "seq")
    y = pzb.nx.NamedArray(jnp.ones((3, 2, 5)), {"batch": 2, "seq": 5})
    spec = chk.ArraySpec(shape=(chk.var("n"),), named_shape={"batch": chk.var("b"), "seq": 5})
    assert dict(chk.check_structure(y, spec)) == {"n": 3, "b": 2}
    assert dict(chk.check_structure(x, chk.ArraySpec(named_shape={"batch": 2, "seq": chk.var("s")}))) == {"s": 5}


def test_star_var_binds_a_tuple_and_double_star_the_remaining_axes():
    x = pzb.nx.NamedArray(jnp.ones((4, 5, 6, 2, 3)), {"a": 2, "b": 3})
    spec = chk.ArraySpec(shape=(chk.var("first"), *chk.var("rest")), named_shape={"a": 2, **chk.var("others")})
    assert dict(chk.check_structure(x, spec)) == {"first": 4, "rest": (5, 6), "others": {"b": 3}}
    assert dict(chk.check_structure(jnp.ones(()), chk.ArraySpec(shape=(*chk.var("b"),)))) == {"b": ()}


def test_vars_for_axes_collects_sizes_under_one_name():
    spec = chk.ArraySpec(named_shape={**chk.vars_for_axes("heads", ("h", "k")), "f": chk.var("f")})
    got = chk.check_structure(pzb.nx.zeros({"f": 7, "k": 2, "h": 3}), spec)
    assert got["heads"] == {"h": 3, "k": 2} and got["f"] == 7


def test_repeated_variable_must_agree_and_error_names_where_it_was_bound():
    spec = chk.ArraySpec(shape=(chk.var("n"),))
    with pytest.raises(StructureMismatchError) as info:
        chk.check_structure({"a": jnp.ones(3), "b": jnp.ones(4)}, {"a": spec, "b": spec})
    message = str(info.value)
    assert "['b'] positional axis 0 is 4" in message
    assert "'n' was bound to 3 at ['a'] positional axis 0" in message
    assert "Fix:" in message
    assert isinstance(info.value, PzbridgeError) and isinstance(info.value, ValueError)


def test_known_vars_and_error_prefix():
    spec = chk.ArraySpec(shape=(chk.var("n"),))
    assert dict(chk.check_structure(jnp.ones(3), spec, known_vars={"n": 3, "m": 1})) == {"n": 3, "m": 1}
    with pytest.raises(StructureMismatchError, match=r"^blocks\[0\]: chk: <root> positional axis 0 is 3, .*known_vars"):
        chk.check_structure(jnp.ones(3), spec, known_vars={"n": 4}, error_prefix="blocks[0]: ")
    first = chk.check_structure(jnp.ones((2, 3)), chk.ArraySpec(shape=(*chk.var("b"),)))
    with pytest.raises(StructureMismatchError, match=r"but \*'b' was bound to \(2, 3\) at known_vars"):
        chk.check_structure(jnp.ones((2, 4)), chk.ArraySpec(shape=(*chk.var("b"),)), known_vars=first)


def test_dtype_abstract_and_concrete():
    assert dict(chk.check_structure(jnp.ones(2, jnp.bfloat16), chk.ArraySpec(shape=(2,), dtype=np.floating))) == {}
    assert dict(chk.check_structure(jnp.ones(2, jnp.int32), chk.ArraySpec(shape=(2,), dtype=jnp.int32))) == {}
    with pytest.raises(StructureMismatchError, match="dtype int32, expected a sub-dtype of floating"):
        chk.check_structure(jnp.ones(2, jnp.int32), chk.ArraySpec(shape=(2,), dtype=np.floating))
    with pytest.raises(StructureMismatchError, match="dtype float32, expected int32"):
        chk.check_structure(jnp.ones(2), chk.ArraySpec(shape=(2,), dtype=jnp.int32))


def test_named_axis_mismatches_are_reported():
    x = pzb.nx.zeros({"a": 2, "b": 3})
    with pytest.raises(StructureMismatchError, match="has no named axis 'c'"):
        chk.check_structure(x, chk.ArraySpec(named_shape={"a": 2, "b": 3, "c": 1}))
    with pytest.raises(StructureMismatchError, match=r"unexpected named axes \{'b': 3\}.*\*\*chk.var\('rest'\)"):
        chk.check_structure(x, chk.ArraySpec(named_shape={"a": 2}))
    with pytest.raises(StructureMismatchError, match="named axis 'b' of size 3, expected 4"):
        chk.check_structure(x, chk.ArraySpec(named_shape={"a": 2, "b": 4}))
    with pytest.raises(StructureMismatchError, match=r"positional shape \(\), expected \(var\('n'\),\)"):
        chk.check_structure(x, chk.ArraySpec(shape=(chk.var("n"),), named_shape={**chk.var("r")}))


def test_pytree_structure_wildcards_and_exact_leaves():
    value = {"x": jnp.ones(2), "cfg": "relu", "extra": [1, (2, 3)]}
    pattern = {"x": chk.ArraySpec(shape=(2,)), "cfg": "relu", "extra": chk.ANY}
    assert dict(chk.check_structure(value, pattern)) == {}
    with pytest.raises(StructureMismatchError, match=r"the value at \['cfg'\] is 'gelu', expected exactly 'relu'"):
        chk.check_structure({**value, "cfg": "gelu"}, pattern)
    with pytest.raises(StructureMismatchError, match="tree structure"):
        chk.check_structure([jnp.ones(2)], pattern)
    with pytest.raises(StructureMismatchError, match="expected an array"):
        chk.check_structure("nope", chk.ArraySpec())


def test_as_array_structure_substitution_and_variables():
    tree = {"x": pzb.nx.NamedArray(jnp.zeros((4, 2), jnp.int8), {"f": 2}), "y": np.zeros(3), "tag": 1}
    assert chk.as_array_structure(tree) == {
        "x": chk.ArraySpec(shape=(4,), dtype=jnp.int8, named_shape={"f": 2}),
        "y": chk.ArraySpec(shape=(3,), dtype=np.float64),
        "tag": 1,
    }
    pattern = chk.ArraySpec(shape=(chk.var("n"), *chk.var("b")), named_shape={"f": chk.var("f"), **chk.var("r")})
    assert chk.get_dimension_variables(pattern) == chk.DimensionVariables(("n", "f"), ("b",), ("r",))
    match = {"n": 1, "b": (2, 3), "f": 4, "r": {"g": 5}}
    substituted = chk.full_substitute_dimension_variables(pattern, match)
    assert substituted == chk.ArraySpec(shape=(chk.KnownDim("n", 1), 2, 3), named_shape={"f": chk.KnownDim("f", 4), "g": 5})
    with pytest.raises(StructureMismatchError, match="variable 'n' has no value"):
        chk.full_substitute_dimension_variables(pattern, {})


def test_patterns_are_static_and_bad_specs_raise():
    spec = chk.ArraySpec(shape=(chk.var("n"), 3), named_shape={"f": chk.var("f")})
    assert jax.tree_util.tree_leaves(spec) == []
    assert hash(spec) == hash(chk.ArraySpec(shape=(chk.var("n"), 3), named_shape={"f": chk.var("f")}))
    assert chk.ArraySpec.floating_named({"f": 2}) == chk.ArraySpec(dtype=np.floating, named_shape={"f": 2})
    with pytest.raises(StructureMismatchError, match="positional dimension must be"):
        chk.ArraySpec(shape=("3",))
    with pytest.raises(StructureMismatchError, match="at most one"):
        chk.ArraySpec(named_shape={**chk.var("a"), **chk.var("b")})
    with pytest.raises(StructureMismatchError, match="ambiguous"):
        chk.check_structure(jnp.ones((2, 3)), chk.ArraySpec(shape=(*chk.var("a"), *chk.var("b"))))
    assert pzb.chk is chk


SHAPES = st.lists(st.integers(1, 4), min_size=0, max_size=4)


@settings(max_examples=20, derandomize=True)
@given(SHAPES, SHAPES, st.integers(0, 4))
def test_as_array_structure_of_a_value_always_matches_it_and_rebinds_the_same_sizes(pos, named, split):
    names = [f"n{i}" for i in range(len(named))]
    x = pzb.nx.NamedArray(jnp.zeros((*pos, *named)), dict(zip(names, named)))
    assert dict(chk.check_structure(x, chk.as_array_structure(x))) == {}
    split = min(split, len(pos))
    pattern = chk.ArraySpec(shape=(*[chk.var(f"p{i}") for i in range(split)], *chk.var("tail")),
                            named_shape=dict(chk.vars_for_axes("named", names)))
    got = chk.check_structure(x, pattern)
    assert [got[f"p{i}"] for i in range(split)] == pos[:split]
    assert got["tail"] == tuple(pos[split:])
    assert got.get("named", {}) == dict(zip(names, named))
    # Substituting the match back gives a pattern the value still matches, with the same bindings.
    assert dict(chk.check_structure(x, chk.full_substitute_dimension_variables(pattern, got))) == {
        k: v for k, v in got.items() if k != "tail"}


@settings(max_examples=20, derandomize=True)
@given(st.integers(1, 5), st.integers(1, 5))
def test_a_variable_matches_iff_sizes_agree(a, b):
    spec = chk.ArraySpec(shape=(chk.var("n"), chk.var("n")))
    if a == b:
        assert dict(chk.check_structure(jnp.zeros((a, b)), spec)) == {"n": a}
    else:
        with pytest.raises(StructureMismatchError, match=f"axis 1 is {b}, but variable 'n' was bound to {a}"):
            chk.check_structure(jnp.zeros((a, b)), spec)
